//! Where an example is added: the one implementation of "save a frame as an example", "add
//! examples and refit" and "commit what changed", which every front end calls (`graft add`,
//! `graft capture --add-to`, the kiosk's LEARN / FORGET / TRAIN, and whatever comes next).
//!
//! ```text
//! camera frame ─ FrameSaver::save ─ <folder>/<label>-<ms>_<n>.jpg (atomic) ─ SavedFrame::embed ─┐
//! image file ──── embed (dataset::embed_cached, through the cache) ──────────────────────────────┤
//!                                                                                      NewExample
//! learn::add_examples(store, label, new):  ExampleSet::add (same picture twice: skipped)
//!                                          → store.commit_examples()   (the commit point)
//!                                          → learn::refit: ExampleSet::fit → store.commit_head()
//! ```
//!
//! An [`ExampleStore`] is where examples and heads live: a head file holds both (its examples
//! are committed with the head), a kiosk data folder keeps `examples.jsonl` as its commit
//! point and `head.graft` beside it.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::headfile::{self, Example, HeadFile};
use super::{write_atomic, FolderLock, StoreError};
use crate::backbone::{preprocess, sha256_hex, Backbone, BackboneError, BackboneId, RgbFrame};
use crate::head::{self, Examples, HeadError, HeadKind, HeadParams, Label};

/// JPEG quality of saved frames, unless a front end is told otherwise.
pub const JPEG_QUALITY: u8 = 92;

/// Errors of adding examples: a file, a model or a fit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LearnError {
    /// A file could not be written or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A picture could not be encoded, decoded or embedded.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// The head could not be fitted.
    #[error(transparent)]
    Head(#[from] HeadError),
}

/// A picture ready to become an example: where it is, its bytes' sha256 and its embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct NewExample {
    /// The image file.
    pub path: PathBuf,
    /// sha256 of the image bytes (two examples of one class with the same hash are one).
    pub sha256: String,
    /// Raw embedding.
    pub embedding: Vec<f32>,
}

/// Class names and the examples that use them: what a head file and a kiosk hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExampleSet {
    /// Class names, index = class id.
    pub labels: Vec<String>,
    /// The examples.
    pub examples: Vec<Example>,
}

impl ExampleSet {
    /// The examples of a head file.
    pub fn of(file: &HeadFile) -> ExampleSet {
        ExampleSet {
            labels: file.head.labels.clone(),
            examples: file.examples.clone(),
        }
    }

    /// Adds pictures as examples of `label` (a new name becomes a new class). A picture already
    /// there under the same label (same sha256) is skipped. Returns how many were added.
    pub fn add(&mut self, label: &Label, new: impl IntoIterator<Item = NewExample>) -> usize {
        let id = match self.labels.iter().position(|l| label == l) {
            Some(i) => i,
            None => {
                self.labels.push(label.to_string());
                self.labels.len() - 1
            }
        };
        let mut added = 0;
        for n in new {
            if self
                .examples
                .iter()
                .any(|x| x.sha256 == n.sha256 && x.label == id)
            {
                continue;
            }
            self.examples.push(Example {
                label: id,
                path: n.path,
                sha256: n.sha256,
                embedding: n.embedding,
            });
            added += 1;
        }
        added
    }

    /// Removes the class `label` and its examples; returns how many examples went, `None` if
    /// there is no such class.
    pub fn remove(&mut self, label: &str) -> Option<usize> {
        let id = self.labels.iter().position(|l| l == label)?;
        let before = self.examples.len();
        self.examples.retain(|e| e.label != id);
        let removed = before - self.examples.len();
        self.compact();
        Some(removed)
    }

    /// Drops labels without examples, renumbering the examples.
    pub fn compact(&mut self) {
        let used: Vec<usize> = (0..self.labels.len())
            .filter(|l| self.examples.iter().any(|e| e.label == *l))
            .collect();
        let labels = used.iter().map(|l| self.labels[*l].clone()).collect();
        for e in &mut self.examples {
            e.label = used.iter().position(|l| *l == e.label).unwrap_or(0);
        }
        self.labels = labels;
    }

    /// Examples per class, in label order.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.labels.len()];
        for e in &self.examples {
            c[e.label] += 1;
        }
        c
    }

    /// The training form under `params`' input transform: unit vectors, class ids, and one
    /// group per object (`<object>_<n>.jpg` names, see [`group_key`](super::files::group_key))
    /// within its class.
    pub fn training_examples(&self, params: &HeadParams) -> Examples {
        headfile::training_examples(&self.labels, &self.examples, params)
    }

    /// Trains a head on the examples (the kind given, or the best by cross-validation) with
    /// `params` (its input transform included) and builds the head file. Nothing is written.
    pub fn fit(
        &self,
        backbone: &BackboneId,
        choice: Option<HeadKind>,
        params: &HeadParams,
        seed: u64,
    ) -> Result<(HeadFile, head::Trained), HeadError> {
        params.validate()?;
        let trained = head::train(choice, &self.training_examples(params), params, seed)?;
        let file = HeadFile {
            backbone: backbone.clone(),
            head: trained.head.clone(),
            examples: self.examples.clone(),
            cv_accuracy: Some(trained.report.accuracy),
            cv_method: Some(trained.report.method.clone()),
        };
        Ok((file, trained))
    }
}

/// Where examples and their head are kept and committed.
pub trait ExampleStore {
    /// The backbone every example was embedded with.
    fn backbone(&self) -> &BackboneId;
    /// The examples, as last committed plus any change in progress.
    fn set(&mut self) -> &mut ExampleSet;
    /// The head kind a refit keeps (`None`: choose by cross-validation).
    fn head_kind(&self) -> Option<HeadKind>;
    /// The hyper-parameters (and input transform) a refit uses.
    fn params(&self) -> HeadParams {
        HeadParams::default()
    }
    /// A threshold set by the user that survives refits, if any.
    fn threshold_override(&self) -> Option<f32> {
        None
    }
    /// Makes the examples durable: the commit point of an add.
    fn commit_examples(&mut self) -> Result<(), StoreError>;
    /// Makes a new head durable and current (`None`: fewer than 2 classes, no head).
    fn commit_head(&mut self, head: Option<HeadFile>) -> Result<(), StoreError>;
}

/// What [`add_examples`] did.
#[derive(Debug, Clone)]
pub struct Added {
    /// Examples added.
    pub added: usize,
    /// Pictures skipped as already there.
    pub skipped: usize,
    /// The refit (kind, cross-validation, calibration), when there are 2+ classes.
    pub trained: Option<head::Trained>,
    /// Seconds spent fitting.
    pub fit_seconds: f64,
}

/// **The** way examples are added: adds `new` under `label`, commits the examples, then refits
/// (keeping the store's head kind) and commits the head. If the examples cannot be committed,
/// the store's memory goes back to what its disk holds and nothing else happens.
///
/// It is [`commit_new`] then [`refit`]; a host that must stay responsive while the head is
/// fitted (the kiosk) runs the same two steps with the fit on another thread ([`fit_job`],
/// [`FitJob::run`], [`install`]).
pub fn add_examples(
    store: &mut dyn ExampleStore,
    label: &Label,
    new: Vec<NewExample>,
) -> Result<Added, LearnError> {
    let (added, skipped) = commit_new(store, label, new)?;
    let start = std::time::Instant::now();
    let kind = store.head_kind();
    let trained = refit(store, kind)?;
    Ok(Added {
        added,
        skipped,
        trained,
        fit_seconds: start.elapsed().as_secs_f64(),
    })
}

/// The first half of [`add_examples`]: adds `new` under `label` and commits the examples (on
/// failure the store's memory goes back to what its disk holds). Returns (added, skipped).
pub fn commit_new(
    store: &mut dyn ExampleStore,
    label: &Label,
    new: Vec<NewExample>,
) -> Result<(usize, usize), LearnError> {
    let total = new.len();
    let before = store.set().clone();
    let added = store.set().add(label, new);
    if let Err(e) = store.commit_examples() {
        *store.set() = before;
        return Err(e.into());
    }
    Ok((added, total - added))
}

/// Refits the store's head on its examples (`kind`, or chosen by cross-validation) and commits
/// it; with fewer than 2 classes there is no head. Labels without examples are dropped first.
pub fn refit(
    store: &mut dyn ExampleStore,
    kind: Option<HeadKind>,
) -> Result<Option<head::Trained>, LearnError> {
    let fitted = fit_job(store, kind).run()?;
    install(store, fitted)
}

/// A refit to run: a snapshot of the store's examples with the kind, parameters and threshold
/// to use. It needs no store, so it can run on another thread while the store keeps serving
/// with its current head.
#[derive(Debug, Clone)]
pub struct FitJob {
    set: ExampleSet,
    backbone: BackboneId,
    kind: Option<HeadKind>,
    params: HeadParams,
    threshold: Option<f32>,
}

/// A finished [`FitJob`], to [`install`] in its store.
#[derive(Debug)]
pub struct Fitted {
    /// The head file and how it was trained; `None` with fewer than 2 classes.
    result: Option<(HeadFile, head::Trained)>,
}

/// The snapshot of a refit of `store` (labels without examples are dropped first).
pub fn fit_job(store: &mut dyn ExampleStore, kind: Option<HeadKind>) -> FitJob {
    store.set().compact();
    FitJob {
        set: store.set().clone(),
        backbone: store.backbone().clone(),
        kind,
        params: store.params(),
        threshold: store.threshold_override(),
    }
}

impl FitJob {
    /// Fits (the slow part: cross-validation, calibration, the final fit). Nothing is written.
    pub fn run(self) -> Result<Fitted, LearnError> {
        super::fault_fit_pause();
        if self.set.labels.len() < 2 {
            return Ok(Fitted { result: None });
        }
        let (mut file, trained) = self.set.fit(&self.backbone, self.kind, &self.params, 0)?;
        if let Some(t) = self.threshold {
            file.head.threshold = head::validate_threshold(t)?;
        }
        Ok(Fitted {
            result: Some((file, trained)),
        })
    }
}

/// Commits a fitted head in its store (the last step of [`refit`]). The store's examples must
/// not have changed since its [`fit_job`].
pub fn install(
    store: &mut dyn ExampleStore,
    fitted: Fitted,
) -> Result<Option<head::Trained>, LearnError> {
    match fitted.result {
        None => {
            store.commit_head(None)?;
            Ok(None)
        }
        Some((file, trained)) => {
            store.commit_head(Some(file))?;
            Ok(Some(trained))
        }
    }
}

/// A head file as an [`ExampleStore`]: its examples live inside it, so both are committed by
/// writing the file.
#[derive(Debug)]
pub struct HeadFileStore {
    path: PathBuf,
    file: HeadFile,
    set: ExampleSet,
    /// The backbone's top block, for a head behind it (`NAME:top`): refits start from it.
    top: Option<std::sync::Arc<crate::backbone::TopBlock>>,
    _lock: FolderLock,
}

impl HeadFileStore {
    /// Locks the head file's folder (waiting for another writer to finish), then reads the
    /// head file at `path` and checks it against the loaded backbone. The lock is held until
    /// the store is dropped, so two `graft add` on one head both land, one after the other.
    /// Open it after the slow part (embedding) and drop it soon after the commit.
    pub fn open(path: &Path, backbone: &Backbone) -> Result<HeadFileStore, LearnError> {
        let lock = FolderLock::acquire(path.parent().unwrap_or(Path::new(".")))?;
        let file = headfile::read(path)?;
        backbone.id().check_file(&file.backbone, path)?;
        Ok(HeadFileStore {
            path: path.to_path_buf(),
            set: ExampleSet::of(&file),
            top: backbone.top_block().cloned().map(std::sync::Arc::new),
            file,
            _lock: lock,
        })
    }

    /// The head file as last committed.
    pub fn file(&self) -> &HeadFile {
        &self.file
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ExampleStore for HeadFileStore {
    fn backbone(&self) -> &BackboneId {
        &self.file.backbone
    }
    fn set(&mut self) -> &mut ExampleSet {
        &mut self.set
    }
    fn head_kind(&self) -> Option<HeadKind> {
        Some(self.file.head.kind)
    }
    fn params(&self) -> HeadParams {
        // A fine-tuned head records the epochs it chose; a refit chooses again.
        HeadParams {
            top: self.top.clone(),
            finetune_epochs: None,
            ..self.file.head.params.clone()
        }
    }
    fn commit_examples(&mut self) -> Result<(), StoreError> {
        Ok(()) // committed with the head
    }
    fn commit_head(&mut self, head: Option<HeadFile>) -> Result<(), StoreError> {
        let Some(head) = head else {
            return Err(StoreError::format(
                &self.path,
                "a head file needs examples of at least 2 classes",
            ));
        };
        headfile::write(&self.path, &head)?;
        self.file = head;
        Ok(())
    }
}

/// The name of one capture session of `label`: `<label>-<unix ms>`. Its frames are saved as
/// `<session>_<n>.jpg`, so [`group_key`](super::files::group_key) makes them one object for cross-validation.
pub fn session_name(label: &Label) -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{label}-{ms}")
}

/// Saves the frames of one capture session as JPEG examples in a folder.
#[derive(Debug)]
pub struct FrameSaver {
    folder: PathBuf,
    session: String,
    quality: u8,
    next: usize,
}

/// A frame saved as a JPEG file.
#[derive(Debug, Clone)]
pub struct SavedFrame {
    /// The file written.
    pub path: PathBuf,
    /// Its bytes.
    pub jpeg: Vec<u8>,
}

impl FrameSaver {
    /// Creates `folder` if needed and starts a session of `label`.
    pub fn new(folder: &Path, label: &Label, quality: u8) -> Result<FrameSaver, StoreError> {
        std::fs::create_dir_all(folder).map_err(|e| StoreError::io(folder, e))?;
        Ok(FrameSaver {
            folder: folder.to_path_buf(),
            session: session_name(label),
            quality,
            next: 0,
        })
    }

    /// Saves one frame atomically as `<folder>/<session>_<n>.jpg`; `name` says where it came
    /// from, for errors.
    pub fn save(&mut self, frame: &RgbFrame, name: &str) -> Result<SavedFrame, LearnError> {
        let path = self
            .folder
            .join(format!("{}_{:03}.jpg", self.session, self.next));
        let jpeg = frame.to_jpeg(self.quality, name)?;
        write_atomic(&path, |w| w.write_all(&jpeg))?;
        self.next += 1;
        Ok(SavedFrame { path, jpeg })
    }
}

impl SavedFrame {
    /// Embeds the saved JPEG, not the raw frame: the same pixels a retrain from the folder
    /// (`graft train`) will see.
    pub fn embed(&self, backbone: &Backbone) -> Result<NewExample, BackboneError> {
        let decoded = preprocess::decode_bytes(&self.jpeg, &self.path)?;
        let out = backbone.embed(&[backbone.prepare_frame(&decoded)])?;
        let embedding = out.into_iter().next().map(|e| e.vector).unwrap_or_default();
        Ok(NewExample {
            path: self.path.clone(),
            sha256: sha256_hex(&self.jpeg),
            embedding,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(path: &str, sha: &str, v: f32) -> NewExample {
        NewExample {
            path: path.into(),
            sha256: sha.into(),
            embedding: vec![v, 1.0 - v],
        }
    }

    #[test]
    fn adds_new_classes_skips_repeats_and_compacts_after_removal() {
        let mut s = ExampleSet::default();
        let cup = Label::new("cup").unwrap();
        let mug = Label::new("mug").unwrap();
        assert_eq!(
            s.add(&cup, [new("a_0.jpg", "1", 0.9), new("a_1.jpg", "2", 0.8)]),
            2
        );
        assert_eq!(s.add(&cup, [new("again.jpg", "1", 0.9)]), 0);
        // The same picture under another label is another example.
        assert_eq!(s.add(&mug, [new("b_0.jpg", "1", 0.1)]), 1);
        assert_eq!(s.labels, vec!["cup", "mug"]);
        assert_eq!(s.counts(), vec![2, 1]);
        let t = s.training_examples(&HeadParams::default());
        assert_eq!(t.y, vec![0, 0, 1]);
        // a_0 and a_1 are one object; b_0 another (and a different class).
        assert_eq!(t.groups, vec![0, 0, 1]);
        assert_eq!(s.remove("cup"), Some(2));
        assert_eq!(s.remove("cup"), None);
        assert_eq!(s.labels, vec!["mug"]);
        assert_eq!(s.examples[0].label, 0);
    }

    /// A store in memory that counts commits and can be told to fail.
    struct Memory {
        id: BackboneId,
        set: ExampleSet,
        committed: ExampleSet,
        head: Option<HeadFile>,
        fail_examples: bool,
        threshold: f32,
    }

    impl ExampleStore for Memory {
        fn backbone(&self) -> &BackboneId {
            &self.id
        }
        fn set(&mut self) -> &mut ExampleSet {
            &mut self.set
        }
        fn head_kind(&self) -> Option<HeadKind> {
            Some(HeadKind::Centroid)
        }
        fn threshold_override(&self) -> Option<f32> {
            Some(self.threshold)
        }
        fn commit_examples(&mut self) -> Result<(), StoreError> {
            if self.fail_examples {
                return Err(StoreError::format(Path::new("mem"), "disk full"));
            }
            self.committed = self.set.clone();
            Ok(())
        }
        fn commit_head(&mut self, head: Option<HeadFile>) -> Result<(), StoreError> {
            self.head = head;
            Ok(())
        }
    }

    fn memory(threshold: f32) -> Memory {
        Memory {
            id: BackboneId {
                name: "t".into(),
                sha256: "0".into(),
                dim: 2,
                preprocess: "p".into(),
            },
            set: ExampleSet::default(),
            committed: ExampleSet::default(),
            head: None,
            fail_examples: false,
            threshold,
        }
    }

    /// Regression (issue 9): a store's threshold override (a kiosk's settings.json) was put in
    /// the head unchecked; `{"threshold": 5}` made every answer unknown. The refit refuses it
    /// and commits no head.
    #[test]
    fn a_threshold_override_outside_0_1_is_refused_by_the_refit() {
        for bad in [5.0, -0.1, f32::NAN] {
            let mut m = memory(bad);
            let cup = Label::new("cup").unwrap();
            let mug = Label::new("mug").unwrap();
            add_examples(&mut m, &cup, vec![new("c_0.jpg", "1", 0.9)]).unwrap();
            let err = add_examples(&mut m, &mug, vec![new("m_0.jpg", "2", 0.1)])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.starts_with("threshold = "), "{bad}: {err:?}");
            assert!(m.head.is_none(), "{bad}: a head was committed");
        }
    }

    #[test]
    fn add_commits_examples_then_the_refit_head_and_rolls_back_on_failure() {
        let mut m = memory(0.25);
        let cup = Label::new("cup").unwrap();
        let mug = Label::new("mug").unwrap();
        let a = add_examples(&mut m, &cup, vec![new("c_0.jpg", "1", 0.9)]).unwrap();
        assert_eq!((a.added, a.skipped), (1, 0));
        assert!(
            a.trained.is_none() && m.head.is_none(),
            "one class: no head"
        );
        let a = add_examples(
            &mut m,
            &mug,
            vec![new("m_0.jpg", "2", 0.1), new("m_0.jpg", "2", 0.1)],
        )
        .unwrap();
        assert_eq!((a.added, a.skipped), (1, 1));
        let head = m.head.as_ref().expect("two classes: a head");
        assert_eq!(head.head.kind, HeadKind::Centroid);
        assert_eq!(head.head.threshold, 0.25);
        assert_eq!(m.committed, m.set);
        m.fail_examples = true;
        let before = m.set.clone();
        assert!(add_examples(&mut m, &mug, vec![new("m_1.jpg", "3", 0.2)]).is_err());
        assert_eq!(m.set, before, "memory went back to what was committed");
    }
}
