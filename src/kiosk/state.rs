//! The kiosk's persistent state in its data directory, and the operations the protocol drives.
//!
//! ```text
//! DIR/examples.jsonl            the examples: label, frame path (relative to DIR), sha256,
//!                               embedding (JSON lines)
//! DIR/examples/<label>/*.jpg    the captured frames they came from
//! DIR/head.graft                the head trained on them (when there are 2+ classes)
//! DIR/settings.json             the threshold set with THRESHOLD, if any
//! ```
//!
//! `examples.jsonl` is the commit point: LEARN writes the frames, then the example file, then the
//! head; FORGET writes the example file, then the head, then deletes the frames. Every file is
//! written atomically (temp file, fsync, rename, fsync of the folder), so after a power cut the
//! state is the last committed one: frames that the example file provably does not refer to are
//! deleted at start, and a head that does not match the examples is retrained.
//!
//! The head is derived data: when it cannot be written (a full disk), the kiosk keeps the new
//! head in memory, goes on answering with it, and retrains it from the examples at the next
//! start. A reply's `OK` means the examples (or `settings.json`) are on disk.
//!
//! Frame paths are stored relative to DIR, so the folder can be moved, or reached by another
//! spelling or through a symlink. Files of older versions, which stored the path as `--data`
//! was given, are matched by `<label>/<file name>`: a frame is an orphan only when no committed
//! example has its label folder and file name.
//!
//! In a fleet (`graft serve --fleet`), examples learnt by other kiosks arrive without their
//! frames: their paths (`examples/<label>/<origin>~<file>`) name no file, and the backup and
//! thumbnails skip them. `fleet.log` and `fleet.json` beside the rest hold the fleet's
//! operations and this kiosk's id in it (see [`super::replica`]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::replica::{Held, Intent, Visible};
use crate::backbone::{Backbone, BackboneError, BackboneId};
use crate::capture::Frame;
use crate::head::{HeadError, HeadKind, HeadParams, Label};
use crate::live::{self, Classified, LiveError};
use crate::store::embeddings::{self, EmbeddingFile, Record};
use crate::store::headfile::{self, Example, HeadFile};
use crate::store::learn::{
    self, ExampleSet, ExampleStore, FitJob, Fitted, FrameSaver, LearnError, JPEG_QUALITY,
};
use crate::store::{backup, write_atomic, FolderLock, StoreError};

/// Kiosk failures.
#[derive(Debug, thiserror::Error)]
pub enum KioskError {
    /// Nothing to classify with yet.
    #[error("no head yet: LEARN at least 2 classes first (have {have})")]
    NoHead {
        /// Classes with examples.
        have: usize,
    },
    /// A class that does not exist.
    #[error("no class {0:?}")]
    NoClass(String),
    /// A backup that cannot be restored (nothing was changed).
    #[error("cannot restore this backup: {0}")]
    BadBackup(String),
    /// A class name already in use.
    #[error("there is a class {0:?} already")]
    ClassExists(String),
    /// No such example.
    #[error("class {label:?} has no example {file:?}")]
    NoExample {
        /// The class.
        label: String,
        /// The frame's file name.
        file: String,
    },
    /// A file problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A model or image problem.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// Training failed.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// A folder could not be created / removed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl From<LearnError> for KioskError {
    fn from(e: LearnError) -> Self {
        match e {
            LearnError::Store(e) => KioskError::Store(e),
            LearnError::Backbone(e) => KioskError::Backbone(e),
            LearnError::Head(e) => KioskError::Head(e),
        }
    }
}

impl From<LiveError> for KioskError {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::Backbone(b) => KioskError::Backbone(b),
            LiveError::Head(h) => KioskError::Head(h),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Settings {
    threshold: Option<f32>,
}

impl Settings {
    fn read(path: &Path) -> Result<Settings, StoreError> {
        let bytes = match crate::userfile::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(StoreError::io(path, e)),
        };
        let s: Settings = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::format(path, format!("not kiosk settings: {e}")))?;
        if let Some(t) = s.threshold {
            crate::head::validate_threshold(t).map_err(|e| StoreError::invalid(path, e))?;
        }
        Ok(s)
    }
}

/// A frame's identity across spellings of the data folder: its label folder and file name.
fn frame_key(p: &Path) -> Option<(&std::ffi::OsStr, &std::ffi::OsStr)> {
    Some((p.parent()?.file_name()?, p.file_name()?))
}

/// What LEARN did.
#[derive(Debug, Clone)]
pub struct Learned {
    /// Frames added.
    pub added: usize,
    /// Examples of this label now.
    pub examples: usize,
    /// Classes now.
    pub classes: usize,
    /// Whether a head is trained now.
    pub trained: bool,
}

/// What TRAIN did.
#[derive(Debug, Clone)]
pub struct TrainedInfo {
    /// Head type chosen.
    pub kind: HeadKind,
    /// Held-out accuracy.
    pub cv_accuracy: f64,
    /// Threshold in use.
    pub threshold: f32,
}

/// The kiosk: backbone, examples, head, settings, and the data directory behind them.
#[derive(Debug)]
pub struct Kiosk {
    dir: PathBuf,
    backbone: std::sync::Arc<Backbone>,
    set: ExampleSet,
    head: Option<HeadFile>,
    settings: Settings,
    /// The head in memory is not the one on disk (its write failed).
    head_unsaved: bool,
    /// Label-level changes since a fleet last took them ([`Kiosk::take_intents`]).
    intents: Vec<Intent>,
    /// One process at a time writes a data folder.
    _lock: FolderLock,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KioskError + '_ {
    move |source| KioskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Kiosk {
    fn examples_file(&self) -> PathBuf {
        examples_path(&self.dir)
    }
    fn head_file(&self) -> PathBuf {
        self.dir.join("head.graft")
    }
    fn settings_file(&self) -> PathBuf {
        self.dir.join("settings.json")
    }
    fn frames_dir(&self) -> PathBuf {
        self.dir.join("examples")
    }

    /// The name of the backbone a data directory's examples were embedded with, if it has
    /// any: the model `serve` loads for it when none is named, so a kiosk keeps working when the
    /// default model changes.
    pub fn recorded_backbone(dir: &Path) -> Result<Option<String>, KioskError> {
        let file = examples_path(dir);
        if !file.exists() {
            return Ok(None);
        }
        Ok(Some(embeddings::read_backbone(&file)?.name))
    }

    /// Opens (or creates) a data directory; `seed` is a head file whose examples start an empty
    /// one. Cleans up after an interrupted write and retrains a head that does not match.
    pub fn open(dir: &Path, backbone: Backbone, seed: Option<&Path>) -> Result<Kiosk, KioskError> {
        std::fs::create_dir_all(dir.join("examples")).map_err(io(dir))?;
        let lock = FolderLock::try_acquire(dir)?.ok_or_else(|| {
            StoreError::format(
                dir,
                "in use by another graft process (a second `graft serve` on this data folder?)",
            )
        })?;
        let mut k = Kiosk {
            dir: dir.to_path_buf(),
            backbone: std::sync::Arc::new(backbone),
            set: ExampleSet::default(),
            head: None,
            settings: Settings::default(),
            head_unsaved: false,
            intents: Vec::new(),
            _lock: lock,
        };
        k.settings = Settings::read(&k.settings_file())?;
        if k.examples_file().exists() {
            let file = embeddings::read(&k.examples_file())?;
            k.backbone
                .id()
                .check_file(&file.backbone, &k.examples_file())?;
            for r in file.records {
                let label = r.label.unwrap_or_else(|| "unlabelled".into());
                let labels = &mut k.set.labels;
                let id = match labels.iter().position(|l| *l == label) {
                    Some(i) => i,
                    None => {
                        labels.push(label);
                        labels.len() - 1
                    }
                };
                let path = k.resolve(r.path);
                k.set.examples.push(Example {
                    label: id,
                    path,
                    sha256: r.sha256,
                    embedding: r.embedding,
                });
            }
        } else if let Some(seed) = seed {
            let h = headfile::read(seed)?;
            k.backbone.id().check_file(&h.backbone, seed)?;
            log::info!(
                "seeding {} from {} ({} examples)",
                dir.display(),
                seed.display(),
                h.examples.len()
            );
            k.set = ExampleSet::of(&h);
            k.write_examples()?;
        }
        k.remove_orphans()?;
        if k.head_file().exists() {
            match headfile::read(&k.head_file()) {
                Ok(mut h) if k.matches(&h) => {
                    // THRESHOLD commits settings.json first; the head may not have followed.
                    if let Some(t) = k.settings.threshold {
                        if h.head.threshold != t {
                            h.head.threshold = t;
                            k.head_unsaved = true;
                        }
                    }
                    k.head = Some(h)
                }
                Ok(_) => {
                    log::warn!("head does not match the examples (interrupted write?): retraining")
                }
                Err(e) => log::warn!("head unreadable ({e}): retraining"),
            }
        }
        if k.head.is_none() {
            learn::refit(&mut k, None)?;
        }
        Ok(k)
    }

    /// Where a stored frame path points in this data folder: relative paths are under it;
    /// absolute ones (older versions) are looked for in this folder's `examples/<label>/` first,
    /// so a moved or respelled folder keeps its frames.
    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_relative() {
            return self.dir.join(p);
        }
        if let Some((label, name)) = frame_key(&p) {
            let here = self.frames_dir().join(label).join(name);
            if here.exists() {
                return here;
            }
        }
        p
    }

    /// The head's examples are exactly the kiosk's (same labels, same pictures).
    fn matches(&self, h: &HeadFile) -> bool {
        let key = |labels: &[String], e: &Example| (labels[e.label].clone(), e.sha256.clone());
        let s = &self.set;
        let ours: BTreeSet<_> = s.examples.iter().map(|e| key(&s.labels, e)).collect();
        let theirs: BTreeSet<_> = h.examples.iter().map(|e| key(&h.head.labels, e)).collect();
        h.backbone.compatible(self.backbone.id())
            && ours == theirs
            && h.examples.len() == s.examples.len()
    }

    /// Deletes frames that no committed example refers to, and leftovers of interrupted deletes.
    fn remove_orphans(&self) -> Result<(), KioskError> {
        let keep: BTreeSet<_> = self
            .set
            .examples
            .iter()
            .filter_map(|e| frame_key(&e.path))
            .collect();
        // Without a committed example file nothing proves a frame is an orphan (it may have
        // been deleted by hand): keep them all.
        let proven = self.examples_file().exists();
        // Temp files of writes a power cut interrupted.
        for entry in std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(".restore-") {
                // A restore's unpacked archive, never committed.
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
                continue;
            }
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".graft-tmp-")
            {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        let frames = self.frames_dir();
        for entry in std::fs::read_dir(&frames).map_err(io(&frames))?.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(".trash-") {
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
                continue;
            }
            if !p.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&p).map_err(io(&p))?.flatten() {
                let fp = f.path();
                let orphan = frame_key(&fp).is_some_and(|k| !keep.contains(&k));
                if orphan && !proven {
                    log::warn!(
                        "{}: not in any example file; kept (no examples.jsonl to check it against)",
                        fp.display()
                    );
                } else if orphan {
                    log::warn!("removing {} (not in the committed examples)", fp.display());
                    std::fs::remove_file(&fp).map_err(io(&fp))?;
                }
            }
        }
        Ok(())
    }

    fn write_examples(&self) -> Result<(), StoreError> {
        let file = EmbeddingFile {
            backbone: self.backbone.id().clone(),
            records: self
                .set
                .examples
                .iter()
                .map(|e| Record {
                    label: Some(self.set.labels[e.label].clone()),
                    path: e
                        .path
                        .strip_prefix(&self.dir)
                        .map_or_else(|_| e.path.clone(), Path::to_path_buf),
                    sha256: e.sha256.clone(),
                    embedding: e.embedding.clone(),
                })
                .collect(),
        };
        embeddings::write(&self.examples_file(), &file)
    }

    /// Adds frames as examples of `label` (saved as JPEGs, embedded) and refits.
    pub fn learn(&mut self, label: &Label, frames: &[Frame]) -> Result<Learned, KioskError> {
        let (added, job) = self.learn_begin(label, frames)?;
        self.install(job.run())?;
        Ok(self.learned(label, added))
    }

    /// The first part of [`learn`](Kiosk::learn): saves, embeds and commits the examples
    /// (`examples.jsonl`); returns how many were added and the refit to run, on any thread,
    /// before [`install`](Kiosk::install). Until then the kiosk classifies with its previous
    /// head.
    pub fn learn_begin(
        &mut self,
        label: &Label,
        frames: &[Frame],
    ) -> Result<(usize, FitJob), KioskError> {
        let mut saver =
            FrameSaver::new(&self.frames_dir().join(label.as_str()), label, JPEG_QUALITY)?;
        let mut saved: Vec<PathBuf> = Vec::with_capacity(frames.len());
        // Frames saved but not kept (a failure, or the same picture already an example) are
        // removed now; if the process dies first, at the next start.
        let drop_unused = |saved: &[PathBuf], keep: &ExampleSet| {
            for p in saved {
                if !keep.examples.iter().any(|e| &e.path == p) {
                    if let Err(e) = std::fs::remove_file(p) {
                        log::warn!("{}: {e}", p.display());
                    }
                }
            }
        };
        let mut new = Vec::with_capacity(frames.len());
        for f in frames {
            let embedded = saver.save(&f.image, &f.name).and_then(|s| {
                saved.push(s.path.clone());
                Ok(s.embed(&self.backbone)?)
            });
            match embedded {
                Ok(n) => new.push(n),
                Err(e) => {
                    drop_unused(&saved, &self.set);
                    return Err(e.into());
                }
            }
        }
        let result = learn::commit_new(self, label, new);
        drop_unused(&saved, &self.set);
        let (added, _) = result?;
        let kind = self.head_kind();
        Ok((added, learn::fit_job(self, kind)))
    }

    /// What a LEARN of `label` that added `added` examples reports (after its refit).
    pub fn learned(&self, label: &Label, added: usize) -> Learned {
        let id = self.set.labels.iter().position(|l| label == l);
        Learned {
            added,
            examples: self
                .set
                .examples
                .iter()
                .filter(|e| Some(e.label) == id)
                .count(),
            classes: self.set.labels.len(),
            trained: self.head.is_some(),
        }
    }

    /// Commits the result of a refit started by [`learn_begin`](Kiosk::learn_begin),
    /// [`train_begin`](Kiosk::train_begin) or [`forget_begin`](Kiosk::forget_begin). No other
    /// change may come between the two.
    pub fn install(&mut self, fitted: Result<Fitted, LearnError>) -> Result<(), KioskError> {
        learn::install(self, fitted?)?;
        Ok(())
    }

    /// Refits choosing the head type by cross-validation.
    pub fn train(&mut self) -> Result<TrainedInfo, KioskError> {
        let job = self.train_begin()?;
        self.install(job.run())?;
        self.trained_info()
    }

    /// The refit of TRAIN (choosing the kind afresh), to run before [`install`](Kiosk::install).
    pub fn train_begin(&mut self) -> Result<FitJob, KioskError> {
        if self.set.labels.len() < 2 {
            return Err(KioskError::NoHead {
                have: self.set.labels.len(),
            });
        }
        Ok(learn::fit_job(self, None))
    }

    /// What TRAIN reports about the head in use.
    pub fn trained_info(&self) -> Result<TrainedInfo, KioskError> {
        let h = self.head.as_ref().ok_or(KioskError::NoHead { have: 0 })?;
        Ok(TrainedInfo {
            kind: h.head.kind,
            cv_accuracy: h.cv_accuracy.unwrap_or(0.0),
            threshold: h.head.threshold,
        })
    }

    /// Removes a class and its examples; returns how many examples went.
    pub fn forget(&mut self, label: &Label) -> Result<usize, KioskError> {
        let (removed, job) = self.forget_begin(label)?;
        self.install(job.run())?;
        Ok(removed)
    }

    /// The first part of [`forget`](Kiosk::forget): commits the examples without the class,
    /// deletes its frames; returns how many examples went and the refit to run.
    pub fn forget_begin(&mut self, label: &Label) -> Result<(usize, FitJob), KioskError> {
        let kept = self.set.clone();
        let removed = self
            .set
            .remove(label.as_str())
            .ok_or_else(|| KioskError::NoClass(label.to_string()))?;
        if let Err(e) = self.write_examples() {
            self.set = kept;
            return Err(e.into());
        }
        self.intents.push(Intent::Forget(label.to_string()));
        self.remove_frames_folder(label.as_str())?;
        let kind = self.head_kind();
        Ok((removed, learn::fit_job(self, kind)))
    }

    /// Renames a class: its frames move to `examples/<to>/` and the examples are committed
    /// under the new name; returns the refit to run (the head's class names follow).
    ///
    /// Crash-safe like every change: the frames are linked (or copied) into the new folder
    /// first, `examples.jsonl` is the commit point, the old folder goes last; whichever side a
    /// power cut leaves is removed at the next start as frames no committed example names.
    pub fn rename_begin(&mut self, from: &Label, to: &Label) -> Result<FitJob, KioskError> {
        let Some(id) = self.set.labels.iter().position(|l| from == l) else {
            return Err(KioskError::NoClass(from.to_string()));
        };
        if self.set.labels.iter().any(|l| to == l) {
            return Err(KioskError::ClassExists(to.to_string()));
        }
        let new_dir = self.frames_dir().join(to.as_str());
        std::fs::create_dir_all(&new_dir).map_err(io(&new_dir))?;
        let kept = self.set.clone();
        for e in self.set.examples.iter_mut().filter(|e| e.label == id) {
            let Some(name) = e.path.file_name() else {
                continue;
            };
            let dest = new_dir.join(name);
            if e.path.exists() && !dest.exists() && std::fs::hard_link(&e.path, &dest).is_err() {
                std::fs::copy(&e.path, &dest).map_err(io(&dest))?;
            }
            e.path = dest;
        }
        self.set.labels[id] = to.to_string();
        if let Err(e) = self.write_examples() {
            self.set = kept;
            return Err(e.into());
        }
        self.intents
            .push(Intent::Rename(from.to_string(), to.to_string()));
        self.remove_frames_folder(from.as_str())?;
        let kind = self.head_kind();
        Ok(learn::fit_job(self, kind))
    }

    /// Removes one example of `label` (its frame file `file`); returns how many examples the
    /// class has left and the refit to run. The class goes when its last example does.
    pub fn delete_example_begin(
        &mut self,
        label: &Label,
        file: &str,
    ) -> Result<(usize, FitJob), KioskError> {
        let Some(id) = self.set.labels.iter().position(|l| label == l) else {
            return Err(KioskError::NoClass(label.to_string()));
        };
        let Some(i) = self
            .set
            .examples
            .iter()
            .position(|e| e.label == id && e.path.file_name().is_some_and(|n| n == file))
        else {
            return Err(KioskError::NoExample {
                label: label.to_string(),
                file: file.to_string(),
            });
        };
        let kept = self.set.clone();
        let gone = self.set.examples.remove(i);
        self.set.compact();
        if let Err(e) = self.write_examples() {
            self.set = kept;
            return Err(e.into());
        }
        if let Err(e) = std::fs::remove_file(&gone.path) {
            // Removed at the next start as an orphan.
            log::warn!("{}: {e}", gone.path.display());
        }
        let left = self
            .set
            .labels
            .iter()
            .position(|l| label == l)
            .map_or(0, |i| self.counts()[i]);
        let kind = self.head_kind();
        Ok((left, learn::fit_job(self, kind)))
    }

    /// The kiosk's examples, frames and settings as a tar archive (see [`backup`]); not the
    /// head (derived, retrained on restore) nor the secret (a backup is not a key).
    pub fn backup(&self) -> Result<Vec<u8>, KioskError> {
        let mut files = vec![("examples.jsonl".to_string(), self.examples_file())];
        if self.settings_file().exists() {
            files.push(("settings.json".to_string(), self.settings_file()));
        }
        for e in &self.set.examples {
            if let (Some(name), true) = (e.path.file_name(), e.path.exists()) {
                let label = &self.set.labels[e.label];
                files.push((
                    format!("examples/{label}/{}", name.to_string_lossy()),
                    e.path.clone(),
                ));
            }
        }
        if !self.examples_file().exists() {
            return Err(KioskError::NoHead { have: 0 });
        }
        Ok(backup::pack(&files)?)
    }

    /// Replaces every example and the settings with those of a backup made by
    /// [`backup`](Kiosk::backup); returns the examples restored and the refit to run.
    ///
    /// The archive is unpacked into a folder of its own and checked first (names, sizes, the
    /// backbone its embeddings were made with, every frame present, the labels, the settings);
    /// a bad one changes nothing. Then the frames move in under fresh names, `examples.jsonl`
    /// is replaced (the commit point), and the old frames go as orphans: a power cut at any
    /// point leaves either the old state or the restored one.
    pub fn restore_begin(&mut self, archive: &[u8]) -> Result<(usize, FitJob), KioskError> {
        let stamp = unix_ms();
        let staging = self.dir.join(format!(".restore-{stamp}"));
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let result = self.restore_from(archive, &staging, stamp);
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            log::warn!("{}: {e}", staging.display());
        }
        result
    }

    fn restore_from(
        &mut self,
        archive: &[u8],
        staging: &Path,
        stamp: u128,
    ) -> Result<(usize, FitJob), KioskError> {
        let what = Path::new("the backup");
        let bad = |reason: String| KioskError::BadBackup(reason);
        backup::unpack(archive, staging, what).map_err(|e| bad(e.to_string()))?;
        let file = embeddings::read(&staging.join("examples.jsonl"))
            .map_err(|e| bad(format!("its examples.jsonl: {e}")))?;
        self.backbone
            .id()
            .check_file(&file.backbone, what)
            .map_err(|e| bad(e.to_string()))?;
        let settings = Settings::read(&staging.join("settings.json"))
            .map_err(|e| bad(format!("its settings.json: {e}")))?;
        let mut set = ExampleSet::default();
        let mut moves = Vec::new();
        for r in file.records {
            let label = r.label.as_deref().unwrap_or("");
            let label = Label::new(label).map_err(|e| bad(e.to_string()))?;
            let name = r
                .path
                .file_name()
                .ok_or_else(|| bad(format!("{}: not a frame", r.path.display())))?;
            let from = staging.join("examples").join(label.as_str()).join(name);
            // An example another kiosk of the fleet learnt has no frame (`ORIGIN~FILE`).
            let frameless = name.to_string_lossy().contains('~');
            if !from.is_file() && !frameless {
                return Err(bad(format!(
                    "examples/{label}/{} is not in the archive",
                    name.to_string_lossy()
                )));
            }
            let to = if frameless && !from.is_file() {
                self.frames_dir().join(label.as_str()).join(name)
            } else {
                self.frames_dir()
                    .join(label.as_str())
                    .join(format!("r{stamp}-{}", name.to_string_lossy()))
            };
            let id = match set.labels.iter().position(|l| label == *l) {
                Some(i) => i,
                None => {
                    set.labels.push(label.to_string());
                    set.labels.len() - 1
                }
            };
            set.examples.push(Example {
                label: id,
                path: to.clone(),
                sha256: r.sha256,
                embedding: r.embedding,
            });
            if from.is_file() {
                moves.push((from, to));
            }
        }
        for (from, to) in &moves {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::rename(from, to).map_err(io(to))?;
        }
        let kept = std::mem::replace(&mut self.set, set);
        if let Err(e) = self.write_examples() {
            self.set = kept;
            for (_, to) in &moves {
                let _ = std::fs::remove_file(to);
            }
            return Err(e.into());
        }
        // Committed. The old frames are orphans now; the settings follow.
        self.remove_orphans()?;
        match settings.threshold {
            Some(t) => self.set_threshold(t)?,
            None => {
                self.settings = Settings::default();
                if self.settings_file().exists() {
                    std::fs::remove_file(self.settings_file())
                        .map_err(io(&self.settings_file()))?;
                }
            }
        }
        let n = self.set.examples.len();
        Ok((n, learn::fit_job(self, None)))
    }

    /// The label-level changes (FORGET, rename) made since the last call, for a fleet.
    pub fn take_intents(&mut self) -> Vec<Intent> {
        std::mem::take(&mut self.intents)
    }

    /// The examples as a fleet compares them.
    pub fn held(&self) -> Vec<Held<'_>> {
        self.set
            .examples
            .iter()
            .map(|e| Held {
                label: &self.set.labels[e.label],
                sha256: &e.sha256,
                file: e.path.file_name().and_then(|n| n.to_str()).unwrap_or(""),
                embedding: &e.embedding,
            })
            .collect()
    }

    /// Makes the examples those of the fleet (`view`, [`Replica::view`](super::replica::Replica::view)):
    /// an example held already keeps its frame and exact embedding (also when the fleet moved
    /// it to another class); one from another kiosk has no frame (examples travel, photos do
    /// not) and is named `ORIGIN~FILE`. Commits `examples.jsonl` and returns the refit to run,
    /// or `None` when nothing changed.
    pub fn fleet_apply_begin(
        &mut self,
        view: &[Visible<'_>],
        me: &str,
    ) -> Result<Option<FitJob>, KioskError> {
        let s = &self.set;
        let mut by_key: HashMap<(&str, &str), &Example> = HashMap::new();
        let mut by_frame: HashMap<(&str, &std::ffi::OsStr), &Example> = HashMap::new();
        for e in &s.examples {
            by_key.insert((&s.labels[e.label], &e.sha256), e);
            if let Some(n) = e.path.file_name() {
                by_frame.insert((&e.sha256, n), e);
            }
        }
        let mut labels: Vec<String> = s
            .labels
            .iter()
            .filter(|l| view.iter().any(|v| v.label == l.as_str()))
            .cloned()
            .collect();
        for v in view {
            if !labels.iter().any(|l| l == v.label) {
                labels.push(v.label.to_string());
            }
        }
        let mut examples = Vec::with_capacity(view.len());
        let mut same = view.len() == s.examples.len();
        for v in view {
            let sha = super::wire::hex(v.sha256);
            let label = labels.iter().position(|l| l == v.label).unwrap_or(0);
            let name = if v.origin == me {
                v.file.to_string()
            } else {
                format!("{}~{}", v.origin, v.file)
            };
            let held = by_key.get(&(v.label, sha.as_str())).copied();
            same &= held.is_some();
            let e = match held.or_else(|| {
                by_frame
                    .get(&(sha.as_str(), std::ffi::OsStr::new(&name)))
                    .copied()
            }) {
                Some(e) => Example { label, ..e.clone() },
                None => Example {
                    label,
                    path: self.frames_dir().join(v.label).join(&name),
                    sha256: sha,
                    embedding: v.embedding.to_vec(),
                },
            };
            examples.push(e);
        }
        if same {
            return Ok(None);
        }
        let kept = std::mem::replace(&mut self.set, ExampleSet { labels, examples });
        if let Err(e) = self.write_examples() {
            self.set = kept;
            return Err(e.into());
        }
        self.remove_orphans()?;
        let kind = self.head_kind();
        Ok(Some(learn::fit_job(self, kind)))
    }

    /// Every class with the file names of its examples' frames, in head order.
    pub fn examples(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .set
            .labels
            .iter()
            .map(|l| (l.clone(), Vec::new()))
            .collect();
        for e in &self.set.examples {
            if let Some(name) = e.path.file_name() {
                out[e.label].1.push(name.to_string_lossy().into_owned());
            }
        }
        out
    }

    /// The frame file of a committed example of `label` named `file` (never any other path:
    /// the name is looked up among the examples, not joined onto a folder).
    pub fn example_frame(&self, label: &Label, file: &str) -> Result<&Path, KioskError> {
        let id = self.set.labels.iter().position(|l| label == l);
        self.set
            .examples
            .iter()
            .find(|e| Some(e.label) == id && e.path.file_name().is_some_and(|n| n == file))
            .map(|e| e.path.as_path())
            .ok_or_else(|| KioskError::NoExample {
                label: label.to_string(),
                file: file.to_string(),
            })
    }

    /// Deletes a class's frame folder: renamed to `.trash-*` first (one atomic step), so a
    /// delete a power cut interrupts is finished at the next start, not left half done.
    fn remove_frames_folder(&self, label: &str) -> Result<(), KioskError> {
        let folder = self.frames_dir().join(label);
        if folder.exists() {
            let trash = self
                .frames_dir()
                .join(format!(".trash-{label}-{}", unix_ms()));
            std::fs::rename(&folder, &trash).map_err(io(&folder))?;
            std::fs::remove_dir_all(&trash).map_err(io(&trash))?;
        }
        Ok(())
    }

    /// Sets the rejection threshold (kept across retraining) and rewrites the head.
    ///
    /// `settings.json` is the commit point: if it cannot be written nothing changes; the head
    /// file follows when it can (at the next start the setting is applied again).
    pub fn set_threshold(&mut self, t: f32) -> Result<(), KioskError> {
        let mut settings = self.settings.clone();
        settings.threshold = Some(t);
        let bytes = serde_json::to_vec(&settings)
            .map_err(|e| StoreError::format(&self.settings_file(), e.to_string()))?;
        write_atomic(&self.settings_file(), |w| w.write_all(&bytes))?;
        self.settings = settings;
        if let Some(mut h) = self.head.take() {
            h.head.threshold = t;
            self.keep_head(h);
        }
        Ok(())
    }

    /// Makes `h` the current head and writes it if the disk allows (see the module docs).
    fn keep_head(&mut self, h: HeadFile) {
        let path = self.head_file();
        match headfile::write(&path, &h) {
            Ok(()) => self.head_unsaved = false,
            Err(e) => {
                log::warn!(
                    "{e}: the new head is used from memory and retrained from the examples at the next start"
                );
                self.head_unsaved = true;
            }
        }
        self.head = Some(h);
    }

    /// Whether the head in use is not (yet) the one on disk (a full disk, see the module docs).
    pub fn head_unsaved(&self) -> bool {
        self.head_unsaved
    }

    /// Writes the example file and head again (everything is already committed after each
    /// change; this is for hosts that want an explicit checkpoint).
    pub fn save(&mut self) -> Result<(), KioskError> {
        self.write_examples()?;
        if let Some(h) = &self.head {
            headfile::write(&self.head_file(), h)?;
            self.head_unsaved = false;
        }
        Ok(())
    }

    /// Forgets everything: examples, frames, head, settings.
    pub fn reset(&mut self) -> Result<(), KioskError> {
        let before = std::mem::take(&mut self.set);
        if let Err(e) = self.write_examples() {
            self.set = before;
            return Err(e.into());
        }
        self.settings = Settings::default();
        learn::refit(self, None)?;
        if self.settings_file().exists() {
            std::fs::remove_file(self.settings_file()).map_err(io(&self.settings_file()))?;
        }
        self.remove_orphans()?;
        let frames = self.frames_dir();
        for entry in std::fs::read_dir(&frames).map_err(io(&frames))?.flatten() {
            if entry.path().is_dir() {
                std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
            }
        }
        Ok(())
    }

    /// Classifies one frame.
    pub fn classify(&self, frame: &Frame) -> Result<Classified, KioskError> {
        let h = self.head.as_ref().ok_or(KioskError::NoHead {
            have: self.set.labels.len(),
        })?;
        Ok(live::classify(&self.backbone, &h.head, frame, None)?)
    }

    /// Class names, in head order.
    pub fn labels(&self) -> &[String] {
        &self.set.labels
    }

    /// Examples per class.
    pub fn counts(&self) -> Vec<usize> {
        self.set.counts()
    }

    /// The trained head, if any.
    pub fn head(&self) -> Option<&HeadFile> {
        self.head.as_ref()
    }

    /// The backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// The backbone, shared with a thread that classifies beside the request queue.
    pub fn shared_backbone(&self) -> std::sync::Arc<Backbone> {
        std::sync::Arc::clone(&self.backbone)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `DIR/examples.jsonl`, the commit point of a data folder.
fn examples_path(dir: &Path) -> PathBuf {
    dir.join("examples.jsonl")
}

/// The kiosk's data folder as an example store: `examples.jsonl` is the commit point,
/// `head.graft` the head trained on it (with the THRESHOLD setting applied).
impl ExampleStore for Kiosk {
    fn backbone(&self) -> &BackboneId {
        self.backbone.id()
    }
    fn set(&mut self) -> &mut ExampleSet {
        &mut self.set
    }
    fn head_kind(&self) -> Option<HeadKind> {
        self.head.as_ref().map(|h| h.head.kind)
    }
    fn threshold_override(&self) -> Option<f32> {
        self.settings.threshold
    }
    /// The defaults, with the backbone's top block for a kiosk cut before it (`NAME:top`).
    fn params(&self) -> HeadParams {
        HeadParams {
            top: self.backbone.top_block().cloned().map(std::sync::Arc::new),
            ..HeadParams::default()
        }
    }
    fn commit_examples(&mut self) -> Result<(), StoreError> {
        self.write_examples()
    }
    /// Never fails: the head is derived from the committed examples, so one that cannot be
    /// written is kept in memory (and retrained at the next start), see the module docs.
    fn commit_head(&mut self, head: Option<HeadFile>) -> Result<(), StoreError> {
        let path = self.head_file();
        match head {
            Some(h) => self.keep_head(h),
            None => {
                self.head = None;
                self.head_unsaved = false;
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        log::warn!("{}: {e}", path.display());
                        self.head_unsaved = true;
                    }
                }
            }
        }
        Ok(())
    }
}
