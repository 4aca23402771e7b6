//! `graft add --head HEAD --label LABEL PATH...`: new examples (or a new class) into a head
//! file, refit in place, through the library's one add-and-refit path.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{embed_folder, load_head, print_train_summary, summary, CacheArgs};
use crate::Global;
use graft::head::Label;
use graft::store::files::collect_images;
use graft::store::learn::{self, HeadFileStore, NewExample};

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Head file to extend (rewritten atomically).
    #[arg(long)]
    head: PathBuf,
    /// Class of the new examples (a new name adds a class).
    #[arg(long)]
    label: String,
    /// Images or folders of images.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

pub fn add(g: &Global, a: AddArgs) -> anyhow::Result<()> {
    let label = Label::new(&a.label).context("--label")?;
    let (file, bb) = load_head(g, &a.head)?;
    let images = collect_images(&a.paths)?;
    let mut cache = a.cache.open(&bb)?;
    let (embedded, hits, embed_seconds) = embed_folder(&bb, &images, cache.as_mut())?;
    let new = images
        .iter()
        .zip(embedded)
        .map(|(path, e)| NewExample {
            path: path.clone(),
            sha256: e.sha256,
            embedding: e.embedding,
        })
        .collect();
    // Read again under the folder's lock: another `graft add` may have committed meanwhile.
    drop(file);
    let mut store = HeadFileStore::open(&a.head, &bb)?;
    let added = learn::add_examples(&mut store, &label, new)?;
    let trained = added
        .trained
        .context("a head file always has 2+ classes to refit")?;
    if !g.json {
        println!(
            "added {} examples of {:?} ({} skipped as duplicates)",
            added.added,
            label.as_str(),
            added.skipped
        );
    }
    print_train_summary(
        g,
        &summary(
            &a.head,
            store.file(),
            &trained,
            &bb,
            images.len() - hits,
            hits,
            embed_seconds,
            added.fit_seconds,
        ),
    )
}
