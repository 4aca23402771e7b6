//! Files graft writes and reads back, and the workflows that change them: head files
//! (`headfile`), embedding files (`embeddings`), the embedding cache (`cache`), image folders
//! (`files`, `dataset`), and adding examples to a head or a kiosk (`learn`, the one place an
//! example is added). Every write is atomic: temp file in the same folder, fsync, rename, fsync
//! of the folder — a power cut leaves either the old file or the new one, never half.

pub mod backup;
pub mod cache;
pub mod dataset;
pub mod embeddings;
pub mod export;
pub mod files;
pub mod headfile;
pub mod learn;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of the store: which file, and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not what graft wrote, is damaged, or is of a newer format.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file or folder.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file is well formed but holds a head or examples graft cannot use (a value out of
    /// range: see [`crate::Head::validate`]).
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which field, and why.
        #[source]
        source: crate::head::HeadError,
    },
}

impl StoreError {
    /// Whether this is a full disk (or an exhausted quota): nothing was written, and retrying
    /// after freeing space will work.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::StorageFull
                || source.kind() == std::io::ErrorKind::QuotaExceeded)
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn invalid(path: &Path, source: crate::head::HeadError) -> Self {
        StoreError::Invalid {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn format(path: &Path, reason: impl Into<String>) -> Self {
        StoreError::Format {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// An advisory lock (`flock`) on a folder, held until dropped: one writer at a time for the
/// head files of a folder (`graft add`, `capture --add-to`) and for a kiosk data folder.
/// Readers need none: every write is an atomic rename.
#[derive(Debug)]
pub struct FolderLock {
    _file: std::fs::File,
}

impl FolderLock {
    fn open(dir: &Path) -> Result<std::fs::File, StoreError> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir).map_err(|e| StoreError::io(dir, e))
    }

    /// Waits for the lock on `dir` (saying so when another process holds it).
    pub fn acquire(dir: &Path) -> Result<FolderLock, StoreError> {
        let file = FolderLock::open(dir)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                log::info!(
                    "{}: another graft is writing here; waiting for it",
                    dir.display()
                );
                file.lock().map_err(|e| StoreError::io(dir, e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io(dir, e)),
        }
        Ok(FolderLock { _file: file })
    }

    /// The lock on `dir` if nobody holds it, `None` if another process does.
    pub fn try_acquire(dir: &Path) -> Result<Option<FolderLock>, StoreError> {
        let file = FolderLock::open(dir)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FolderLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::io(dir, e)),
        }
    }
}

/// With the test-only feature `fault-injection`: environment variable naming a pause
/// (milliseconds) that [`write_atomic`] takes half-way through writing its temp file, so the
/// tests can kill a writer mid-write. A build without the feature never reads it.
#[cfg(feature = "fault-injection")]
pub const FAULT_PAUSE_ENV: &str = "GRAFT_FAULT_PAUSE_MS";

/// The pause [`FAULT_PAUSE_ENV`] asks for (fault-injection builds only).
#[cfg(feature = "fault-injection")]
fn fault_pause() -> Option<std::time::Duration> {
    std::env::var(FAULT_PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

#[cfg(not(feature = "fault-injection"))]
fn fault_pause() -> Option<std::time::Duration> {
    None
}

/// With the test-only feature `fault-injection`: environment variable naming a pause
/// (milliseconds) that every refit ([`learn::FitJob::run`]) takes, so the tests can see what a
/// kiosk does while a slow fit runs.
#[cfg(feature = "fault-injection")]
pub const FAULT_FIT_ENV: &str = "GRAFT_FAULT_FIT_MS";

#[cfg(feature = "fault-injection")]
pub(crate) fn fault_fit_pause() {
    if let Some(ms) = std::env::var(FAULT_FIT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(not(feature = "fault-injection"))]
pub(crate) fn fault_fit_pause() {}

/// With the test-only feature `fault-injection`: environment variable naming a file; while that
/// file exists, [`write_atomic`] fails half-way through its temp file with "no space left on
/// device", as on a full disk (the tests fill and free the "disk" by creating and deleting it).
/// When the file holds text, only writes of paths containing it fail.
#[cfg(feature = "fault-injection")]
pub const FAULT_FULL_ENV: &str = "GRAFT_FAULT_FULL";

#[cfg(feature = "fault-injection")]
fn fault_full(path: &Path) -> Option<std::io::Error> {
    let flag = std::env::var_os(FAULT_FULL_ENV)?;
    let only = std::fs::read_to_string(flag).ok()?;
    let only = only.trim();
    (only.is_empty() || path.to_string_lossy().contains(only))
        .then(|| std::io::Error::from(std::io::ErrorKind::StorageFull))
}

#[cfg(not(feature = "fault-injection"))]
fn fault_full(_: &Path) -> Option<std::io::Error> {
    None
}
/// The name every temp file of [`write_atomic`] starts with.
pub const TEMP_PREFIX: &str = ".graft-tmp-";

/// How old an unlocked temp file must be to count as a dead writer's. A writer locks its temp
/// file right after creating it, so the only unlocked temp file of a live writer is one created
/// microseconds ago; a minute is a wide margin for that gap.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Writes `path` atomically: `write` produces the bytes, which go to a temp file beside `path`
/// that is fsynced and renamed over it; then the folder is fsynced so the rename itself survives
/// a power cut. A crash at any point leaves the old file or the new one, never a mix.
///
/// The temp file is locked (`flock`) while it is written, and the folder is cleared first of
/// temp files a killed writer left ([`remove_stale_temps`]).
pub fn write_atomic<F>(path: &Path, write: F) -> Result<(), StoreError>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |e| StoreError::io(path, e);
    let mut bytes = Vec::new();
    write(&mut bytes).map_err(io)?;
    remove_stale_temps(&dir);
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(&dir)
        .map_err(io)?;
    // The lock says "a writer is alive" to remove_stale_temps in other processes; the kernel
    // drops it when this process dies, however it dies. A filesystem without locks gets no lock,
    // and then no temp file there is ever provably stale: none is removed.
    let _ = tmp.as_file().try_lock();
    let (first, second) = bytes.split_at(bytes.len() / 2);
    tmp.as_file_mut().write_all(first).map_err(io)?;
    if let Some(full) = fault_full(path) {
        return Err(io(full));
    }
    if let Some(pause) = fault_pause() {
        tmp.as_file().sync_all().map_err(io)?;
        std::thread::sleep(pause);
    }
    tmp.as_file_mut().write_all(second).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    // Make the rename durable. Not every filesystem allows opening a directory; ignore that.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes the temp files of [`write_atomic`] in `dir` that are provably stale: older than a
/// minute and not locked, so no live writer holds them (a writer killed with `kill -9` or by a
/// power cut leaves its temp file; the kernel released its lock). A live writer's temp file is
/// never touched, whatever its age. Failures only log: cleaning never stops a write.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(TEMP_PREFIX.as_bytes())
        {
            continue;
        }
        // Held until the file is gone.
        let Some(_lock) = stale_lock(&p) else {
            continue;
        };
        match std::fs::remove_file(&p) {
            Ok(()) => log::info!("removed {}, left by an interrupted write", p.display()),
            Err(e) => log::warn!("cannot remove stale temp file {}: {e}", p.display()),
        }
    }
}

/// The file's lock, if `p` is a regular file (not followed through a link), older than
/// [`STALE_AFTER`], and no process holds its lock. The caller holds the returned lock until it
/// has removed the file (it is released when the handle drops), so no writer can take the file
/// over in between.
fn stale_lock(p: &Path) -> Option<std::fs::File> {
    let meta = std::fs::symlink_metadata(p).ok()?;
    let old = meta
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age >= STALE_AFTER);
    if !meta.is_file() || !old {
        return None;
    }
    let f = std::fs::File::open(p).ok()?;
    f.try_lock().ok()?;
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
            })
            .collect();
        v.sort();
        v
    }

    fn backdate(p: &Path) {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn only_stale_unlocked_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let make = |name: &str| {
            let p = d.join(format!("{TEMP_PREFIX}{name}"));
            std::fs::write(&p, b"half").unwrap();
            p
        };
        let dead = make("dead");
        backdate(&dead);
        let fresh = make("fresh"); // unlocked but new: could be a writer about to lock it
        let live = make("live");
        backdate(&live);
        let holder = std::fs::File::open(&live).unwrap();
        holder.lock().unwrap(); // a writer in the middle of its write (a second handle: flock
                                // locks are per open file, so this excludes our own try_lock)
        let other = d.join("notes.txt");
        std::fs::write(&other, b"x").unwrap();
        backdate(&other);

        write_atomic(&d.join("head.graft"), |w| w.write_all(b"new")).unwrap();
        assert_eq!(temp_files(d), vec![fresh.clone(), live.clone()]);
        assert!(other.exists());
        drop(holder); // the writer dies: its lock goes with it
                      // ... once no process holds a copy of its descriptor: another test's child process
                      // does for the moment between its fork and its exec (1 run in 4 failed here), so the
                      // sweep is tried again for up to 5 s.
        let start = std::time::Instant::now();
        loop {
            remove_stale_temps(d);
            if temp_files(d) == vec![fresh.clone()] || start.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(temp_files(d), vec![fresh]);
    }

    #[test]
    fn atomic_write_replaces_and_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        write_atomic(&p, |w| w.write_all(b"one")).unwrap();
        write_atomic(&p, |w| w.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let err = write_atomic(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk on fire"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp file left behind");
    }
}
