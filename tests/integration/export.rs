//! `graft export`: the exported ONNX file gives the same labels and scores as the head, in
//! tract (through `graft predict --model`) and in onnxruntime (reference script).

use std::path::{Path, PathBuf};

use crate::common::*;

/// A small 3-class head of the given kind, trained on fixture-free photo-set pictures.
fn head(t: &Path, cache: &Path, kind: &str) -> PathBuf {
    head_on(t, cache, kind, "efficientnet-lite0-fp32")
}

fn head_on(t: &Path, cache: &Path, kind: &str, model: &str) -> PathBuf {
    let data = crate::heads::data_dir();
    let train = t.join("train");
    if !train.exists() {
        for class in ["birds", "fruit", "flowers"] {
            let d = train.join(class);
            std::fs::create_dir_all(&d).unwrap();
            let mut files: Vec<PathBuf> = std::fs::read_dir(data.join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files.iter().step_by(4).take(6) {
                std::os::unix::fs::symlink(f, d.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let out = t.join(format!("{kind}-{model}.graft"));
    let mut c = graft(cache);
    c.args(["train", "--head", kind, "--model", model, "--out"])
        .arg(&out)
        .arg(&train);
    ok(c);
    out
}

/// Lossless pictures (exact decode on both sides) plus two camera-like JPEGs.
fn pictures() -> Vec<PathBuf> {
    let mut v = vec![
        image("camera_gray.png"),
        image("astronaut_rgba.png"),
        fixture("decoded/dog.png"),
        fixture("decoded/eagle.png"),
    ];
    v.push(image("giraffe.jpg"));
    v
}

fn predictions(
    cache: &Path,
    args: &[&str],
    model_or_head: &Path,
    files: &[PathBuf],
) -> Vec<serde_json::Value> {
    let mut c = graft(cache);
    c.args(["predict", "--json"])
        .args(args)
        .arg(model_or_head)
        .args(files);
    json_lines(&ok(c))
}

#[test]
fn exported_models_agree_with_their_heads_in_tract_and_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let files = pictures();
    for kind in ["logistic", "centroid", "knn"] {
        let h = head(t, &cache, kind);
        let want = predictions(&cache, &["--head"], &h, &files);
        for (variant, extra) in [("probabilities", None), ("logits", Some("--logits"))] {
            let onnx = t.join(format!("{kind}-{variant}.onnx"));
            let mut c = graft(&cache);
            c.args(["export", "--json", "--head"])
                .arg(&h)
                .arg("--out")
                .arg(&onnx)
                .args(extra);
            let s = &json_lines(&ok(c))[0];
            assert_eq!(s["classes"], 3);
            let got = predictions(&cache, &["--model"], &onnx, &files);
            for (w, g) in want.iter().zip(&got) {
                assert_eq!(w["label"], g["label"], "{kind}/{variant}: {w} vs {g}");
                assert_eq!(w["unknown"], g["unknown"]);
                for (a, b) in w["top"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(g["top"].as_array().unwrap())
                {
                    assert_eq!(a["label"], b["label"]);
                    let d = (a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs();
                    assert!(
                        d <= 1e-4,
                        "{kind}/{variant} {}: score differs by {d}",
                        w["path"]
                    );
                }
            }
        }
        // onnxruntime on the same file, lossless pictures only (JPEG decoders differ).
        let lossless: Vec<PathBuf> = files
            .iter()
            .filter(|p| p.extension().unwrap() == "png")
            .cloned()
            .collect();
        let preds = t.join(format!("{kind}.jsonl"));
        let mut c = graft(&cache);
        c.args(["predict", "--json", "--head"])
            .arg(&h)
            .args(&lossless);
        std::fs::write(&preds, ok(c)).unwrap();
        let text = onnxruntime_check(
            &t.join(format!("{kind}-probabilities.onnx")),
            &preds,
            "1e-4",
        );
        assert!(text.contains("4 passed, 0 failed"), "{text}");
    }
}

pub(crate) fn onnxruntime_check(onnx: &Path, preds: &Path, tol: &str) -> String {
    let python = root().join("target/pyenv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run `bash tests/run.sh`, which installs onnxruntime there",
        python.display()
    );
    let out = std::process::Command::new(&python)
        .arg(root().join("tests/fixtures/check_export_onnxruntime.py"))
        .args([onnx, preds])
        .args(["--tol", tol])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "onnxruntime disagrees:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// int8: tract's and onnxruntime's int8 kernels round differently (embeddings agree at cosine
/// ~0.999), so scores agree to ~1e-2 and labels exactly.
#[test]
fn int8_exports_agree_with_onnxruntime_on_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let h = head_on(t, &cache, "logistic", "efficientnet-lite0-int8");
    let onnx = t.join("int8.onnx");
    let mut c = graft(&cache);
    c.args(["export", "--head"]).arg(&h).arg("--out").arg(&onnx);
    ok(c);
    let files: Vec<PathBuf> = pictures()
        .into_iter()
        .filter(|p| p.extension().unwrap() == "png")
        .collect();
    let preds = t.join("int8.jsonl");
    let mut c = graft(&cache);
    c.args(["predict", "--json", "--head"]).arg(&h).args(&files);
    std::fs::write(&preds, ok(c)).unwrap();
    let text = onnxruntime_check(&onnx, &preds, "0.03");
    assert!(text.contains("4 passed, 0 failed"), "{text}");
}

#[test]
fn json_export_bayes_refusal_and_plain_onnx_refusal() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let h = head(t, &cache, "logistic");
    let out = t.join("head.json");
    let mut c = graft(&cache);
    c.args(["export", "--format", "json", "--head"])
        .arg(&h)
        .arg("--out")
        .arg(&out);
    ok(c);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(j["graft_head_json"], 1);
    assert_eq!(j["labels"].as_array().unwrap().len(), 3);
    assert_eq!(j["weights"].as_array().unwrap().len(), 3);
    assert_eq!(j["weights"][0].as_array().unwrap().len(), 1280);
    assert!(j["threshold"].as_f64().unwrap() > 0.0);

    let b = head(t, &cache, "bayes");
    let mut c = graft(&cache);
    c.args(["export", "--head"])
        .arg(&b)
        .arg("--out")
        .arg(t.join("b.onnx"));
    fails(c, "cannot be exported yet");
    assert!(!t.join("b.onnx").exists());

    let mut c = graft(&cache);
    c.args(["predict", "--model"])
        .arg(root().join("models/efficientnet-lite0/fp32.onnx"))
        .arg(image("dog.jpg"));
    fails(c, "no graft metadata");
    let mut c = graft(&cache);
    c.args(["predict"]).arg(image("dog.jpg"));
    fails(c, "--head");
}
