//! Frames in: the seam every live command reads from, with a camera, an image folder / glob /
//! single image, and frames held in memory behind it.
//!
//! Everything downstream (`graft capture`, `watch`, `serve`) takes [`Frame`]s from a
//! [`FrameSource`], so a folder of photos replays through exactly the path a camera uses. This is
//! the only module that touches nokhwa (in `camera.rs`, behind the `camera` feature).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backbone::{preprocess, BackboneError, RgbFrame};

#[cfg(feature = "camera")]
mod camera;
pub mod convert;

#[cfg(feature = "camera")]
pub use camera::CameraSource;
pub use convert::{to_rgb, PixelFormat};

/// Errors from frame sources.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// No camera at the index / path asked for.
    #[error("camera {wanted} not found (looked for {looked_for}); cameras present: {}", list_or_none(.present))]
    NoCamera {
        /// What was asked for (`0`, `/dev/video2`).
        wanted: String,
        /// Where graft looked.
        looked_for: String,
        /// The cameras that do exist.
        present: Vec<String>,
    },
    /// The device is open in another program.
    #[error("camera {device} is busy (open in another program?: `fuser {device}` shows which)")]
    Busy {
        /// Device path.
        device: String,
    },
    /// No permission to open the device.
    #[error("permission denied opening {device}: add the user to the `video` group (`sudo usermod -aG video $USER`, then log in again)")]
    PermissionDenied {
        /// Device path.
        device: String,
    },
    /// The camera cannot deliver the requested format.
    #[error("camera {device} does not offer {requested}; it supports: {}", list_or_none(.supported))]
    Unsupported {
        /// Device path.
        device: String,
        /// What was asked for.
        requested: String,
        /// What it offers (`YUYV 640x480@30`, ...).
        supported: Vec<String>,
    },
    /// The device went away mid-stream and did not come back in time.
    #[error("camera {device} was unplugged (or stopped answering) and did not come back within {waited_s} s: {reason}")]
    Unplugged {
        /// Device path.
        device: String,
        /// How long graft waited for it to reappear.
        waited_s: u64,
        /// The driver's last error.
        reason: String,
    },
    /// Any other camera driver failure.
    #[error("camera {device}: {message}")]
    Camera {
        /// Device path.
        device: String,
        /// The driver's message.
        message: String,
    },
    /// This binary was built without the `camera` feature.
    #[error("this graft was built without camera support: rebuild it with the `camera` feature, or read frames from images (a file, folder or glob) instead")]
    CameraDisabled,
    /// A pixel format name graft does not know.
    #[error("unknown pixel format {format:?}; known: {}", .known.join(", "))]
    UnknownFormat {
        /// The name given.
        format: String,
        /// The names graft knows.
        known: Vec<String>,
    },
    /// A frame buffer of the wrong size for its format.
    #[error("{format} frame {width}x{height}: expected at least {expected} bytes (even sizes for YUV), got {got}")]
    FrameSize {
        /// Format.
        format: PixelFormat,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A compressed frame that does not decode.
    #[error("{format} frame does not decode: {reason}")]
    Decode {
        /// Format.
        format: PixelFormat,
        /// Why.
        reason: String,
    },
    /// A path / glob that names no images.
    #[error("{pattern}: no images there (looked for {})", preprocess::IMAGE_EXTENSIONS.join(", "))]
    NoImages {
        /// The path or pattern given.
        pattern: String,
    },
    /// A glob pattern that does not parse.
    #[error("{pattern}: not a valid glob pattern: {reason}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// An image file of a folder source that cannot be read.
    #[error(transparent)]
    Image(#[from] BackboneError),
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// One frame from a source.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The picture, upright RGB.
    pub image: RgbFrame,
    /// Where it came from: a file path, or `camera0#17`.
    pub name: String,
    /// The file it was read from, for file sources.
    pub path: Option<PathBuf>,
    /// Time spent getting it: waiting for the driver (or reading the file) plus conversion.
    pub capture_time: Duration,
}

impl Frame {
    /// A picture sent as file bytes (a photo uploaded from a phone) as a frame: decoded with
    /// the same limits and EXIF handling as a file source, named `name` in errors.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Frame, CaptureError> {
        let start = Instant::now();
        let image = preprocess::decode_bytes(bytes, Path::new(name))?;
        Ok(Frame {
            image,
            name: name.to_string(),
            path: None,
            capture_time: start.elapsed(),
        })
    }
}

/// Something that hands out frames: a camera, a folder of images, frames in memory.
pub trait FrameSource {
    /// The next frame; `Ok(None)` when a finite source is used up.
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError>;
    /// What this source is, for messages (`camera 0 (/dev/video0) YUYV 640x480@30`).
    fn describe(&self) -> String;
}

/// What `--camera` / `--source` asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// A camera by index (`0`) or device path (`/dev/video0`), with an optional request.
    Camera {
        /// Index or path.
        device: String,
        /// Format / size / rate wanted.
        request: CameraRequest,
    },
    /// An image file, a folder of images, or a glob pattern.
    Path {
        /// The path or pattern.
        path: String,
        /// Start again at the first image after the last.
        repeat: bool,
    },
}

/// The format, size and rate asked of a camera; `None` fields let the camera choose.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CameraRequest {
    /// Pixel format.
    pub format: Option<PixelFormat>,
    /// Width and height.
    pub size: Option<(u32, u32)>,
    /// Frames per second.
    pub fps: Option<u32>,
}

/// Opens what a spec names.
pub fn open(spec: &SourceSpec) -> Result<Box<dyn FrameSource>, CaptureError> {
    match spec {
        SourceSpec::Path { path, repeat } => Ok(Box::new(FileSource::open(path, *repeat)?)),
        #[cfg(feature = "camera")]
        SourceSpec::Camera { device, request } => {
            Ok(Box::new(CameraSource::open(device, *request)?))
        }
        #[cfg(not(feature = "camera"))]
        SourceSpec::Camera { .. } => Err(CaptureError::CameraDisabled),
    }
}

/// A camera seen on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CameraInfo {
    /// Index (`--camera N`).
    pub index: u32,
    /// Device path.
    pub device: String,
    /// The driver's name for it.
    pub name: String,
    /// What it can deliver, or why that could not be read.
    pub modes: Result<Vec<CameraMode>, String>,
}

/// One format / size / rate a camera offers.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CameraMode {
    /// Format (`None` if graft cannot convert it).
    pub format: PixelFormat,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
}

impl std::fmt::Display for CameraMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}x{}@{}",
            self.format.fourcc(),
            self.width,
            self.height,
            self.fps
        )
    }
}

impl serde::Serialize for PixelFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Picks the mode closest to a request: the format if given (else YUYV, NV12, MJPEG, RGB, BGR,
/// grey, cheapest to convert first), the size if given (else the one closest to 640x480: plenty
/// for a 224-pixel model), the rate if given (else the one closest to 30 fps). `None` when the
/// camera offers none of the format, or not the exact size / rate asked for.
pub fn choose_mode(modes: &[CameraMode], request: &CameraRequest) -> Option<CameraMode> {
    const PREFERENCE: [PixelFormat; 6] = [
        PixelFormat::Yuyv,
        PixelFormat::Nv12,
        PixelFormat::Mjpeg,
        PixelFormat::Rgb24,
        PixelFormat::Bgr24,
        PixelFormat::Gray,
    ];
    let (tw, th) = request.size.unwrap_or((640, 480));
    let fps = request.fps.unwrap_or(30);
    modes
        .iter()
        .filter(|m| request.format.is_none_or(|f| f == m.format))
        .filter(|m| request.size.is_none_or(|s| s == (m.width, m.height)))
        .filter(|m| request.fps.is_none_or(|f| f == m.fps))
        .min_by_key(|m| {
            let dw = i64::from(m.width) - i64::from(tw);
            let dh = i64::from(m.height) - i64::from(th);
            let rank = PREFERENCE.iter().position(|f| *f == m.format);
            (dw * dw + dh * dh, m.fps.abs_diff(fps), rank)
        })
        .copied()
}

/// `YUYV 640x480@30`, with `any` for what was left open.
pub fn describe_request(r: &CameraRequest) -> String {
    format!(
        "{} {}@{}",
        r.format.map_or("any format", |f| f.fourcc()),
        r.size
            .map_or("any size".to_string(), |(w, h)| format!("{w}x{h}")),
        r.fps.map_or("any rate".to_string(), |f| f.to_string())
    )
}

/// Turns a driver / OS error message about `device` into the error that names the fix.
pub fn classify_driver_error(device: &str, message: &str) -> CaptureError {
    let m = message.to_ascii_lowercase();
    if m.contains("permission denied") || m.contains("os error 13") {
        CaptureError::PermissionDenied {
            device: device.into(),
        }
    } else if m.contains("busy") || m.contains("os error 16") {
        CaptureError::Busy {
            device: device.into(),
        }
    } else if m.contains("no such device") || m.contains("os error 19") || m.contains("os error 2)")
    {
        CaptureError::Unplugged {
            device: device.into(),
            waited_s: 0,
            reason: message.into(),
        }
    } else {
        CaptureError::Camera {
            device: device.into(),
            message: message.into(),
        }
    }
}

/// Where V4L2 capture devices live.
pub const DEVICE_GLOB: &str = "/dev/video*";

/// The cameras present (V4L2 capture devices). Empty when there are none.
#[cfg(feature = "camera")]
pub fn cameras() -> Result<Vec<CameraInfo>, CaptureError> {
    camera::list()
}

/// The cameras present: always an error in a build without the `camera` feature.
#[cfg(not(feature = "camera"))]
pub fn cameras() -> Result<Vec<CameraInfo>, CaptureError> {
    Err(CaptureError::CameraDisabled)
}

/// Device nodes matching [`DEVICE_GLOB`], sorted by number.
pub fn device_nodes() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = glob::glob(DEVICE_GLOB)
        .map(|g| g.flatten().collect())
        .unwrap_or_default();
    v.sort_by_key(|p| device_index(&p.to_string_lossy()).unwrap_or(u32::MAX));
    v
}

/// `0` → 0, `/dev/video2` → 2, `video3` → 3.
pub fn device_index(device: &str) -> Option<u32> {
    let d = device.trim();
    let digits = d
        .strip_prefix("/dev/video")
        .or_else(|| d.strip_prefix("video"))
        .unwrap_or(d);
    digits.parse().ok()
}

/// Images replayed as frames: one file, a folder (sorted, recursive), or a glob.
#[derive(Debug)]
pub struct FileSource {
    pattern: String,
    files: Vec<PathBuf>,
    next: usize,
    repeat: bool,
}

impl FileSource {
    /// Lists the images `path` names: a file, a folder, or a glob pattern (`shots/*.jpg`).
    pub fn open(path: &str, repeat: bool) -> Result<FileSource, CaptureError> {
        let p = Path::new(path);
        let mut files = Vec::new();
        if p.is_dir() {
            files = preprocess::image_files_in(p)?;
        } else if p.exists() {
            // A FIFO or a device would block the first frame for ever: say what it is now.
            crate::userfile::check(p).map_err(|e| BackboneError::io(p, e))?;
            files.push(p.to_path_buf());
        } else if path.contains(['*', '?', '[']) {
            let entries = glob::glob(path).map_err(|e| CaptureError::BadPattern {
                pattern: path.into(),
                reason: e.to_string(),
            })?;
            files.extend(
                entries
                    .flatten()
                    .filter(|f| f.is_file() && preprocess::has_image_extension(f)),
            );
        } else {
            return Err(BackboneError::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            )
            .into());
        }
        files.sort();
        if files.is_empty() {
            return Err(CaptureError::NoImages {
                pattern: path.into(),
            });
        }
        Ok(FileSource {
            pattern: path.into(),
            files,
            next: 0,
            repeat,
        })
    }

    /// How many images one pass holds.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Never true: an empty source is an error at [`FileSource::open`].
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FrameSource for FileSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.next == self.files.len() {
            if !self.repeat {
                return Ok(None);
            }
            self.next = 0;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        let start = Instant::now();
        let image = preprocess::decode_file(&path)?;
        Ok(Some(Frame {
            image,
            name: path.display().to_string(),
            path: Some(path),
            capture_time: start.elapsed(),
        }))
    }

    fn describe(&self) -> String {
        format!("{} ({} images)", self.pattern, self.files.len())
    }
}

/// A raw frame as a camera driver hands it over.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// Layout of `data`.
    pub format: PixelFormat,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Raw frames held in memory, converted on each read exactly as camera frames are: the seam
/// without the driver, for benchmarks and tests.
#[derive(Debug)]
pub struct MemorySource {
    frames: Vec<RawFrame>,
    next: usize,
    repeat: bool,
}

impl MemorySource {
    /// Frames replayed in order (from the start again if `repeat`).
    pub fn new(frames: Vec<RawFrame>, repeat: bool) -> MemorySource {
        MemorySource {
            frames,
            next: 0,
            repeat,
        }
    }
}

impl FrameSource for MemorySource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        if self.next == self.frames.len() {
            if !self.repeat || self.frames.is_empty() {
                return Ok(None);
            }
            self.next = 0;
        }
        let start = Instant::now();
        let raw = &self.frames[self.next];
        let image = to_rgb(raw.format, raw.width, raw.height, &raw.data)?;
        self.next += 1;
        Ok(Some(Frame {
            image,
            name: format!("memory#{}", self.next - 1),
            path: None,
            capture_time: start.elapsed(),
        }))
    }

    fn describe(&self) -> String {
        format!("{} frames in memory", self.frames.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(format: PixelFormat, width: u32, height: u32, fps: u32) -> CameraMode {
        CameraMode {
            format,
            width,
            height,
            fps,
        }
    }

    #[test]
    fn mode_choice() {
        use PixelFormat::*;
        let modes = [
            mode(Mjpeg, 1920, 1080, 30),
            mode(Mjpeg, 640, 480, 30),
            mode(Yuyv, 640, 480, 30),
            mode(Yuyv, 640, 480, 15),
            mode(Yuyv, 1920, 1080, 5),
        ];
        let any = CameraRequest::default();
        assert_eq!(choose_mode(&modes, &any), Some(mode(Yuyv, 640, 480, 30)));
        let mj = CameraRequest {
            format: Some(Mjpeg),
            ..any
        };
        assert_eq!(choose_mode(&modes, &mj), Some(mode(Mjpeg, 640, 480, 30)));
        let big = CameraRequest {
            size: Some((1920, 1080)),
            ..any
        };
        assert_eq!(choose_mode(&modes, &big), Some(mode(Mjpeg, 1920, 1080, 30)));
        let nv = CameraRequest {
            format: Some(Nv12),
            ..any
        };
        assert_eq!(choose_mode(&modes, &nv), None);
        assert_eq!(describe_request(&nv), "NV12 any size@any rate");
    }

    #[test]
    fn driver_errors_name_the_fix() {
        let d = "/dev/video0";
        let e = classify_driver_error(
            d,
            "Could not open device 0: V4L2 Error: Permission denied (os error 13)",
        );
        assert!(matches!(e, CaptureError::PermissionDenied { .. }), "{e}");
        assert!(e.to_string().contains("video"));
        let e = classify_driver_error(d, "Device or resource busy (os error 16)");
        assert!(matches!(e, CaptureError::Busy { .. }), "{e}");
        let e = classify_driver_error(d, "No such device (os error 19)");
        assert!(matches!(e, CaptureError::Unplugged { .. }), "{e}");
        let e = classify_driver_error(d, "something else");
        assert!(e.to_string().contains("/dev/video0: something else"), "{e}");
    }

    #[test]
    fn device_names() {
        assert_eq!(device_index("0"), Some(0));
        assert_eq!(device_index("/dev/video12"), Some(12));
        assert_eq!(device_index("video3"), Some(3));
        assert_eq!(device_index("/dev/ttyUSB0"), None);
    }

    #[test]
    fn memory_source_converts_and_repeats() {
        let raw = RawFrame {
            format: PixelFormat::Gray,
            width: 2,
            height: 1,
            data: vec![7, 9],
        };
        let mut s = MemorySource::new(vec![raw], true);
        for _ in 0..3 {
            let f = s.next_frame().unwrap().unwrap();
            assert_eq!(f.image.as_raw(), &[7, 7, 7, 9, 9, 9]);
        }
        let mut once = MemorySource::new(Vec::new(), true);
        assert!(once.next_frame().unwrap().is_none());
    }

    #[test]
    fn missing_paths_and_empty_globs_are_errors() {
        let e = FileSource::open("/nonexistent/graft/x.jpg", false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/graft/x.jpg"), "{e}");
        let e = FileSource::open("/nonexistent/graft/*.jpg", false).unwrap_err();
        assert!(matches!(e, CaptureError::NoImages { .. }), "{e}");
    }

    #[test]
    fn a_fifo_as_source_is_refused_at_open() {
        // It used to be reported as "no such file or folder"; reading it would block.
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("cam.jpg");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = FileSource::open(fifo.to_str().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    #[test]
    fn a_folder_source_sees_the_files_train_sees() {
        // Regression: `--source DIR` used to replay hidden files (`.x.jpg`, `.thumbs/`) that
        // `train` and `embed` skip.
        let d = tempfile::tempdir().unwrap();
        for f in ["b/2.jpg", "a.png", ".x.jpg", ".thumbs/t.jpg", "notes.txt"] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let s = FileSource::open(d.path().to_str().unwrap(), false).unwrap();
        let listed = crate::store::files::collect_images(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(s.files, listed);
        assert_eq!(s.len(), 2);
    }
}
