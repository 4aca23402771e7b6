//! V4L2 cameras through nokhwa. Frames are taken raw (nokhwa's own decoding is not built) and
//! converted by `convert.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
};
use nokhwa::{Camera, NokhwaError};

use super::{
    choose_mode, device_index, device_nodes, to_rgb, CameraInfo, CameraMode, CameraRequest,
    CaptureError, Frame, FrameSource, PixelFormat, DEVICE_GLOB,
};

/// How long a camera that vanished mid-stream is waited for before giving up.
pub const RECONNECT_WAIT: Duration = Duration::from_secs(10);

const ALL_FORMATS: &[FrameFormat] = &[
    FrameFormat::MJPEG,
    FrameFormat::YUYV,
    FrameFormat::NV12,
    FrameFormat::RAWRGB,
    FrameFormat::RAWBGR,
    FrameFormat::GRAY,
];

fn from_nokhwa(f: FrameFormat) -> PixelFormat {
    match f {
        FrameFormat::MJPEG => PixelFormat::Mjpeg,
        FrameFormat::YUYV => PixelFormat::Yuyv,
        FrameFormat::NV12 => PixelFormat::Nv12,
        FrameFormat::RAWRGB => PixelFormat::Rgb24,
        FrameFormat::RAWBGR => PixelFormat::Bgr24,
        FrameFormat::GRAY => PixelFormat::Gray,
    }
}

fn to_nokhwa(f: PixelFormat) -> FrameFormat {
    match f {
        PixelFormat::Mjpeg => FrameFormat::MJPEG,
        PixelFormat::Yuyv => FrameFormat::YUYV,
        PixelFormat::Nv12 => FrameFormat::NV12,
        PixelFormat::Rgb24 => FrameFormat::RAWRGB,
        PixelFormat::Bgr24 => FrameFormat::RAWBGR,
        PixelFormat::Gray => FrameFormat::GRAY,
    }
}

fn device_path(index: u32) -> String {
    format!("/dev/video{index}")
}

/// Maps a driver error to the error a user can act on.
fn classify(device: &str, e: &NokhwaError) -> CaptureError {
    let message = e.to_string();
    super::classify_driver_error(device, &message)
}

/// "Not found", listing the device nodes that do exist.
fn no_camera(wanted: &str, looked_for: String) -> CaptureError {
    CaptureError::NoCamera {
        wanted: wanted.into(),
        looked_for,
        present: device_nodes()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    }
}

/// Checks the node exists and can be opened read-write, for errors that name the fix.
fn check_node(wanted: &str, device: &str) -> Result<(), CaptureError> {
    if !Path::new(device).exists() {
        return Err(no_camera(wanted, format!("{device} (V4L2)")));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
        .map_err(|e| super::classify_driver_error(device, &e.to_string()))
}

fn modes_of(camera: &mut Camera) -> Result<Vec<CameraMode>, NokhwaError> {
    let mut modes: Vec<CameraMode> = camera
        .compatible_camera_formats()?
        .into_iter()
        .map(|f| CameraMode {
            format: from_nokhwa(f.format()),
            width: f.width(),
            height: f.height(),
            fps: f.frame_rate(),
        })
        .collect();
    modes.sort_by_key(|m| (m.format.fourcc(), m.width, m.height, m.fps));
    modes.dedup();
    Ok(modes)
}

fn open_any(index: u32) -> Result<Camera, NokhwaError> {
    Camera::with_backend(
        CameraIndex::Index(index),
        RequestedFormat::with_formats(RequestedFormatType::None, ALL_FORMATS),
        ApiBackend::Video4Linux,
    )
}

/// The V4L2 capture devices present, with what each offers.
pub(super) fn list() -> Result<Vec<CameraInfo>, CaptureError> {
    let mut out = Vec::new();
    for node in device_nodes() {
        let device = node.display().to_string();
        let Some(index) = device_index(&device) else {
            continue;
        };
        let (name, modes) = match check_node(&device, &device) {
            Err(e) => (String::new(), Err(e.to_string())),
            Ok(()) => match open_any(index) {
                // UVC cameras also expose a metadata node with no video formats.
                Err(e) => (String::new(), Err(classify(&device, &e).to_string())),
                Ok(mut cam) => {
                    let name = cam.info().human_name();
                    (name, modes_of(&mut cam).map_err(|e| e.to_string()))
                }
            },
        };
        out.push(CameraInfo {
            index,
            device,
            name,
            modes,
        });
    }
    Ok(out)
}

/// A V4L2 camera streaming frames.
pub struct CameraSource {
    camera: Camera,
    index: u32,
    device: String,
    mode: CameraMode,
    count: u64,
}

impl CameraSource {
    /// Opens a camera by index (`0`) or path (`/dev/video0`) in the mode closest to `request`.
    pub fn open(wanted: &str, request: CameraRequest) -> Result<CameraSource, CaptureError> {
        let index = device_index(wanted).ok_or_else(|| {
            no_camera(
                wanted,
                format!("{DEVICE_GLOB} (give an index like 0 or a path like /dev/video0)"),
            )
        })?;
        let device = device_path(index);
        check_node(wanted, &device)?;
        let mut camera = open_any(index).map_err(|e| classify(&device, &e))?;
        let modes = modes_of(&mut camera).map_err(|e| classify(&device, &e))?;
        let mode = choose_mode(&modes, &request).ok_or_else(|| CaptureError::Unsupported {
            device: device.clone(),
            requested: super::describe_request(&request),
            supported: modes.iter().map(|m| m.to_string()).collect(),
        })?;
        let exact =
            CameraFormat::new_from(mode.width, mode.height, to_nokhwa(mode.format), mode.fps);
        camera
            .set_camera_requset(RequestedFormat::with_formats(
                RequestedFormatType::Exact(exact),
                ALL_FORMATS,
            ))
            .map_err(|e| classify(&device, &e))?;
        camera.open_stream().map_err(|e| classify(&device, &e))?;
        Ok(CameraSource {
            camera,
            index,
            device,
            mode,
            count: 0,
        })
    }

    /// The mode the camera streams in.
    pub fn mode(&self) -> CameraMode {
        self.mode
    }

    /// After a read error: wait for the node to come back and reopen it in the same mode.
    fn reconnect(&mut self, reason: String) -> Result<(), CaptureError> {
        let start = Instant::now();
        let request = CameraRequest {
            format: Some(self.mode.format),
            size: Some((self.mode.width, self.mode.height)),
            fps: Some(self.mode.fps),
        };
        let _ = self.camera.stop_stream();
        while start.elapsed() < RECONNECT_WAIT {
            std::thread::sleep(Duration::from_millis(500));
            if !Path::new(&self.device).exists() {
                continue;
            }
            if let Ok(fresh) = CameraSource::open(&self.device, request) {
                let count = self.count;
                *self = fresh;
                self.count = count;
                return Ok(());
            }
        }
        Err(CaptureError::Unplugged {
            device: self.device.clone(),
            waited_s: RECONNECT_WAIT.as_secs(),
            reason,
        })
    }
}

impl FrameSource for CameraSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CaptureError> {
        let start = Instant::now();
        let buffer = match self.camera.frame() {
            Ok(b) => b,
            Err(e) => {
                // A vanished node (USB unplug) or a driver that stopped answering: wait for it
                // to come back once, then give up with a clear error.
                self.reconnect(e.to_string())?;
                self.camera
                    .frame()
                    .map_err(|e| classify(&self.device, &e))?
            }
        };
        let res = buffer.resolution();
        let image = to_rgb(
            from_nokhwa(buffer.source_frame_format()),
            res.width(),
            res.height(),
            buffer.buffer(),
        )?;
        self.count += 1;
        Ok(Some(Frame {
            image,
            name: format!("camera{}#{}", self.index, self.count),
            path: None,
            capture_time: start.elapsed(),
        }))
    }

    fn describe(&self) -> String {
        format!("camera {} ({}) {}", self.index, self.device, self.mode)
    }
}

impl Drop for CameraSource {
    fn drop(&mut self) {
        let _ = self.camera.stop_stream();
    }
}
