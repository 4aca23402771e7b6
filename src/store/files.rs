//! Finding image files (explicit paths, and folders walked recursively in sorted order, so every
//! run and every board sees the same files in the same order), hashing them, and what their
//! names say: which object a photo shows ([`group_key`]).

use std::path::{Path, PathBuf};

use super::StoreError;
use crate::backbone::preprocess::image_files_in;
use crate::backbone::BackboneError;

/// Expands files and folders into the list of image files. A file given explicitly is kept
/// whatever its extension (the decoder will say if it is not an image); folders contribute the
/// files with an image extension, recursively. A folder with no image in it is an error, and so
/// is a path that is not valid UTF-8 ([`utf8_path`]), found here before any picture is embedded.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
    let out = collect_any(paths)?;
    for p in &out {
        utf8_path(p)?;
    }
    Ok(out)
}

/// Refuses a path that is not valid UTF-8, naming the part that is not (with its bytes escaped).
/// Head files, embedding files and JSON output record picture paths as text, so such a name
/// cannot be stored faithfully; a rename fixes it for every command, while a lossy copy of the
/// name would point at a file that does not exist.
pub fn utf8_path(path: &Path) -> Result<(), StoreError> {
    if path.to_str().is_some() {
        return Ok(());
    }
    let bad = path
        .components()
        .map(|c| c.as_os_str())
        .find(|c| c.to_str().is_none())
        .unwrap_or(path.as_os_str());
    Err(StoreError::format(
        path,
        format!(
            "the name {bad:?} is not valid UTF-8; graft records picture paths as text (head \
             files, embedding files, JSON output): rename it"
        ),
    ))
}

/// The image files under a folder ([`image_files_in`], the one folder walk), possibly none.
pub(crate) fn images_in(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    image_files_in(dir).map_err(|e| match e {
        BackboneError::Io { path, source } => StoreError::Io { path, source },
        other => StoreError::format(dir, other.to_string()),
    })
}

fn collect_any(paths: &[PathBuf]) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| StoreError::io(p, e))?;
        if meta.is_dir() {
            let found = images_in(p)?;
            if found.is_empty() {
                return Err(StoreError::format(
                    p,
                    format!(
                        "folder contains no images (looked for {})",
                        crate::backbone::preprocess::IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The group an image belongs to, for splits that keep near-duplicates together: the file stem
/// without a trailing `_<digits>` (so `owl_0.jpg` and `owl_1.jpg`, two shots of one object, are
/// one group).
pub fn group_key(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    match stem.rsplit_once('_') {
        Some((head, tail)) if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) => {
            head.to_string()
        }
        _ => stem.to_string(),
    }
}

/// sha256 of a file's bytes, lowercase hex.
pub fn file_sha256(path: &Path) -> Result<String, StoreError> {
    let bytes = crate::userfile::read(path).map_err(|e| StoreError::io(path, e))?;
    Ok(crate::backbone::sha256_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys() {
        for (p, want) in [
            ("a/owl_0.jpg", "owl"),
            ("owl_12.png", "owl"),
            ("my_owl.jpg", "my_owl"),
            ("x_.jpg", "x_"),
            ("plain.jpg", "plain"),
        ] {
            assert_eq!(group_key(Path::new(p)), want, "{p}");
        }
    }

    #[test]
    fn walks_sorted_recursively_skipping_hidden_and_non_images() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for f in [
            "b/2.JPG",
            "b/1.png",
            "a.jpeg",
            ".hidden/x.jpg",
            "b/notes.txt",
            "c/.x.png",
        ] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let got = collect_images(&[root.to_path_buf()]).unwrap();
        let rel: Vec<_> = got
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            rel,
            vec![PathBuf::from("a.jpeg"), "b/1.png".into(), "b/2.JPG".into()]
        );
    }

    #[test]
    fn names_that_are_not_utf8_are_refused_with_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let odd = d.path().join(std::ffi::OsStr::from_bytes(b"\xff\xfe.jpg"));
        std::fs::write(&odd, b"x").unwrap();
        std::fs::write(d.path().join("fine.jpg"), b"x").unwrap();
        for given in [d.path().to_path_buf(), odd.clone()] {
            let err = collect_images(&[given]).unwrap_err().to_string();
            assert!(
                err.contains(r#""\xFF\xFE.jpg" is not valid UTF-8"#),
                "{err}"
            );
        }
        assert!(collect_images(&[d.path().join("fine.jpg")]).is_ok());
    }

    #[test]
    fn empty_folder_and_missing_path_are_errors() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("readme.txt"), b"x").unwrap();
        let err = collect_images(&[d.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no images"), "{err}");
        let err = collect_images(&[d.path().join("nope")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
