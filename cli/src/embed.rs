//! `graft embed`: images (or folders of them) to an embedding file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{output, Global};
use graft::store::embeddings::{self, EmbeddingFile, Record};
use graft::store::files;

#[derive(Serialize)]
struct Summary<'a> {
    out: &'a Path,
    images: usize,
    dim: usize,
    model: &'a str,
    seconds: f64,
}

pub fn run(g: &Global, paths: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let images = files::collect_images(paths)?;
    let bb = super::load_backbone(g)?;
    let start = Instant::now();
    let bar = output::progress(images.len(), "embedding");
    let embedded = bb.embed_files(&images, |_| bar.inc(1))?;
    bar.finish_and_clear();
    let mut records = Vec::with_capacity(images.len());
    for (path, e) in images.iter().zip(embedded) {
        records.push(Record {
            label: None,
            path: path.clone(),
            sha256: files::file_sha256(path)?,
            embedding: e.vector,
        });
    }
    let file = EmbeddingFile {
        backbone: bb.id().clone(),
        records,
    };
    embeddings::write(out, &file)?;
    let summary = Summary {
        out,
        images: images.len(),
        dim: bb.id().dim,
        model: &bb.id().name,
        seconds: start.elapsed().as_secs_f64(),
    };
    if g.json {
        output::json_line(&summary)?;
    } else {
        eprintln!(
            "embedded {} images ({}-d, {}) into {} in {:.1}s",
            summary.images,
            summary.dim,
            summary.model,
            out.display(),
            summary.seconds
        );
    }
    Ok(())
}
