//! `graft cameras | capture | watch`: frames from a camera (or an image folder standing in for
//! one), saved as examples or classified live.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::{output, Global};
use graft::capture::{self, CameraRequest, FrameSource, PixelFormat, SourceSpec};
use graft::head::{self, Label};
use graft::live::{self, Smoother, Smoothing};
use graft::store::learn::{self, FrameSaver, HeadFileStore, JPEG_QUALITY};

/// Where frames come from: a camera, or images standing in for one.
#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// Camera: an index (0) or a device path (/dev/video0) [default: the board's, else 0].
    #[arg(long, conflicts_with = "source")]
    pub camera: Option<String>,
    /// Images instead of a camera: a file, a folder (recursive, sorted) or a glob ('shots/*.jpg').
    #[arg(long)]
    pub source: Option<String>,
    /// With --source: start again at the first image after the last.
    #[arg(long, requires = "source")]
    pub repeat: bool,
    /// Camera pixel format: yuyv, nv12, mjpeg, rgb, bgr, gray [default: the camera's, YUYV first].
    #[arg(long, conflicts_with = "source")]
    pub format: Option<String>,
    /// Camera frame size WIDTHxHEIGHT [default: closest to 640x480].
    #[arg(long, conflicts_with = "source")]
    pub size: Option<String>,
    /// Camera frame rate [default: closest to 30].
    #[arg(long, conflicts_with = "source")]
    pub fps: Option<u32>,
}

impl SourceArgs {
    /// The camera request when the user gave no mode: the board profile's preference.
    fn board_request(&self, g: &Global) -> anyhow::Result<Option<CameraRequest>> {
        if self.format.is_some() || self.size.is_some() || self.fps.is_some() {
            return Ok(None);
        }
        Ok(g.board()?.map(|(b, _)| b.camera_request()))
    }

    pub fn spec(&self) -> anyhow::Result<SourceSpec> {
        if let Some(path) = &self.source {
            return Ok(SourceSpec::Path {
                path: path.clone(),
                repeat: self.repeat,
            });
        }
        let format = self
            .format
            .as_deref()
            .map(str::parse::<PixelFormat>)
            .transpose()?;
        let size = match &self.size {
            None => None,
            Some(s) => {
                let parsed = s
                    .to_ascii_lowercase()
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
                match parsed {
                    Some((w, h)) if w > 0 && h > 0 => Some((w, h)),
                    _ => bail!("--size {s:?}: expected WIDTHxHEIGHT, e.g. 640x480"),
                }
            }
        };
        Ok(SourceSpec::Camera {
            device: self.camera.clone().unwrap_or_else(|| "0".into()),
            request: CameraRequest {
                format,
                size,
                fps: self.fps,
            },
        })
    }

    pub fn is_camera(&self) -> bool {
        self.source.is_none()
    }

    /// Opens the source; a camera with no mode given tries the board profile's mode first
    /// and falls back to the closest one it has.
    pub fn open(&self, g: &Global) -> anyhow::Result<Box<dyn FrameSource>> {
        let mut spec = self.spec()?;
        if let SourceSpec::Camera { device, .. } = &mut spec {
            if let (None, Some((b, _))) = (&self.camera, g.board()?) {
                *device = b.camera.device.clone();
            }
        }
        if let (SourceSpec::Camera { device, .. }, Some(preferred)) =
            (&spec, self.board_request(g)?)
        {
            let first = SourceSpec::Camera {
                device: device.clone(),
                request: preferred,
            };
            match capture::open(&first) {
                Ok(s) => return Ok(s),
                Err(capture::CaptureError::Unsupported { .. }) => {}
                Err(e) => return Err(with_hint(e)),
            }
        }
        capture::open(&spec).map_err(with_hint)
    }
}

/// The library's capture errors, with the flags that fix them where there are some.
fn with_hint(e: capture::CaptureError) -> anyhow::Error {
    match e {
        capture::CaptureError::CameraDisabled => {
            anyhow::anyhow!("{e}: cargo build --release --features camera, or give --source PATH")
        }
        e => e.into(),
    }
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Class of the frames (the folder they go in).
    #[arg(long)]
    label: String,
    /// Frames to save.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Seconds between frames (time to move the object a little).
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Seconds of countdown before the first frame [default: 3 with a camera, 0 with --source].
    #[arg(long)]
    countdown: Option<u64>,
    /// Image folder to save into: DATASET/LABEL/*.jpg, the layout `graft train` reads.
    #[arg(long, default_value = "dataset")]
    dataset: PathBuf,
    /// Also add the frames to this head file and refit it.
    #[arg(long)]
    add_to: Option<PathBuf>,
    /// JPEG quality of the saved frames.
    #[arg(long, default_value_t = JPEG_QUALITY, value_parser = clap::value_parser!(u8).range(50..=100))]
    quality: u8,
    #[command(flatten)]
    source: SourceArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Head file to classify with.
    #[arg(long)]
    head: PathBuf,
    #[command(flatten)]
    source: SourceArgs,
    /// Temporal smoothing: off, ema[:ALPHA] (moving average of scores) or vote[:FRAMES].
    #[arg(long, default_value = "ema:0.4")]
    smooth: String,
    /// Frames a new label must hold before it is reported (debounce).
    #[arg(long, default_value_t = 3)]
    stable: usize,
    /// Scores below this are `unknown` [default: the head's calibrated threshold].
    #[arg(long)]
    threshold: Option<f32>,
    /// Report every frame, not only changes of the stable label.
    #[arg(long)]
    every_frame: bool,
    /// Stop after this many frames [default: until the source ends or Ctrl-C].
    #[arg(long)]
    frames: Option<u64>,
}

#[derive(Serialize)]
struct CameraLine<'a> {
    index: u32,
    device: &'a str,
    name: &'a str,
    modes: Vec<String>,
    error: Option<&'a str>,
}

pub fn cameras(g: &Global) -> anyhow::Result<()> {
    let found = capture::cameras()?;
    if found.is_empty() {
        eprintln!(
            "no cameras found (looked for V4L2 devices {}); see README \"Cameras\" for the Raspberry Pi camera",
            capture::DEVICE_GLOB
        );
    }
    for c in &found {
        let modes: Vec<String> = c
            .modes
            .as_ref()
            .map(|m| m.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default();
        if g.json {
            output::json_line(&CameraLine {
                index: c.index,
                device: &c.device,
                name: &c.name,
                modes,
                error: c.modes.as_ref().err().map(String::as_str),
            })?;
            continue;
        }
        println!("{}: {} {}", c.index, c.device, c.name);
        match &c.modes {
            Ok(m) if m.is_empty() => println!("    (no video formats graft can convert)"),
            Ok(_) => println!("    {}", modes.join(", ")),
            Err(e) => println!("    unusable: {e}"),
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct SavedLine<'a> {
    n: usize,
    path: &'a Path,
    label: &'a str,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct CaptureSummary<'a> {
    label: &'a str,
    saved: usize,
    folder: &'a Path,
    source: String,
    added_to: Option<&'a Path>,
    added: usize,
    cv_accuracy: Option<f64>,
}

pub fn capture(g: &Global, a: CaptureArgs) -> anyhow::Result<()> {
    let label = Label::new(&a.label).context("--label")?;
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(a.interval.is_finite() && a.interval >= 0.0) {
        bail!("--interval {} is not a number of seconds", a.interval);
    }
    // Check the head before taking pictures, so a typo does not cost a capture session.
    let head = match &a.add_to {
        Some(p) => Some(super::heads::load_head(g, p)?),
        None => None,
    };
    let mut source = a.source.open(g)?;
    let folder = a.dataset.join(label.as_str());
    // Frames of one run show one object: one session, one group in cross-validation.
    let mut saver = FrameSaver::new(&folder, &label, a.quality)?;
    let countdown = a
        .countdown
        .unwrap_or(if a.source.is_camera() { 3 } else { 0 });
    for s in (1..=countdown).rev() {
        eprintln!("capturing {:?} in {s}…", label.as_str());
        std::thread::sleep(Duration::from_secs(1));
    }
    let bar = output::progress(a.count, &format!("capturing {label}"));
    let mut saved = Vec::new();
    let interval = Duration::from_secs_f64(a.interval);
    let mut next_at = Instant::now();
    while saved.len() < a.count {
        let now = Instant::now();
        if next_at > now {
            std::thread::sleep(next_at - now);
        }
        next_at = Instant::now() + interval;
        let Some(frame) = source.next_frame()? else {
            bar.finish_and_clear();
            bail!(
                "{} ended after {} of {} frames ({} saved in {})",
                source.describe(),
                saved.len(),
                a.count,
                saved.len(),
                folder.display()
            );
        };
        let n = saved.len();
        let s = saver
            .save(&frame.image, &frame.name)
            .with_context(|| format!("saving frame {n} in {}", folder.display()))?;
        if g.json {
            output::json_line(&SavedLine {
                n,
                path: &s.path,
                label: label.as_str(),
                width: frame.image.width(),
                height: frame.image.height(),
            })?;
        }
        saved.push(s);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut summary = CaptureSummary {
        label: label.as_str(),
        saved: saved.len(),
        folder: &folder,
        source: source.describe(),
        added_to: a.add_to.as_deref(),
        added: 0,
        cv_accuracy: None,
    };
    if let (Some((file, bb)), Some(head_path)) = (head, &a.add_to) {
        let new = saved
            .iter()
            .map(|s| s.embed(&bb))
            .collect::<Result<Vec<_>, _>>()?;
        drop(file);
        let mut store = HeadFileStore::open(head_path, &bb)?;
        summary.added = learn::add_examples(&mut store, &label, new)?.added;
        summary.cv_accuracy = store.file().cv_accuracy;
    }
    if g.json {
        return output::json_line(&summary);
    }
    println!(
        "saved {} frames of {:?} in {} (from {})",
        summary.saved,
        label.as_str(),
        folder.display(),
        summary.source
    );
    if let Some(p) = &a.add_to {
        println!(
            "added {} to {} and refit it (CV accuracy {:.1}%)",
            summary.added,
            p.display(),
            summary.cv_accuracy.unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct WatchLine<'a> {
    /// Seconds since the first frame.
    t: f64,
    frame: &'a str,
    /// The stable (smoothed, debounced) label; `unknown` when rejected.
    label: &'a str,
    score: f32,
    unknown: bool,
    /// True when this line reports a change of the stable label.
    changed: bool,
    /// This frame alone.
    frame_label: &'a str,
    frame_score: f32,
    fps: f64,
    #[serde(flatten)]
    stages: live::Stages,
}

/// Frames per second over the last few frames.
struct Rate {
    times: std::collections::VecDeque<Instant>,
}

impl Rate {
    fn tick(&mut self) -> f64 {
        let now = Instant::now();
        self.times.push_back(now);
        while self.times.len() > 30 {
            self.times.pop_front();
        }
        let span = now - self.times[0];
        if self.times.len() < 2 || span.is_zero() {
            return 0.0;
        }
        (self.times.len() - 1) as f64 / span.as_secs_f64()
    }
}

pub fn watch(g: &Global, a: WatchArgs) -> anyhow::Result<()> {
    let smoothing: Smoothing = a.smooth.parse()?;
    if let Some(t) = a.threshold {
        head::validate_threshold(t).context("--threshold")?;
    }
    let (file, bb) = super::heads::load_head(g, &a.head)?;
    let head = &file.head;
    let threshold = a.threshold.unwrap_or(head.threshold);
    let mut source = a.source.open(g)?;
    eprintln!(
        "watching {} with {} ({} classes, threshold {:.2}, smoothing {smoothing}, stable {})",
        source.describe(),
        a.head.display(),
        head.labels.len(),
        threshold,
        a.stable.max(1)
    );
    let mut smoother = Smoother::new(smoothing, threshold, a.stable);
    let mut rate = Rate {
        times: Default::default(),
    };
    let start = Instant::now();
    let mut n = 0u64;
    while a.frames.is_none_or(|max| n < max) {
        let Some(frame) = source.next_frame()? else {
            break;
        };
        n += 1;
        let c = live::classify(&bb, head, &frame, a.threshold)
            .with_context(|| format!("classifying {}", frame.name))?;
        let (now, report) = smoother.push(&c.probs);
        let fps = rate.tick();
        if report.is_none() && !a.every_frame {
            continue;
        }
        let label = now.label.map_or(head::UNKNOWN, |i| head.labels[i].as_str());
        let line = WatchLine {
            t: start.elapsed().as_secs_f64(),
            frame: &frame.name,
            label,
            score: now.score,
            unknown: now.label.is_none(),
            changed: report.is_some(),
            frame_label: &c.prediction.label,
            frame_score: c.prediction.score,
            fps,
            stages: c.stages,
        };
        if g.json {
            output::json_line(&line)?;
        } else {
            let s = &c.stages;
            println!(
                "{:7.2}s {}{} {:.3}  [{:.1} fps; capture {:.1} ms, preprocess {:.1} ms, embed {:.1} ms, head {:.2} ms]  {}",
                line.t,
                if line.changed { "→ " } else { "  " },
                label,
                now.score,
                fps,
                s.capture_ms,
                s.preprocess_ms,
                s.embed_ms,
                s.head_ms,
                frame.name
            );
        }
    }
    if n == 0 {
        bail!("{} gave no frames", source.describe());
    }
    Ok(())
}
