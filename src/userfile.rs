//! Opening the files a user names: pictures, head files, manifests, model files, exports,
//! embedding files. One check runs before any of them is opened: the path (links followed)
//! must be a regular file. Opening a FIFO for reading waits for a writer that may never come,
//! and a character device such as `/dev/zero` never ends; given by mistake, either would hang
//! graft or fill its memory. They are refused with an error that says what the path is.
//!
//! The functions return `std::io::Error`, so each module wraps them in its own error type with
//! the path, as it does for any other read failure. The check is made on the path just before
//! opening it; a file swapped for a FIFO in between is not caught (no portable way to open
//! without blocking first).

use std::fs::{File, FileType, Metadata};
use std::io;
use std::path::Path;

/// The metadata of `path` (links followed) if it is a regular file; otherwise an error of kind
/// [`io::ErrorKind::InvalidInput`] saying what it is instead (a folder, a FIFO, a device...).
pub fn check(path: &Path) -> io::Result<Metadata> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(meta);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file but {}", describe(&meta.file_type())),
    ))
}

/// [`check`], then opens the file for reading.
pub fn open(path: &Path) -> io::Result<File> {
    check(path)?;
    File::open(path)
}

/// [`check`], then reads the whole file.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    check(path)?;
    std::fs::read(path)
}

/// [`check`], then reads the whole file as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    check(path)?;
    std::fs::read_to_string(path)
}

/// What a file type is, in words.
pub fn describe(t: &FileType) -> &'static str {
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    "not a file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f.txt");
        std::fs::write(&file, b"hi").unwrap();
        assert_eq!(read(&file).unwrap(), b"hi");
        assert_eq!(read_to_string(&file).unwrap(), "hi");
        // Through a link too.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read(&link).unwrap(), b"hi");

        let cases: [(&Path, &str); 2] = [
            (d.path(), "a folder"),
            (Path::new("/dev/null"), "a character device"),
        ];
        for (p, what) in cases {
            let e = read(p).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p:?}");
            assert!(e.to_string().contains(what), "{p:?}: {e}");
            assert!(open(p).is_err() && read_to_string(p).is_err());
        }
        let missing = d.path().join("nope");
        assert_eq!(read(&missing).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pipe.jpg");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Before the check this read blocked for ever: no writer ever opens the FIFO.
        let e = read(&fifo).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }
}
