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

/// A head file opened as its on-disk format allows editing it: the JSON header and the
/// embedding block between the magic + length and the sha256 trailer (see `store::headfile`).
struct HeadParts {
    header: serde_json::Value,
    embeddings: Vec<u8>,
}

const HEAD_MAGIC: &[u8] = b"GRAFT-HEAD\n";

fn open_head(path: &Path) -> HeadParts {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..HEAD_MAGIC.len()], HEAD_MAGIC);
    let at = HEAD_MAGIC.len();
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let json = &bytes[at + 4..at + 4 + len];
    HeadParts {
        header: serde_json::from_slice(json).unwrap(),
        embeddings: bytes[at + 4 + len..bytes.len() - 32].to_vec(),
    }
}

/// Writes the parts back as a well-formed head file (length and checksum made to match), so
/// only the edited values are wrong.
fn seal_head(parts: &HeadParts, path: &Path) {
    let json = serde_json::to_vec(&parts.header).unwrap();
    let mut bytes = HEAD_MAGIC.to_vec();
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&parts.embeddings);
    let hex = graft::backbone::sha256_hex(&bytes);
    let digest: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    bytes.extend_from_slice(&digest);
    std::fs::write(path, bytes).unwrap();
}

/// Regression (issue 9): crafted head files panicked (`backbone.dim = 0` with a centroid head:
/// "chunk size must be non-zero"), or loaded and printed `NaN` scores that passed the threshold
/// as a known label (weights of ±1e39, which are infinite as f32), or ranked backwards (a
/// negative temperature), or took thresholds outside [0, 1]. Every one is now refused by the
/// one validation `headfile::read` runs, naming the file and the field.
#[test]
fn crafted_head_files_are_refused_naming_the_field() {
    type Edit = fn(&mut HeadParts);
    struct Case {
        name: &'static str,
        head: &'static str,
        edit: Edit,
        field: &'static str,
    }
    let cases = [
        Case {
            name: "centroid head of 0-d embeddings",
            head: "centroid",
            edit: |p| {
                p.header["backbone"]["dim"] = 0.into();
                p.embeddings.clear();
            },
            field: "backbone.dim",
        },
        Case {
            name: "embedding size that overflows the block size",
            head: "centroid",
            edit: |p| p.header["backbone"]["dim"] = (1u64 << 62).into(),
            field: "backbone.dim",
        },
        Case {
            name: "weight of 1e39 (infinite as f32)",
            head: "logistic",
            edit: |p| p.header["linear_weights"][7] = serde_json::json!(1e39),
            field: "linear_weights",
        },
        Case {
            name: "bias of -1e39",
            head: "logistic",
            edit: |p| p.header["linear_bias"][1] = serde_json::json!(-1e39),
            field: "linear_bias",
        },
        Case {
            name: "infinite embedding value",
            head: "centroid",
            edit: |p| p.embeddings[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes()),
            field: "examples[0]",
        },
        Case {
            name: "NaN embedding value",
            head: "centroid",
            edit: |p| {
                let at = p.embeddings.len() - 4;
                p.embeddings[at..].copy_from_slice(&f32::NAN.to_le_bytes());
            },
            field: "examples[3]",
        },
        Case {
            name: "negative temperature",
            head: "centroid",
            edit: |p| p.header["temperature"] = serde_json::json!(-20.0),
            field: "temperature",
        },
        Case {
            name: "zero temperature",
            head: "logistic",
            edit: |p| p.header["temperature"] = serde_json::json!(0.0),
            field: "temperature",
        },
        Case {
            name: "infinite temperature",
            head: "logistic",
            edit: |p| p.header["temperature"] = serde_json::json!(1e39),
            field: "temperature",
        },
        Case {
            name: "threshold above 1",
            head: "centroid",
            edit: |p| p.header["threshold"] = serde_json::json!(5.0),
            field: "threshold",
        },
        Case {
            name: "negative threshold",
            head: "logistic",
            edit: |p| p.header["threshold"] = serde_json::json!(-0.25),
            field: "threshold",
        },
        Case {
            name: "infinite threshold",
            head: "logistic",
            edit: |p| p.header["threshold"] = serde_json::json!(1e39),
            field: "threshold",
        },
        Case {
            name: "power out of range",
            head: "centroid",
            edit: |p| p.header["params"]["power"] = serde_json::json!(2.0),
            field: "params.power",
        },
        Case {
            name: "zero L2 penalty",
            head: "logistic",
            edit: |p| p.header["params"]["logistic_alpha"] = serde_json::json!(0.0),
            field: "params.logistic_alpha",
        },
        Case {
            name: "no classes",
            head: "centroid",
            edit: |p| p.header["labels"] = serde_json::json!([]),
            field: "labels",
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let crafted = dir.path().join("crafted.graft");
    let mut wrong = Vec::new();
    for case in &cases {
        let mut parts = open_head(&fixture(&format!(
            "heads/release-42bf848-{}.graft",
            case.head
        )));
        (case.edit)(&mut parts);
        seal_head(&parts, &crafted);
        let mut c = graft(dir.path());
        c.args(["predict", "--head"])
            .arg(&crafted)
            .arg(image("dog.jpg"));
        match std::panic::catch_unwind(AssertUnwindSafe(|| fails(c, case.field))) {
            Ok(err) if err.contains("crafted.graft") => {}
            _ => wrong.push(case.name),
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused naming file and field: {wrong:?}"
    );
    // The untouched file, sealed by the same code, still predicts (the harness is right).
    let parts = open_head(&fixture("heads/release-42bf848-logistic.graft"));
    seal_head(&parts, &crafted);
    let mut c = graft(dir.path());
    c.args(["predict", "--head"])
        .arg(&crafted)
        .arg(image("dog.jpg"));
    ok(c);
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
