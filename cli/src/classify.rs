//! `graft classify`: the pretrained model used directly (ImageNet top-k).

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use super::{output, Global};
use graft::backbone::ClassScore;

#[derive(Serialize)]
struct Line<'a> {
    path: &'a std::path::Path,
    model: &'a str,
    top: &'a [ClassScore],
}

pub fn run(g: &Global, images: &[PathBuf], top: usize) -> anyhow::Result<()> {
    let bb = super::load_classifier(g)?;
    for path in images {
        let scores = bb
            .classify_file(path, top)
            .with_context(|| format!("classifying {}", path.display()))?;
        if g.json {
            output::json_line(&Line {
                path,
                model: &bb.id().name,
                top: &scores,
            })?;
        } else {
            println!("{}", output::path_text(path));
            for (rank, s) in scores.iter().enumerate() {
                println!(
                    "  {:>2}. {:<40} {:>6.2}%  (class {})",
                    rank + 1,
                    s.label,
                    s.probability * 100.0,
                    s.index
                );
            }
        }
    }
    Ok(())
}
