//! Bad input gets one clear error line naming the file and exit code 1, never a panic.

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
