//! Backups of a kiosk's data folder as a plain tar archive (`examples.jsonl`, `settings.json`,
//! `examples/<label>/<frame>.jpg`): made in memory for a download, and unpacked — regular files
//! only, every name checked, sizes bounded — into a fresh folder for a restore to validate
//! before anything of the kiosk is touched.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::StoreError;

/// Bytes a backup may unpack to, in all.
pub const MAX_UNPACKED: u64 = 1 << 30;
/// Files a backup may hold.
pub const MAX_FILES: usize = 100_000;

/// A tar archive of `files`: each `(name in the archive, file on disk)`.
pub fn pack(files: &[(String, PathBuf)]) -> Result<Vec<u8>, StoreError> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for (name, path) in files {
        let bytes = crate::userfile::read(path).map_err(|e| StoreError::io(path, e))?;
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, bytes.as_slice())
            .map_err(|e| StoreError::io(path, e))?;
    }
    b.into_inner()
        .map_err(|e| StoreError::io(Path::new("backup"), e))
}

/// Whether `name` is a plain relative path of at most three parts, each a normal name.
fn safe(name: &Path) -> bool {
    let parts: Vec<Component<'_>> = name.components().collect();
    !parts.is_empty()
        && parts.len() <= 3
        && parts.iter().all(|c| match c {
            Component::Normal(s) => s
                .to_str()
                .is_some_and(|s| !s.is_empty() && !s.starts_with('.') && !s.contains('\\')),
            _ => false,
        })
}

/// Unpacks `archive` into the empty folder `into` (named `what` in errors): regular files only,
/// at most three path parts (`examples/<label>/<frame>`), no `..`, no absolute or hidden names,
/// no links, at most [`MAX_FILES`] files and [`MAX_UNPACKED`] bytes. Returns the names.
pub fn unpack(archive: &[u8], into: &Path, what: &Path) -> Result<Vec<String>, StoreError> {
    let bad = |reason: String| StoreError::format(what, reason);
    let mut a = tar::Archive::new(archive);
    let mut names = Vec::new();
    let mut total = 0u64;
    let entries = a
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("damaged archive: {e}")))?;
        let kind = entry.header().entry_type();
        let name: PathBuf = entry
            .path()
            .map_err(|e| bad(format!("bad name in the archive: {e}")))?
            .into_owned();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(bad(format!("{}: not a regular file", name.display())));
        }
        if !safe(&name) {
            return Err(bad(format!(
                "{}: not a name a backup holds",
                name.display()
            )));
        }
        let size = entry.header().size().map_err(|e| bad(e.to_string()))?;
        total += size;
        if total > MAX_UNPACKED || names.len() >= MAX_FILES {
            return Err(bad(format!(
                "more than {MAX_FILES} files or {} MB",
                MAX_UNPACKED >> 20
            )));
        }
        let dest = into.join(&name);
        if dest.exists() {
            return Err(bad(format!("{} twice", name.display())));
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        }
        let mut bytes = Vec::with_capacity(size.min(64 << 20) as usize);
        (&mut entry)
            .take(size)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{}: {e}", name.display())))?;
        std::fs::write(&dest, &bytes).map_err(|e| StoreError::io(&dest, e))?;
        names.push(name.to_string_lossy().into_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, bytes) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Written raw, so that hostile names reach the reader as given.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *bytes).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn round_trip_and_hostile_names() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("a.jpg");
        std::fs::write(&src, b"jpeg").unwrap();
        let packed = pack(&[("examples/cat/a.jpg".into(), src)]).unwrap();
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert_eq!(
            unpack(&packed, &out, Path::new("b.tar")).unwrap(),
            ["examples/cat/a.jpg"]
        );
        assert_eq!(
            std::fs::read(out.join("examples/cat/a.jpg")).unwrap(),
            b"jpeg"
        );
        for name in [
            "../escape",
            "/etc/passwd",
            "examples/../../x",
            ".hidden",
            "a/b/c/d",
        ] {
            let dir = t.path().join(format!("h{}", name.len()));
            std::fs::create_dir_all(&dir).unwrap();
            let e = unpack(&archive(&[(name, b"x")]), &dir, Path::new("h.tar"));
            assert!(e.is_err(), "{name} was unpacked");
        }
        assert!(unpack(b"not a tar at all, just bytes", &out, Path::new("x.tar")).is_err());
    }
}
