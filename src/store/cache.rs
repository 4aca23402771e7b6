//! The embedding cache: image content hash + backbone identity → embedding, so re-training on a
//! grown dataset only embeds the new images.
//!
//! One append-only file per backbone, `DIR/embeddings-<first 16 hex of model sha256>.bin`:
//! a header (`GRAFT-CACHE\n`, `u32` dim, the full model sha256 as 64 ASCII hex) and then
//! records of `32` bytes image sha256 + `4·dim` bytes `f32` LE + `8` bytes of the sha256 of the
//! previous two. A record torn by a power cut fails its check and is ignored, as is anything
//! after it; the cache is only ever a speed-up, never the source of truth.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::StoreError;
use crate::backbone::BackboneId;

const MAGIC: &[u8] = b"GRAFT-CACHE\n";

/// An opened cache for one backbone.
#[derive(Debug)]
pub struct Cache {
    path: PathBuf,
    dim: usize,
    entries: HashMap<[u8; 32], Vec<f32>>,
}

fn hex_to_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Cache {
    /// Opens (or creates) the cache file for `backbone` in `dir`.
    pub fn open(dir: &Path, backbone: &BackboneId) -> Result<Cache, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let short = backbone.sha256.get(..16).unwrap_or(&backbone.sha256);
        let path = dir.join(format!("embeddings-{short}.bin"));
        let dim = backbone.dim;
        let mut entries = HashMap::new();
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&(dim as u32).to_le_bytes());
        header.extend_from_slice(backbone.sha256.as_bytes());
        match std::fs::read(&path) {
            Ok(bytes) if bytes.starts_with(&header) => {
                let rec = 32 + 4 * dim + 8;
                let mut valid = header.len();
                for r in bytes[header.len()..].chunks_exact(rec) {
                    let check = Sha256::digest(&r[..rec - 8]);
                    if check[..8] != r[rec - 8..] {
                        break;
                    }
                    valid += rec;
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&r[..32]);
                    let v = r[32..rec - 8]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    entries.insert(key, v);
                }
                if valid < bytes.len() {
                    // Cut the torn tail so later appends stay readable.
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| StoreError::io(&path, e))?;
                    f.set_len(valid as u64)
                        .map_err(|e| StoreError::io(&path, e))?;
                }
            }
            Ok(_) | Err(_) => {
                // Missing, foreign or damaged header: start afresh (atomically).
                super::write_atomic(&path, |w| w.write_all(&header))?;
            }
        }
        Ok(Cache { path, dim, entries })
    }

    /// The cached embedding of the image with this sha256 (hex), if any.
    pub fn get(&self, image_sha256: &str) -> Option<&[f32]> {
        hex_to_bytes(image_sha256).and_then(|k| self.entries.get(&k).map(Vec::as_slice))
    }

    /// Number of cached embeddings.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends new embeddings and fsyncs.
    pub fn put_many<'a>(
        &mut self,
        items: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    ) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for (sha, v) in items {
            let Some(key) = hex_to_bytes(sha) else {
                continue;
            };
            if v.len() != self.dim || self.entries.contains_key(&key) {
                continue;
            }
            let start = buf.len();
            buf.extend_from_slice(&key);
            for x in v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            let check = Sha256::digest(&buf[start..]);
            buf.extend_from_slice(&check[..8]);
            self.entries.insert(key, v.to_vec());
        }
        if buf.is_empty() {
            return Ok(());
        }
        let io = |e| StoreError::io(&self.path, e);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        f.sync_data().map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let id = BackboneId {
            name: "m".into(),
            sha256: "cd".repeat(32),
            dim: 3,
            preprocess: "p".into(),
        };
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        {
            let mut c = Cache::open(dir.path(), &id).unwrap();
            c.put_many([(a.as_str(), &[1.0f32, 2.0, 3.0][..])]).unwrap();
            c.put_many([(b.as_str(), &[4.0f32, 5.0, 6.0][..])]).unwrap();
        }
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&file).unwrap().len();
        // Tear the last record.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let mut c = Cache::open(dir.path(), &id).unwrap();
        assert_eq!(c.get(&a), Some(&[1.0f32, 2.0, 3.0][..]));
        assert_eq!(c.get(&b), None);
        c.put_many([(b.as_str(), &[7.0f32, 8.0, 9.0][..])]).unwrap();
        let c = Cache::open(dir.path(), &id).unwrap();
        assert_eq!(c.get(&b), Some(&[7.0f32, 8.0, 9.0][..]));
        // Another backbone does not see these entries.
        let other = BackboneId {
            sha256: "ef".repeat(32),
            ..id
        };
        assert!(Cache::open(dir.path(), &other).unwrap().is_empty());
    }
}
