//! The embedding cache: image content hash + backbone identity → embedding, so re-training on a
//! grown dataset only embeds the new images.
//!
//! One append-only file per backbone, `DIR/embeddings-<first 16 hex of model sha256>.bin`
//! (`…-top.bin` for a model cut before its top block, `NAME:top`, whose vectors are another
//! size): a header (`GRAFT-CACHE\n`, `u32` dim, the full model sha256 as 64 ASCII hex) and then
//! records of `32` bytes image sha256 + `4·dim` bytes `f32` LE + `8` bytes of the sha256 of the
//! previous two. A record torn by a power cut fails its check and is ignored, as is anything
//! after it; the cache is only ever a speed-up, never the source of truth.
//!
//! Opening reads the file once, record by record, to check it, and keeps only where each
//! vector is; [`Cache::get`] reads it from the file. A `NAME:top` vector is 62 KB: a cache of
//! ten thousand pictures held in memory would be 600 MB.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::StoreError;
use crate::backbone::top::{DEEP_SUFFIX, TOP_SUFFIX};
use crate::backbone::BackboneId;

const MAGIC: &[u8] = b"GRAFT-CACHE\n";

/// An opened cache for one backbone.
#[derive(Debug)]
pub struct Cache {
    path: PathBuf,
    dim: usize,
    /// Image sha256 → the file offset of its vector.
    entries: HashMap<[u8; 32], u64>,
    /// The file's length: where the next record goes.
    len: u64,
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
        // The uncut model and its `:top` cut share a sha256: their files must not.
        let cut = if backbone.name.ends_with(TOP_SUFFIX) {
            "-top"
        } else if backbone.name.ends_with(DEEP_SUFFIX) {
            "-deep"
        } else {
            ""
        };
        let path = dir.join(format!("embeddings-{short}{cut}.bin"));
        let dim = backbone.dim;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&(dim as u32).to_le_bytes());
        header.extend_from_slice(backbone.sha256.as_bytes());
        let io = |e| StoreError::io(&path, e);
        let mut entries = HashMap::new();
        let mut valid = 0u64;
        let mut file_len = 0u64;
        if let Ok(f) = File::open(&path) {
            file_len = f.metadata().map_err(io)?.len();
            let mut r = BufReader::with_capacity(1 << 16, f);
            let mut head = vec![0u8; header.len()];
            if r.read_exact(&mut head).is_ok() && head == header {
                valid = header.len() as u64;
                let rec = 32 + 4 * dim + 8;
                let mut buf = vec![0u8; rec];
                while r.read_exact(&mut buf).is_ok() {
                    let check = Sha256::digest(&buf[..rec - 8]);
                    if check[..8] != buf[rec - 8..] {
                        break;
                    }
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&buf[..32]);
                    entries.insert(key, valid + 32);
                    valid += rec as u64;
                }
            }
        }
        if valid == 0 {
            // Missing, foreign or damaged header: start afresh (atomically).
            super::write_atomic(&path, |w| w.write_all(&header))?;
            valid = header.len() as u64;
        } else if valid < file_len {
            // Cut the torn tail so later appends stay readable.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io)?;
            f.set_len(valid).map_err(io)?;
        }
        Ok(Cache {
            path,
            dim,
            entries,
            len: valid,
        })
    }

    /// The cached embedding of the image with this sha256 (hex), if any (read from the file;
    /// `None` too if the file can no longer be read).
    pub fn get(&self, image_sha256: &str) -> Option<Vec<f32>> {
        let at = *self.entries.get(&hex_to_bytes(image_sha256)?)?;
        let mut bytes = vec![0u8; 4 * self.dim];
        File::open(&self.path)
            .and_then(|f| f.read_exact_at(&mut bytes, at))
            .ok()?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
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
        let mut added = Vec::new();
        for (sha, v) in items {
            let Some(key) = hex_to_bytes(sha) else {
                continue;
            };
            if v.len() != self.dim || self.entries.contains_key(&key) || added.contains(&key) {
                continue;
            }
            let start = buf.len();
            buf.extend_from_slice(&key);
            for x in v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            let check = Sha256::digest(&buf[start..]);
            buf.extend_from_slice(&check[..8]);
            added.push(key);
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
        let rec = (32 + 4 * self.dim + 8) as u64;
        for (i, key) in added.into_iter().enumerate() {
            self.entries.insert(key, self.len + i as u64 * rec + 32);
        }
        self.len += buf.len() as u64;
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
        assert_eq!(c.get(&a), Some(vec![1.0f32, 2.0, 3.0]));
        assert_eq!(c.get(&b), None);
        c.put_many([(b.as_str(), &[7.0f32, 8.0, 9.0][..])]).unwrap();
        assert_eq!(
            c.get(&b),
            Some(vec![7.0f32, 8.0, 9.0]),
            "appended, then read back"
        );
        let c = Cache::open(dir.path(), &id).unwrap();
        assert_eq!(c.get(&b), Some(vec![7.0f32, 8.0, 9.0]));
        // Another backbone does not see these entries.
        let other = BackboneId {
            sha256: "ef".repeat(32),
            ..id
        };
        assert!(Cache::open(dir.path(), &other).unwrap().is_empty());
    }

    /// Regression: a model and its `:top` cut have one sha256, and shared one file, each
    /// opening wiping the other's entries (their headers differ in the vector size).
    #[test]
    fn a_model_and_its_top_cut_keep_their_own_entries() {
        let dir = tempfile::tempdir().unwrap();
        let uncut = BackboneId {
            name: "m".into(),
            sha256: "cd".repeat(32),
            dim: 2,
            preprocess: "p".into(),
        };
        let top = BackboneId {
            name: "m:top".into(),
            dim: 4,
            ..uncut.clone()
        };
        let a = "11".repeat(32);
        Cache::open(dir.path(), &uncut)
            .unwrap()
            .put_many([(a.as_str(), &[1.0f32, 2.0][..])])
            .unwrap();
        Cache::open(dir.path(), &top)
            .unwrap()
            .put_many([(a.as_str(), &[3.0f32, 4.0, 5.0, 6.0][..])])
            .unwrap();
        assert_eq!(
            Cache::open(dir.path(), &uncut).unwrap().get(&a),
            Some(vec![1.0, 2.0])
        );
        assert_eq!(
            Cache::open(dir.path(), &top).unwrap().get(&a),
            Some(vec![3.0, 4.0, 5.0, 6.0])
        );
    }
}
