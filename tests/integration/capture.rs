//! Frames in: camera pixel formats converted to the pixel (against OpenCV), the folder source
//! standing in for a camera in `graft capture` and `graft watch`, and the camera path failing
//! clearly on a machine without one.

use std::path::{Path, PathBuf};

use graft::backbone::{preprocess, Backbone};
use graft::capture::{self, FrameSource, MemorySource, PixelFormat, RawFrame};
use graft::store::headfile;

use crate::common::*;
use crate::heads::data_dir;

fn frame_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture("frames").join(name)).unwrap()
}

/// Raw buffers made and converted by OpenCV (`tests/fixtures/frames/make_frames.py`). YUYV, NV12
/// and 4:4:4 MJPEG must match byte for byte. 4:2:2 MJPEG goes through two JPEG decoders
/// (zune-jpeg here, libjpeg-turbo in OpenCV) whose chroma upsampling filters differ at colour
/// edges (the JPEG standard leaves upsampling to the decoder): there up to 2 levels, in under 1%
/// of the bytes, are accepted.
#[test]
fn yuyv_nv12_and_mjpeg_match_opencv_to_the_pixel() {
    let cases = [
        (
            PixelFormat::Yuyv,
            "yuyv_64x16.raw",
            "yuyv_64x16.rgb",
            64,
            16,
        ),
        (
            PixelFormat::Nv12,
            "nv12_64x16.raw",
            "nv12_64x16.rgb",
            64,
            16,
        ),
        // Huffman tables stripped, as UVC webcams send MJPEG.
        (
            PixelFormat::Mjpeg,
            "mjpeg444_64x32.jpg",
            "mjpeg444_64x32.rgb",
            64,
            32,
        ),
        (
            PixelFormat::Mjpeg,
            "mjpeg_64x32.jpg",
            "mjpeg_64x32.rgb",
            64,
            32,
        ),
    ];
    for (format, raw, rgb, w, h) in cases {
        let got = capture::to_rgb(format, w, h, &frame_fixture(raw)).unwrap();
        let want = frame_fixture(rgb);
        assert_eq!((got.width(), got.height()), (w, h), "{raw}");
        assert_eq!(got.as_raw().len(), want.len(), "{raw}");
        let tolerance = if raw == "mjpeg_64x32.jpg" { 2 } else { 0 };
        let off_by_one = got
            .as_raw()
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            off_by_one * 100 <= want.len(),
            "{raw}: {off_by_one} of {} bytes differ",
            want.len()
        );
        let diff: Vec<usize> = got
            .as_raw()
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (a, b))| a.abs_diff(**b) > tolerance)
            .map(|(i, _)| i)
            .collect();
        assert!(
            diff.is_empty(),
            "{raw}: {} of {} bytes differ from OpenCV, first at pixel {} (got {:?}, OpenCV {:?})",
            diff.len(),
            want.len(),
            diff[0] / 3,
            &got.as_raw()[diff[0] / 3 * 3..diff[0] / 3 * 3 + 3],
            &want[diff[0] / 3 * 3..diff[0] / 3 * 3 + 3]
        );
    }
}

/// A frame replayed from memory through the seam embeds exactly like the file it came from.
#[test]
fn frames_through_the_seam_embed_like_files() {
    let bb = Backbone::load_named("efficientnet-lite0").unwrap();
    let path = fixture("decoded").join("chelsea.png");
    let decoded = preprocess::decode_file(&path).unwrap();
    let raw = RawFrame {
        format: PixelFormat::Rgb24,
        width: decoded.width(),
        height: decoded.height(),
        data: decoded.as_raw().to_vec(),
    };
    let mut source = MemorySource::new(vec![raw], false);
    let frame = source.next_frame().unwrap().unwrap();
    assert!(source.next_frame().unwrap().is_none());
    let from_frame = bb.run(&[bb.prepare_frame(&frame.image)]).unwrap();
    let from_file = bb.embed_file(&path).unwrap();
    assert_eq!(from_frame[0].embedding.vector, from_file.vector);
}

fn train_head(t: &Path, cache: &Path, classes: &[&str]) -> PathBuf {
    let ds = t.join("train");
    for class in classes {
        let d = ds.join(class);
        std::fs::create_dir_all(&d).unwrap();
        for f in sorted(&data_dir().join(class)).iter().step_by(8).take(6) {
            std::os::unix::fs::symlink(f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
    let head = t.join("kiosk.graft");
    let mut c = graft(cache);
    c.args(["train", "--head", "logistic", "--out"])
        .arg(&head)
        .arg(&ds);
    ok(c);
    head
}

fn sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn capture_from_a_folder_saves_an_image_folder_and_extends_a_head() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let head = train_head(t.path(), &cache, &["birds", "fruit"]);
    let ds = t.path().join("dataset");
    let mut c = graft(&cache);
    c.args([
        "--json",
        "capture",
        "--label",
        "instruments",
        "--count",
        "4",
    ])
    .args(["--interval", "0", "--source"])
    .arg(data_dir().join("instruments"))
    .arg("--dataset")
    .arg(&ds)
    .arg("--add-to")
    .arg(&head);
    let lines = json_lines(&ok(c));
    assert_eq!(lines.len(), 5, "4 frames and a summary");
    let saved = sorted(&ds.join("instruments"));
    assert_eq!(saved.len(), 4);
    for (line, path) in lines.iter().zip(&saved) {
        assert_eq!(Path::new(line["path"].as_str().unwrap()), path);
        let f = preprocess::decode_file(path).unwrap();
        assert_eq!(
            (f.width(), f.height()),
            (
                line["width"].as_u64().unwrap() as u32,
                line["height"].as_u64().unwrap() as u32
            )
        );
    }
    assert_eq!(lines[4]["saved"], 4);
    assert_eq!(lines[4]["added"], 4);
    let file = headfile::read(&head).unwrap();
    assert_eq!(file.head.labels, ["birds", "fruit", "instruments"]);
    assert_eq!(file.counts(), [6, 6, 4]);

    // The saved folder is what `train` reads.
    let mut c = graft(&cache);
    c.args([
        "capture",
        "--label",
        "birds",
        "--count",
        "2",
        "--interval",
        "0",
        "--source",
    ])
    .arg(format!("{}/*_1.jpg", data_dir().join("birds").display()))
    .arg("--dataset")
    .arg(&ds);
    ok(c);
    let mut c = graft(&cache);
    c.args(["train", "--head", "centroid", "--out"])
        .arg(t.path().join("captured.graft"))
        .arg(&ds);
    ok(c);

    // A source that runs out says so, and keeps the complete frames it saved.
    let mut c = graft(&cache);
    c.args([
        "capture",
        "--label",
        "cat",
        "--count",
        "3",
        "--interval",
        "0",
        "--source",
    ])
    .arg(image("chelsea.jpg"))
    .arg("--dataset")
    .arg(&ds);
    fails(c, "ended after 1 of 3 frames");
    assert_eq!(sorted(&ds.join("cat")).len(), 1);
    // Labels become folder names: no paths, no `unknown`.
    for bad in ["../x", "unknown", ""] {
        let mut c = graft(&cache);
        c.args(["capture", "--count", "1", "--source"])
            .arg(image("chelsea.jpg"))
            .arg(format!("--label={bad}"));
        fails(c, "class name");
    }
}

#[test]
fn watch_reports_stable_labels_from_a_folder() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let head = train_head(t.path(), &cache, &["birds", "fruit", "flowers"]);
    // Photos of fruit the head has not seen (the second shot of other objects).
    let glob = format!("{}/*_1.jpg", data_dir().join("fruit").display());
    let mut c = graft(&cache);
    c.args([
        "--json", "watch", "--stable", "2", "--frames", "12", "--head",
    ])
    .arg(&head)
    .arg("--source")
    .arg(&glob);
    let lines = json_lines(&ok(c));
    assert!(!lines.is_empty(), "a stable label is reported");
    assert_eq!(lines[0]["label"], "fruit", "{:?}", lines[0]);
    for l in &lines {
        assert_eq!(l["changed"], true, "only changes are reported: {l}");
        for stage in ["capture_ms", "preprocess_ms", "embed_ms", "head_ms"] {
            assert!(l[stage].as_f64().unwrap() >= 0.0, "{stage}: {l}");
        }
    }
    // Every frame, with a threshold that rejects: `unknown` shown as such.
    let mut c = graft(&cache);
    c.args([
        "--json",
        "watch",
        "--every-frame",
        "--smooth",
        "off",
        "--stable",
        "1",
    ])
    .args(["--frames", "3", "--threshold", "1", "--head"])
    .arg(&head)
    .arg("--source")
    .arg(&glob);
    let lines = json_lines(&ok(c));
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let unknown = l["score"].as_f64().unwrap() < 1.0;
        assert_eq!(l["unknown"], unknown, "{l}");
        if unknown {
            assert_eq!(l["label"], "unknown");
        }
    }
    let mut c = graft(&cache);
    c.args(["watch", "--smooth", "median", "--head"])
        .arg(&head)
        .args(["--source", "x"]);
    fails(c, "bad smoothing");
}

/// CI machines have no /dev/video*: the camera path must say what it looked for.
#[test]
fn no_camera_fails_clearly() {
    let t = tempfile::tempdir().unwrap();
    let present = !capture::device_nodes().is_empty();
    let mut c = graft(t.path());
    c.args(["capture", "--label", "cup", "--count", "1", "--camera", "7"]);
    if cfg!(feature = "camera") {
        if !Path::new("/dev/video7").exists() {
            fails(
                c,
                "camera 7 not found (looked for /dev/video7 (V4L2)); cameras present:",
            );
        }
        let mut c = graft(t.path());
        c.arg("cameras");
        let out = c.output().unwrap();
        assert!(out.status.success());
        if !present {
            assert!(String::from_utf8_lossy(&out.stderr).contains("no cameras found"));
        }
    } else {
        fails(c, "built without camera support");
    }
    let mut c = graft(t.path());
    c.args([
        "capture", "--label", "cup", "--camera", "0", "--format", "h264",
    ]);
    fails(c, "unknown pixel format");
    let mut c = graft(t.path());
    c.args([
        "watch",
        "--head",
        "none.graft",
        "--camera",
        "0",
        "--size",
        "640",
    ]);
    fails(c, "none.graft");
}
