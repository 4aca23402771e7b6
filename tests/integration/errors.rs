//! Bad input gets one clear error line naming the file and exit code 1, never a panic.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use crate::common::*;

fn classify(cache: &Path, path: &Path) -> std::process::Command {
    let mut c = graft(cache);
    c.arg("classify").arg(path);
    c
}

#[test]
fn bad_images_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jpeg = std::fs::read(image("dog.jpg")).unwrap();
    std::fs::write(d.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(d.join("notes.jpg"), b"this is not a picture").unwrap();
    std::fs::write(d.join("empty.png"), b"").unwrap();
    // A PNG whose header claims a 0x0 image.
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    png.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 8, 2, 0, 0, 0, 0, 0, 0, 0]);
    std::fs::write(d.join("zero.png"), &png).unwrap();
    let cases = [
        ("missing.jpg", "missing.jpg"),
        ("truncated.jpg", "truncated.jpg"),
        ("notes.jpg", "notes.jpg"),
        ("empty.png", "empty.png"),
        ("zero.png", "zero.png"),
    ];
    for (file, needle) in cases {
        fails(classify(d, &d.join(file)), needle);
    }
}

#[test]
fn a_folder_without_images_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("nothing-here");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("readme.txt"), b"hi").unwrap();
    let mut c = graft(dir.path());
    c.arg("embed")
        .arg(&empty)
        .arg("--out")
        .arg(dir.path().join("e.jsonl"));
    fails(c, "no images");
    assert!(!dir.path().join("e.jsonl").exists());
}

/// Writes a manifest beside a temp dir pointing at `onnx`, with `edit` applied to the bundled
/// fp32 manifest text.
fn manifest(dir: &Path, onnx: &Path, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("models/efficientnet-lite0-fp32.toml")).unwrap();
    let text = text
        .replace(
            "file = \"efficientnet-lite0/fp32.onnx\"",
            &format!("file = {:?}", onnx.display().to_string()),
        )
        .replace(
            "labels = \"efficientnet-lite0/labels.txt\"",
            &format!(
                "labels = {:?}",
                root()
                    .join("models/efficientnet-lite0/labels.txt")
                    .display()
                    .to_string()
            ),
        );
    let p = dir.join("m.toml");
    std::fs::write(&p, edit(text)).unwrap();
    p
}

fn sha_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("sha256 = "))
        .unwrap()
        .to_string()
}

#[test]
fn bad_models_and_manifests_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fp32 = root().join("models/efficientnet-lite0/fp32.onnx");
    let not_image = fixture("models/not_image.onnx");
    let not_image_sha = graft::backbone::sha256_hex(&std::fs::read(&not_image).unwrap());

    // The real file, correctly described, loads (the harness itself is right).
    let m = manifest(d, &fp32, |t| t);
    let mut c = graft(d);
    c.args(["info", "--model"]).arg(&m);
    ok(c);

    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(&str, Edit, &Path, &str)> = vec![
        (
            "sha mismatch",
            Box::new(|t: String| {
                t.replace(&sha_line(&t), &format!("sha256 = \"{}\"", "0".repeat(64)))
            }),
            &fp32,
            "does not match manifest",
        ),
        (
            "missing feature node",
            Box::new(|t: String| {
                t.replace("features = \"features\"", "features = \"no_such_node\"")
            }),
            &fp32,
            "no_such_node",
        ),
        (
            "not an image model",
            Box::new(move |t: String| {
                t.replace(&sha_line(&t), &format!("sha256 = \"{not_image_sha}\""))
                    .replace("features = \"features\"", "features = \"output\"")
                    .replace("logits = \"logits\"\n", "")
            }),
            &not_image,
            "not an image model",
        ),
        (
            "not a manifest",
            Box::new(|_| "this is = not [toml".to_string()),
            &fp32,
            "m.toml",
        ),
        (
            "newer manifest",
            Box::new(|t: String| t.replace("format = 1", "format = 2")),
            &fp32,
            "newer",
        ),
    ];
    for (name, edit, onnx, needle) in cases {
        let m = manifest(d, onnx, edit);
        let mut c = graft(d);
        c.args(["info", "--model"]).arg(&m);
        let err = fails(c, needle);
        assert!(
            err.contains("m.toml") || err.contains("model"),
            "{name}: {err}"
        );
    }

    let mut c = graft(d);
    c.args(["info", "--model", "resnet-9000"]);
    fails(c, "efficientnet-lite0-int8");
    let mut c = graft(d);
    c.args(["info", "--model"]).arg(d.join("absent.toml"));
    fails(c, "absent.toml");
}

/// Without the `gpu` feature, `--device gpu` says how to get it; `auto` is the CPU.
#[cfg(not(feature = "gpu"))]
#[test]
fn device_gpu_without_the_feature_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    fails(
        {
            let mut c = graft(dir.path());
            c.args(["--device", "gpu", "classify"])
                .arg(image("dog.jpg"));
            c
        },
        "built without the `gpu` feature",
    );
    let mut c = graft(dir.path());
    c.args(["--json", "--device", "auto", "info"]);
    let info = json_lines(&ok(c)).remove(0);
    assert_eq!(info["device"], "cpu (tract)");
    assert_eq!(info["gpu_feature"], false);
}

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_string(out: &mut Vec<u8>, field: u64, s: &str) {
    put_varint(out, field << 3 | 2);
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// An exported ONNX file with one `graft.*` metadata value changed. The metadata is field 14
/// of the ONNX `ModelProto` (`metadata_props`, key = 1 and value = 2 of each entry), which
/// `graft export` writes and `backbone::exported::read_meta` reads: top-level fields are
/// copied as they are and the one entry is re-encoded, so nothing else differs.
fn with_metadata(onnx: &[u8], key: &str, edit: &dyn Fn(&str) -> String) -> Vec<u8> {
    let mut out = Vec::with_capacity(onnx.len());
    let mut at = 0;
    let mut found = false;
    while at < onnx.len() {
        let start = at;
        let tag = varint(onnx, &mut at);
        let len = match tag & 7 {
            0 => {
                varint(onnx, &mut at);
                0
            }
            1 => 8,
            2 => varint(onnx, &mut at) as usize,
            5 => 4,
            t => panic!("wire type {t} in an ONNX file"),
        };
        let body = &onnx[at..at + len];
        at += len;
        if tag == (14 << 3 | 2) {
            let (mut k, mut v, mut i) = (String::new(), String::new(), 0);
            while i < body.len() {
                let t = varint(body, &mut i);
                let n = varint(body, &mut i) as usize;
                let s = String::from_utf8(body[i..i + n].to_vec()).unwrap();
                i += n;
                if t >> 3 == 1 {
                    k = s;
                } else {
                    v = s;
                }
            }
            if k == key {
                found = true;
                let mut entry = Vec::new();
                put_string(&mut entry, 1, &k);
                put_string(&mut entry, 2, &edit(&v));
                put_varint(&mut out, tag);
                put_varint(&mut out, entry.len() as u64);
                out.extend_from_slice(&entry);
                continue;
            }
        }
        out.extend_from_slice(&onnx[start..at]);
    }
    assert!(found, "no metadata {key}");
    out
}

/// Regression (issue 9): an exported model's metadata was read without the checks a manifest
/// gets: `resize_shorter = 0` panicked (capacity overflow), `4e9` aborted, and `std = 0`,
/// `NHWC`, `nearest` and a NaN threshold were accepted. The metadata now goes through the
/// manifest's validation (and its own: labels, threshold, output).
#[test]
fn crafted_export_metadata_is_refused_naming_the_field() {
    type Edit = Box<dyn Fn(&str) -> String>;
    fn preprocess(field: &'static str, value: serde_json::Value) -> (&'static str, Edit) {
        (
            "graft.preprocess",
            Box::new(move |v: &str| {
                let mut j: serde_json::Value = serde_json::from_str(v).unwrap();
                j[field] = value.clone();
                j.to_string()
            }),
        )
    }
    fn plain(key: &'static str, value: &'static str) -> (&'static str, Edit) {
        (key, Box::new(move |_: &str| value.to_string()))
    }
    use serde_json::json;
    let cases: Vec<((&str, Edit), &str)> = vec![
        (preprocess("resize_shorter", json!(0)), "resize_shorter"),
        (
            preprocess("resize_shorter", json!(4_000_000_000u32)),
            "resize_shorter",
        ),
        (preprocess("size", json!(0)), "size"),
        (preprocess("std", json!([0.0, 128.0, 128.0])), "std"),
        (preprocess("mean", json!([1e39, 127.0, 127.0])), "mean"),
        (preprocess("layout", json!("NHWC")), "layout"),
        (preprocess("channels", json!("BGR")), "channels"),
        (
            preprocess("resize_filter", json!("nearest")),
            "resize_filter",
        ),
        (plain("graft.threshold", "NaN"), "graft.threshold"),
        (plain("graft.threshold", "5"), "graft.threshold"),
        (plain("graft.threshold", "-inf"), "graft.threshold"),
        (plain("graft.output", "banana"), "graft.output"),
        (plain("graft.labels", "[]"), "graft.labels"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let onnx = d.join("export.onnx");
    let mut c = graft(d);
    c.args(["export", "--head"])
        .arg(fixture("heads/release-42bf848-centroid.graft"))
        .arg("--out")
        .arg(&onnx);
    ok(c);
    let good = std::fs::read(&onnx).unwrap();
    let crafted = d.join("crafted.onnx");
    // Re-encoding with the value unchanged gives a model that still predicts.
    std::fs::write(
        &crafted,
        with_metadata(&good, "graft.threshold", &|v| v.to_string()),
    )
    .unwrap();
    let mut c = graft(d);
    c.arg("--model")
        .arg(&crafted)
        .arg("predict")
        .arg(image("dog.jpg"));
    ok(c);
    let mut wrong = Vec::new();
    for ((key, edit), field) in &cases {
        std::fs::write(&crafted, with_metadata(&good, key, edit.as_ref())).unwrap();
        let mut c = graft(d);
        c.arg("--model")
            .arg(&crafted)
            .arg("predict")
            .arg(image("dog.jpg"));
        match std::panic::catch_unwind(AssertUnwindSafe(|| fails(c, field))) {
            Ok(err) if err.contains("crafted.onnx") => {}
            _ => wrong.push(format!("{key} -> {field}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused naming file and field: {wrong:?}"
    );
}
