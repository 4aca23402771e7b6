//! Labelled image folders (`DATASET/<label>/**/*.jpg`, the ImageFolder layout) and embedding
//! them through the cache.

use std::path::{Path, PathBuf};

use super::cache::Cache;
use super::files::{file_sha256, images_in, utf8_path};
use super::headfile::Example;
use super::learn::ExampleSet;
use super::StoreError;
use crate::backbone::{Backbone, BackboneError};
use crate::head::Label;

/// A labelled image folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Class names (sub-folder names, sorted).
    pub labels: Vec<String>,
    /// Every image with its class id, sorted by class then path.
    pub items: Vec<(PathBuf, usize)>,
}

/// Errors of embedding a dataset: the store's or the backbone's.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A model or image problem.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
}

impl ImageFolder {
    /// Scans `root`: each sub-folder is a class; images are found recursively inside it.
    /// Empty class folders are skipped; a dataset with no class folders is an error, and so is
    /// a class folder whose name is not a usable class name ([`Label`]: e.g. `unknown`, a name
    /// with a space, or one that is not UTF-8), since the kiosk and the protocol could never
    /// name that class, and a picture whose path is not UTF-8 ([`super::files::utf8_path`]):
    /// both found here, before any picture is embedded. A folder that cannot be read is an
    /// error, not a class skipped.
    pub fn scan(root: &Path) -> Result<ImageFolder, StoreError> {
        let meta = std::fs::metadata(root).map_err(|e| StoreError::io(root, e))?;
        if !meta.is_dir() {
            return Err(StoreError::format(
                root,
                "dataset must be a folder of class folders (DATASET/<label>/*.jpg)",
            ));
        }
        let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| StoreError::io(root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            // Hidden by its first byte: a name that is not UTF-8 is not hidden, it is refused.
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            })
            .collect();
        classes.sort();
        let mut labels = Vec::new();
        let mut items = Vec::new();
        for dir in classes {
            let images = images_in(&dir)?;
            if images.is_empty() {
                continue;
            }
            let name = dir.file_name().unwrap_or_default();
            let Some(name) = name.to_str() else {
                return Err(StoreError::format(
                    &dir,
                    format!(
                        "class folder: the name {name:?} is not valid UTF-8, so not a usable \
                         class name; rename the folder"
                    ),
                ));
            };
            let label = Label::new(name).map_err(|e| {
                StoreError::format(&dir, format!("class folder: {e}; rename the folder"))
            })?;
            for p in &images {
                utf8_path(p)?;
            }
            let id = labels.len();
            labels.push(label.to_string());
            items.extend(images.into_iter().map(|p| (p, id)));
        }
        if labels.is_empty() {
            return Err(StoreError::format(
                root,
                "no class folders with images in it (expected DATASET/<label>/*.jpg)",
            ));
        }
        Ok(ImageFolder { labels, items })
    }

    /// Embeds every image (through `cache` when there is one) as an example of its class
    /// folder: the one way a labelled folder becomes training examples (`train`, `eval`,
    /// `curve`, library users). `progress(done)` counts images embedded (cache hits are not).
    /// Returns the examples and how many came from the cache.
    pub fn embed<F>(
        &self,
        backbone: &Backbone,
        cache: Option<&mut Cache>,
        progress: F,
    ) -> Result<(ExampleSet, usize), DatasetError>
    where
        F: Fn(usize) + Sync,
    {
        let paths: Vec<PathBuf> = self.items.iter().map(|(p, _)| p.clone()).collect();
        let (embedded, hits) = embed_cached(backbone, &paths, cache, progress)?;
        let examples = self
            .items
            .iter()
            .zip(embedded)
            .map(|((path, label), e)| Example {
                label: *label,
                path: path.clone(),
                sha256: e.sha256,
                embedding: e.embedding,
            })
            .collect();
        Ok((
            ExampleSet {
                labels: self.labels.clone(),
                examples,
            },
            hits,
        ))
    }

    /// Images per class.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.labels.len()];
        for (_, l) in &self.items {
            c[*l] += 1;
        }
        c
    }
}

/// An image's hash and embedding.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// sha256 of the image bytes.
    pub sha256: String,
    /// Raw embedding.
    pub embedding: Vec<f32>,
}

/// Embeds `paths` in order, taking what it can from `cache` and adding the rest to it.
/// `progress(done, total)` is called as images are embedded (cache hits are not counted).
/// Returns the embeddings and how many came from the cache.
pub fn embed_cached<F>(
    backbone: &Backbone,
    paths: &[PathBuf],
    mut cache: Option<&mut Cache>,
    progress: F,
) -> Result<(Vec<Embedded>, usize), DatasetError>
where
    F: Fn(usize) + Sync,
{
    let shas: Vec<String> = paths
        .iter()
        .map(|p| file_sha256(p))
        .collect::<Result<_, _>>()?;
    let mut out: Vec<Option<Vec<f32>>> = shas
        .iter()
        .map(|s| cache.as_ref().and_then(|c| c.get(s)))
        .collect();
    let hits = out.iter().filter(|o| o.is_some()).count();
    let missing: Vec<usize> = (0..paths.len()).filter(|i| out[*i].is_none()).collect();
    let todo: Vec<PathBuf> = missing.iter().map(|i| paths[*i].clone()).collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let fresh = backbone.embed_files(&todo, |_| {
        let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress(d);
    })?;
    for (i, e) in missing.iter().zip(fresh) {
        out[*i] = Some(e.vector);
    }
    if let Some(c) = cache.as_mut() {
        c.put_many(
            missing
                .iter()
                .filter_map(|i| out[*i].as_deref().map(|v| (shas[*i].as_str(), v))),
        )?;
    }
    let embedded = shas
        .into_iter()
        .zip(out)
        .map(|(sha256, e)| Embedded {
            sha256,
            embedding: e.unwrap_or_default(),
        })
        .collect();
    Ok((embedded, hits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_folders_that_are_not_labels_are_refused() {
        for bad in ["unknown", "x y"] {
            let d = tempfile::tempdir().unwrap();
            for f in ["cup/1.jpg".to_string(), format!("{bad}/2.jpg")] {
                let p = d.path().join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, b"x").unwrap();
            }
            let err = ImageFolder::scan(d.path()).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("class folder"), "{err}");
        }
    }

    #[test]
    fn a_class_folder_whose_name_is_not_utf8_is_refused_not_dropped() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let odd = d.path().join(std::ffi::OsStr::from_bytes(b"t\xffols"));
        for dir in [d.path().join("cup"), odd] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("1.jpg"), b"x").unwrap();
        }
        let err = ImageFolder::scan(d.path()).unwrap_err().to_string();
        assert!(
            err.contains(r"t\xFFols") && err.contains("class folder"),
            "{err}"
        );
    }

    #[test]
    fn scan_finds_classes_and_skips_empty_ones() {
        let d = tempfile::tempdir().unwrap();
        for f in ["b/1.jpg", "a/x/2.png", "a/3.jpg", "empty/readme.txt"] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let ds = ImageFolder::scan(d.path()).unwrap();
        assert_eq!(ds.labels, vec!["a", "b"]);
        assert_eq!(ds.counts(), vec![2, 1]);
        let err = ImageFolder::scan(&d.path().join("empty"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no class folders"), "{err}");
    }
}
