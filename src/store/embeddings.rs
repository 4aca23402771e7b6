//! The embedding file written by `graft embed --out FILE`: JSON lines.
//!
//! Line 1 is a header `{"graft_embeddings": 1, "backbone": {name, sha256, dim, preprocess}}`;
//! every further line is one image: `{"path": "...", "sha256": "<of the image file>",
//! "embedding": [f32; dim]}`. Any language with a JSON parser reads it; [`read`] loads it back.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{write_atomic, StoreError};
use crate::backbone::BackboneId;

/// Format version written in the header.
pub const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    graft_embeddings: u32,
    backbone: BackboneId,
}

/// One embedded image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Class name, when the file is a labelled example set (the kiosk's `examples.jsonl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The image path as given (or found while walking a folder).
    pub path: PathBuf,
    /// sha256 of the image file's bytes.
    pub sha256: String,
    /// The raw embedding.
    pub embedding: Vec<f32>,
}

/// A whole embedding file.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingFile {
    /// The backbone that made every record.
    pub backbone: BackboneId,
    /// One per image, in the order they were embedded.
    pub records: Vec<Record>,
}

/// Writes an embedding file atomically.
pub fn write(path: &Path, file: &EmbeddingFile) -> Result<(), StoreError> {
    write_atomic(path, |w| {
        let header = Header {
            graft_embeddings: FORMAT,
            backbone: file.backbone.clone(),
        };
        serde_json::to_writer(&mut *w, &header)?;
        w.write_all(b"\n")?;
        for r in &file.records {
            serde_json::to_writer(&mut *w, r)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Reads only the header of an embedding file: the backbone that made it.
pub fn read_backbone(path: &Path) -> Result<BackboneId, StoreError> {
    let f = crate::userfile::open(path).map_err(|e| StoreError::io(path, e))?;
    Ok(header(path, &mut std::io::BufReader::new(f).lines())?.backbone)
}

fn header(path: &Path, lines: &mut std::io::Lines<impl BufRead>) -> Result<Header, StoreError> {
    let first = lines
        .next()
        .ok_or_else(|| StoreError::format(path, "empty file, not a graft embedding file"))?
        .map_err(|e| StoreError::io(path, e))?;
    let header: Header = serde_json::from_str(&first)
        .map_err(|e| StoreError::format(path, format!("not a graft embedding file: {e}")))?;
    if header.graft_embeddings > FORMAT {
        return Err(StoreError::format(
            path,
            format!(
                "embedding file format {} is newer than this graft reads ({FORMAT})",
                header.graft_embeddings
            ),
        ));
    }
    Ok(header)
}

/// Reads an embedding file, checking the header and every record's length.
pub fn read(path: &Path) -> Result<EmbeddingFile, StoreError> {
    let f = crate::userfile::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut lines = std::io::BufReader::new(f).lines();
    let header = header(path, &mut lines)?;
    let mut records = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.map_err(|e| StoreError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .map_err(|e| StoreError::format(path, format!("line {}: {e}", i + 2)))?;
        if r.embedding.len() != header.backbone.dim {
            return Err(StoreError::format(
                path,
                format!(
                    "line {}: embedding has {} values, header says {}",
                    i + 2,
                    r.embedding.len(),
                    header.backbone.dim
                ),
            ));
        }
        crate::head::validate_values(&format!("line {} embedding", i + 2), &r.embedding)
            .map_err(|e| StoreError::invalid(path, e))?;
        records.push(r);
    }
    Ok(EmbeddingFile {
        backbone: header.backbone,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(dim: usize) -> BackboneId {
        BackboneId {
            name: "m".into(),
            sha256: "00".repeat(32),
            dim,
            preprocess: "p".into(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        let file = EmbeddingFile {
            backbone: id(3),
            records: vec![Record {
                label: Some("cup".into()),
                path: "a/b.jpg".into(),
                sha256: "ab".into(),
                embedding: vec![0.5, -1.25, 3.0e-7],
            }],
        };
        write(&p, &file).unwrap();
        assert_eq!(read(&p).unwrap(), file);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        let header = serde_json::to_string(&Header {
            graft_embeddings: 1,
            backbone: id(2),
        })
        .unwrap();
        let cases = [
            ("", "empty file"),
            ("hello", "not a graft embedding file"),
            (
                "{\"graft_embeddings\":9,\"backbone\":{\"name\":\"m\",\"sha256\":\"0\",\"dim\":2,\"preprocess\":\"p\"}}",
                "newer",
            ),
            (&*format!("{header}\n{{\"path\":\"x\",\"sha256\":\"y\",\"embedding\":[1.0]}}"), "1 values"),
            (&*format!("{header}\n{{\"path\":\"x\",\"sha2"), "line 2"),
        ];
        for (text, want) in cases {
            std::fs::write(&p, text).unwrap();
            let err = read(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
