//! Few-shot heads end to end on the composited Tux Paint photo set
//! (`tests/data/make_dataset.py`; `tests/run.sh` makes it before `cargo test`).
//!
//! Thresholds were measured on this data with these seeds and set with a margin; see the
//! closing notes of the heads issue for the measured figures.

use std::path::{Path, PathBuf};

use crate::common::*;

const BASE: [&str; 5] = ["birds", "mammals", "fruit", "vegetables", "flowers"];
/// Added later with `graft add`: five instruments, two photos of each (as a kiosk user captures).
const NEW_CLASS: &str = "instruments";
/// Never trained: tools, and sea animals (a hard case: mammals include whales and dolphins).
const NEVER_TRAINED: [&str; 2] = ["tools", "sea_animals"];

pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("GRAFT_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/graft-data/kiosk"));
    assert!(
        dir.join("MANIFEST.json").exists(),
        "test photo set missing at {}: run `bash tests/run.sh` (or `python3 tests/data/make_dataset.py`) first",
        dir.display()
    );
    dir
}

/// The first `n` photos (`*_0.jpg`: one per object, sorted) of a class of the test photo set.
pub fn photos(class: &str, n: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir().join(class))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_0.jpg"))
        .collect();
    v.sort();
    v.truncate(n);
    v
}

/// Stamps (object groups) of a class, sorted; each has images `<stamp>_0.jpg`, `<stamp>_1.jpg`.
fn stamps(class: &str) -> Vec<String> {
    let mut s: Vec<String> = std::fs::read_dir(data_dir().join(class))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .map(|s| s.rsplit_once('_').unwrap().0.to_string())
        })
        .collect();
    s.sort();
    s.dedup();
    s
}

/// Training stamps: every k-th, so the pick spreads over the alphabet; test: the others.
fn split(class: &str, shots: usize) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let all = stamps(class);
    let step = (all.len() / shots).max(1);
    let train_stamps: Vec<&String> = all.iter().step_by(step).take(shots).collect();
    let dir = data_dir().join(class);
    let train = train_stamps
        .iter()
        .map(|s| dir.join(format!("{s}_0.jpg")))
        .collect();
    let test = all
        .iter()
        .filter(|s| !train_stamps.contains(s))
        .map(|s| dir.join(format!("{s}_0.jpg")))
        .collect();
    (train, test)
}

fn link_into(dir: &Path, class: &str, files: &[PathBuf]) {
    let d = dir.join(class);
    std::fs::create_dir_all(&d).unwrap();
    for f in files {
        std::os::unix::fs::symlink(f, d.join(f.file_name().unwrap())).unwrap();
    }
}

struct Outcome {
    right: usize,
    unknown: usize,
    total: usize,
}

fn predict(cache: &Path, head: &Path, files: &[PathBuf], truth: Option<&str>) -> Outcome {
    let mut c = graft(cache);
    c.args(["predict", "--json", "--head"])
        .arg(head)
        .args(files);
    let lines = json_lines(&ok(c));
    assert_eq!(lines.len(), files.len());
    let mut o = Outcome {
        right: 0,
        unknown: 0,
        total: lines.len(),
    };
    for l in &lines {
        for key in ["path", "label", "score", "unknown", "top"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
        let s = l["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s));
        if l["unknown"].as_bool().unwrap() {
            assert_eq!(l["label"], "unknown");
            o.unknown += 1;
        }
        if Some(l["best"].as_str().unwrap()) == truth {
            o.right += 1;
        }
    }
    o
}

fn rate(n: usize, d: usize) -> f64 {
    n as f64 / d.max(1) as f64
}

#[test]
fn ten_shot_train_predict_add_and_reject() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let train_dir = t.join("train");
    let mut tests = Vec::new();
    for class in BASE {
        let (train, test) = split(class, 10);
        link_into(&train_dir, class, &train);
        tests.push((class, test.into_iter().take(12).collect::<Vec<_>>()));
    }
    let head = t.join("kiosk.graft");
    let mut c = graft(&cache);
    c.args(["train", "--json", "--head", "logistic", "--out"])
        .arg(&head)
        .arg(&train_dir);
    let s = &json_lines(&ok(c))[0];
    assert_eq!(s["head"], "logistic");
    assert_eq!(s["examples"], 50);
    assert_eq!(s["cv_method"], "loo");
    assert_eq!(s["calibration"], "leave-one-class-out");
    assert_eq!(s["cached"], 0);
    let threshold = s["threshold"].as_f64().unwrap();
    assert!(threshold > 0.0 && threshold < 1.0, "{threshold}");

    // Trained classes: mostly right, rarely rejected.
    let (mut right, mut unknown, mut total) = (0, 0, 0);
    for (class, files) in &tests {
        let o = predict(&cache, &head, files, Some(class));
        right += o.right;
        unknown += o.unknown;
        total += o.total;
    }
    let base_acc = rate(right, total);
    eprintln!(
        "measured: 10-shot accuracy {base_acc:.3}, known rejected {:.3}",
        rate(unknown, total)
    );
    assert!(base_acc >= 0.70, "10-shot accuracy {base_acc}");
    // The threshold rejects at most 20% of the held-out known answers in training (issue 16);
    // measured 12.5% here (GeM features, power 0.75). Before, the cap counted only the right
    // answers and this test allowed 40%.
    assert!(
        rate(unknown, total) <= 0.25,
        "known images rejected: {}",
        rate(unknown, total)
    );

    // Never-trained classes: mostly `unknown`.
    let (mut unk, mut n) = (0, 0);
    for class in NEVER_TRAINED {
        let (_, files) = split(class, 1);
        let o = predict(&cache, &head, &files, None);
        unk += o.unknown;
        n += o.total;
    }
    eprintln!(
        "measured: never-trained classes unknown rate {:.3}",
        rate(unk, n)
    );
    // Measured 43.5%: the other side of the same threshold (known kept 87.5%). The head's
    // score separates never-taught objects only so far (AUROC about 0.7 on these photo sets,
    // docs/few-shot.md), so keeping 80% of known answers leaves most never-taught ones
    // answered; this holds the measured figure with a margin.
    assert!(
        rate(unk, n) >= 0.30,
        "untrained images accepted: unknown rate {}",
        rate(unk, n)
    );

    // A sixth class, added in place: predictable, and the others not hurt.
    let (new_train, new_test) = split(NEW_CLASS, 5);
    let second_views: Vec<PathBuf> = new_train
        .iter()
        .map(|p| PathBuf::from(p.to_str().unwrap().replace("_0.jpg", "_1.jpg")))
        .collect();
    let new_train: Vec<PathBuf> = new_train.into_iter().chain(second_views).collect();
    let mut c = graft(&cache);
    c.args(["add", "--json", "--head"])
        .arg(&head)
        .args(["--label", NEW_CLASS])
        .args(&new_train);
    let s = &json_lines(&ok(c))[0];
    assert_eq!(s["examples"], 60);
    assert_eq!(s["labels"].as_array().unwrap().len(), 6);
    assert_eq!(s["cached"], 0, "new images are embedded");
    let o = predict(&cache, &head, &new_test, Some(NEW_CLASS));
    eprintln!(
        "measured: added class accuracy {:.3}",
        rate(o.right, o.total)
    );
    assert!(
        rate(o.right, o.total) >= 0.5,
        "new class accuracy {}",
        rate(o.right, o.total)
    );
    let mut right = 0;
    for (class, files) in &tests {
        right += predict(&cache, &head, files, Some(class)).right;
    }
    eprintln!("measured: old classes after add {:.3}", rate(right, total));
    assert!(
        rate(right, total) >= base_acc - 0.10,
        "old classes hurt: {} vs {base_acc}",
        rate(right, total)
    );

    // Adding the same pictures again changes nothing, and re-training comes from the cache.
    let mut c = graft(&cache);
    c.args(["add", "--json", "--head"])
        .arg(&head)
        .args(["--label", NEW_CLASS])
        .args(&new_train);
    assert_eq!(json_lines(&ok(c))[0]["examples"], 60);
    let mut c = graft(&cache);
    c.args(["train", "--json", "--head", "centroid", "--out"])
        .arg(t.join("again.graft"))
        .arg(&train_dir);
    assert_eq!(json_lines(&ok(c))[0]["cached"], 50);

    // --threshold overrides: 0 accepts everything, 1 rejects everything.
    let files = &tests[0].1[..3];
    assert_eq!(predict_with_threshold(&cache, &head, files, "0").unknown, 0);
    assert_eq!(predict_with_threshold(&cache, &head, files, "1").unknown, 3);
}

fn predict_with_threshold(cache: &Path, head: &Path, files: &[PathBuf], thr: &str) -> Outcome {
    let mut c = graft(cache);
    c.args(["predict", "--json", "--threshold", thr, "--head"])
        .arg(head)
        .args(files);
    let lines = json_lines(&ok(c));
    Outcome {
        right: 0,
        unknown: lines
            .iter()
            .filter(|l| l["unknown"].as_bool().unwrap())
            .count(),
        total: lines.len(),
    }
}

#[test]
fn auto_chooses_by_cross_validation_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let train_dir = tmp.path().join("train");
    for class in BASE {
        link_into(&train_dir, class, &split(class, 3).0);
    }
    let mut c = graft(&tmp.path().join("cache"));
    c.args(["train", "--json", "--out"])
        .arg(tmp.path().join("h.graft"))
        .arg(&train_dir);
    let s = &json_lines(&ok(c))[0];
    let cands = s["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 4);
    let acc = |h: &serde_json::Value| {
        cands.iter().find(|c| c["head"] == *h).unwrap()["cv_accuracy"]
            .as_f64()
            .unwrap()
    };
    // Logistic is kept unless another head's lead is beyond the noise of the comparison
    // (issue 16: auto chose centroid for one example's difference in 30).
    let reason = s["auto_reason"].as_str().unwrap();
    let chosen = &s["head"];
    assert!(reason.starts_with(chosen.as_str().unwrap()), "{reason}");
    if chosen == "logistic" {
        assert!(reason.contains("kept"), "{reason}");
    } else {
        assert!(acc(chosen) > acc(&"logistic".into()), "{reason}");
        assert!(reason.contains("standard errors"), "{reason}");
    }
    assert_eq!(s["cv_accuracy"].as_f64().unwrap(), acc(chosen));
    assert_eq!(s["power"].as_f64().unwrap(), 0.75);
}

#[test]
fn eval_and_curve_measure_and_draw() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    // The five base classes, all images.
    let ds = t.join("base");
    std::fs::create_dir(&ds).unwrap();
    for class in BASE {
        std::os::unix::fs::symlink(data_dir().join(class), ds.join(class)).unwrap();
    }
    let svg = t.join("confusion.svg");
    let mut c = graft(&cache);
    c.args(["eval", "--json", "--shots", "5", "--trials", "3", "--plot"])
        .arg(&svg)
        .arg(&ds);
    let r = &json_lines(&ok(c))[0];
    let acc = r["accuracy"].as_f64().unwrap();
    eprintln!("measured: eval 5-shot logistic accuracy {acc:.3}");
    assert!(acc >= 0.58, "eval 5-shot accuracy {acc}");
    assert_eq!(r["per_class"].as_array().unwrap().len(), 5);
    let pic = std::fs::read_to_string(&svg).unwrap();
    assert!(
        pic.contains("<svg") && pic.contains("mammals"),
        "not a confusion matrix picture"
    );

    let curve = t.join("curve.svg");
    let mut c = graft(&cache);
    c.args([
        "curve", "--json", "--shots", "1,5", "--trials", "3", "--heads", "logistic", "--plot",
    ])
    .arg(&curve)
    .arg(&ds);
    let r = &json_lines(&ok(c))[0];
    let point = |features: &str, shots: u64| -> f64 {
        r["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["features"] == features && p["shots"] == shots)
            .unwrap()["accuracy"]
            .as_f64()
            .unwrap()
    };
    for shots in [1, 5] {
        let (b, p) = (point("backbone", shots), point("pixels", shots));
        eprintln!("measured: {shots}-shot logistic: backbone {b:.3}, pixels {p:.3}");
        assert!(b > p + 0.2, "{shots}-shot: backbone {b} vs pixels {p}");
    }
    assert!(point("backbone", 5) > point("backbone", 1));
    let pic = std::fs::read_to_string(&curve).unwrap();
    assert!(pic.contains("<svg") && pic.contains("raw pixels"));

    // Default k-fold mode (grouped by object) works too.
    let mut c = graft(&cache);
    c.args(["eval", "--json", "--folds", "3", "--head", "centroid"])
        .arg(&ds);
    let r = &json_lines(&ok(c))[0];
    assert_eq!(r["splits"], 3);
    eprintln!(
        "measured: 3-fold centroid accuracy {:.3}",
        r["accuracy"].as_f64().unwrap()
    );
    assert!(r["accuracy"].as_f64().unwrap() >= 0.70);
}

fn small_head(t: &Path, cache: &Path, model: &str) -> PathBuf {
    let train_dir = t.join("small");
    if !train_dir.exists() {
        for class in ["birds", "fruit"] {
            link_into(&train_dir, class, &split(class, 2).0);
        }
    }
    let head = t.join(format!("{model}.graft"));
    let mut c = graft(cache);
    c.args(["train", "--head", "centroid", "--model", model, "--out"])
        .arg(&head)
        .arg(&train_dir);
    ok(c);
    head
}

/// Regression (issue 15): `graft add` only refused empty names and `unknown`, so it accepted
/// class names that `capture`, the kiosk protocol and the folder layout cannot use (`a,b`,
/// `x y`, a newline, `../up`). Every front end now validates with the one `Label` rule; the
/// head file is left as it was.
#[test]
fn add_refuses_class_names_no_other_front_end_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let head = small_head(t, &cache, "efficientnet-lite0-fp32");
    let before = std::fs::read(&head).unwrap();
    let (extra, _) = split("flowers", 1);
    for bad in ["a,b", "x y", "two\nlines", "../up", "UNKNOWN", ".hidden"] {
        let mut c = graft(&cache);
        c.args(["add", "--head"])
            .arg(&head)
            .args(["--label", bad])
            .args(&extra);
        fails(c, "class name");
        assert_eq!(
            std::fs::read(&head).unwrap(),
            before,
            "{bad:?} changed the head"
        );
    }
    // The same rule for a class folder given to `train`.
    let bad_set = t.join("bad-set");
    link_into(&bad_set, "fruit", &split("fruit", 2).0);
    let (birds, _) = split("birds", 2);
    std::fs::create_dir_all(bad_set.join("unknown")).unwrap();
    for (i, f) in birds.iter().enumerate() {
        std::fs::copy(f, bad_set.join("unknown").join(format!("b{i}.jpg"))).unwrap();
    }
    let mut c = graft(&cache);
    c.args(["train", "--out"])
        .arg(t.join("x.graft"))
        .arg(&bad_set);
    fails(c, "class folder");
    assert!(!t.join("x.graft").exists());
}

/// Head files written by the release before the library/binary split (tests/fixtures/heads)
/// still load and predict exactly what that release predicted.
#[test]
fn heads_written_by_the_previous_release_predict_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["centroid", "logistic"] {
        let head = fixture(&format!("heads/release-42bf848-{kind}.graft"));
        let want = std::fs::read_to_string(fixture(&format!(
            "heads/release-42bf848-{kind}.predictions.jsonl"
        )))
        .unwrap();
        let want = json_lines(&want);
        assert_eq!(want.len(), PHOTOS.len(), "{kind}");
        let mut c = graft(tmp.path());
        c.args(["--json", "predict", "--top", "2", "--head"])
            .arg(&head);
        for w in &want {
            c.arg(image(w["path"].as_str().unwrap()));
        }
        let mut runs = vec![json_lines(&ok(c))];
        // Exported (no power transform: power 1), the head answers the same through ONNX.
        let onnx = tmp.path().join(format!("{kind}.onnx"));
        let mut c = graft(tmp.path());
        c.args(["export", "--head"])
            .arg(&head)
            .arg("--out")
            .arg(&onnx);
        ok(c);
        let mut c = graft(tmp.path());
        c.args(["--json", "--model"])
            .arg(&onnx)
            .args(["predict", "--top", "2"]);
        for w in &want {
            c.arg(image(w["path"].as_str().unwrap()));
        }
        runs.push(json_lines(&ok(c)));
        for got in &runs {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let what = format!("{kind} {}", w["path"]);
                for k in ["label", "best", "unknown"] {
                    assert_eq!(g[k], w[k], "{what}: {k}");
                }
                for (gt, wt) in g["top"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(w["top"].as_array().unwrap())
                {
                    assert_eq!(gt["label"], wt["label"], "{what}");
                    let (a, b) = (gt["score"].as_f64().unwrap(), wt["score"].as_f64().unwrap());
                    assert!((a - b).abs() < 1e-5, "{what}: score {a} vs {b}");
                }
            }
        }
    }
}

/// A writer killed half-way through rewriting a head leaves the previous head intact.
#[test]
#[cfg(feature = "fault-injection")] // the write pause that lets the test kill mid-write
fn killed_writer_leaves_the_previous_head_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let head = small_head(t, &cache, "efficientnet-lite0-int8");
    let before = std::fs::read(&head).unwrap();
    let (extra, _) = split("flowers", 2);
    let mut c = graft(&cache);
    c.env(graft::store::FAULT_PAUSE_ENV, "30000")
        .args(["add", "--head"])
        .arg(&head)
        .args(["--label", "flowers"])
        .args(&extra);
    let mut child = c.spawn().unwrap();
    // Wait until the half-written temp file exists, then pull the plug.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let tmp_exists = std::fs::read_dir(t).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".graft-tmp-")
        });
        if tmp_exists {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writer never started writing"
        );
        assert!(child.try_wait().unwrap().is_none(), "writer exited early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(&head).unwrap(), before, "head file changed");
    let file = graft::store::headfile::read(&head).unwrap();
    assert_eq!(file.examples.len(), 4);
    let o = predict(&cache, &head, &extra[..1], None);
    assert_eq!(o.total, 1);
}

#[test]
fn foreign_truncated_and_missing_heads_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let head = small_head(t, &cache, "efficientnet-lite0-int8");
    let photo = image("dog.jpg");

    let mut c = graft(&cache);
    c.args(["predict", "--model", "efficientnet-lite0-fp32", "--head"])
        .arg(&head)
        .arg(&photo);
    fails(c, "trained on backbone efficientnet-lite0-int8");

    let bytes = std::fs::read(&head).unwrap();
    let cut = t.join("cut.graft");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let mut c = graft(&cache);
    c.args(["predict", "--head"]).arg(&cut).arg(&photo);
    fails(c, "damaged or truncated");

    let mut c = graft(&cache);
    c.args(["predict", "--head"]).arg(&photo).arg(&photo);
    fails(c, "not a graft head file");

    let mut c = graft(&cache);
    c.args(["predict", "--head"])
        .arg(t.join("nope.graft"))
        .arg(&photo);
    fails(c, "nope.graft");

    // One class only is not a classifier.
    let one = t.join("one");
    link_into(&one, "birds", &split("birds", 2).0);
    let mut c = graft(&cache);
    c.args(["train", "--out"])
        .arg(t.join("one.graft"))
        .arg(&one);
    fails(c, "at least 2 class");
}

/// Regression (issue 12): 6 classes × 5 photos of only 2 objects each. Holding out one object
/// leaves one per class, and the held-out scores are no better than chance: the temperature
/// fit ran to the bottom of its grid (0.0001), where every score is 1/6, and the threshold
/// calibrated from those scores was 1/6 too, so every answer sat exactly on the threshold.
/// The fit now lands on the end of the kind's temperature range, so training falls back to
/// the kind's default temperature and says why.
#[test]
fn degenerate_calibration_falls_back_to_the_default_temperature_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, cache) = (tmp.path(), tmp.path().join("cache"));
    let train_dir = t.join("train");
    let classes = [
        "birds",
        "mammals",
        "fruit",
        "vegetables",
        "flowers",
        "tools",
    ];
    let mut others = Vec::new();
    for class in classes {
        let all = stamps(class);
        let dir = data_dir().join(class);
        let photos: Vec<PathBuf> = all[2..4]
            .iter()
            .flat_map(|s| [0, 1].map(|n| dir.join(format!("{s}_{n}.jpg"))))
            .collect();
        link_into(&train_dir, class, &photos);
        // The fifth photo: the first object's first frame again (as a camera burst gives).
        std::fs::copy(
            &photos[0],
            train_dir.join(class).join(format!("{}_2.jpg", all[2])),
        )
        .unwrap();
        others.extend(all[5..7].iter().map(|s| dir.join(format!("{s}_0.jpg"))));
    }
    let head = t.join("h.graft");
    let mut c = graft(&cache);
    c.args(["train", "--json", "--head", "logistic", "--out"])
        .arg(&head)
        .arg(&train_dir);
    let s = &json_lines(&ok(c))[0];
    assert_eq!(s["examples"], 30);
    assert_eq!(s["cv_method"], "leave-one-object-out");
    let temperature = s["temperature"].as_f64().unwrap();
    let threshold = s["threshold"].as_f64().unwrap();
    eprintln!(
        "measured: temperature {temperature}, threshold {threshold}, cv accuracy {}, {}",
        s["cv_accuracy"], s["temperature_fallback"]
    );
    assert_eq!(temperature, 1.0, "the logistic head's default");
    let why = s["temperature_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("chance"), "{s}");
    // The scores spread out again: not every one on the threshold.
    let mut c = graft(&cache);
    c.args(["predict", "--json", "--head"])
        .arg(&head)
        .args(&others);
    let scores: Vec<f64> = json_lines(&ok(c))
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    let on_threshold = scores
        .iter()
        .filter(|s| (*s - threshold).abs() < 1e-3)
        .count();
    assert!(on_threshold <= 1, "{scores:?} vs threshold {threshold}");
    let spread = scores.iter().cloned().fold(f64::MIN, f64::max)
        - scores.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.05, "scores {scores:?}");
    // Without --json, `graft train` says so in words.
    let mut c = graft(&cache);
    c.args(["train", "--head", "logistic", "--out"])
        .arg(t.join("again.graft"))
        .arg(&train_dir);
    let text = ok(c);
    assert!(
        text.contains("temperature not fitted") && text.contains("chance"),
        "{text}"
    );
}

/// Regression (issue 18, defect 5): two `graft add` at once on one head lost one's examples
/// (20 of 20 runs, both exiting 0). Now the second waits for the first (a folder lock) and
/// reads the head again before adding.
#[test]
fn two_adds_at_once_on_one_head_both_land() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let pick = |class: &str, n: usize| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir().join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v.truncate(n);
        v
    };
    let train = t.path().join("train");
    for class in ["birds", "fruit"] {
        std::fs::create_dir_all(train.join(class)).unwrap();
        for f in pick(class, 3) {
            std::fs::copy(&f, train.join(class).join(f.file_name().unwrap())).unwrap();
        }
    }
    let base = t.path().join("base.graft");
    let mut c = graft(&cache);
    c.args(["train", "--head", "centroid", "--out"])
        .arg(&base)
        .arg(&train);
    ok(c);
    for round in 0..3 {
        let head = t.path().join(format!("h{round}.graft"));
        std::fs::copy(&base, &head).unwrap();
        let add = |class: &str| {
            let mut c = graft(&cache);
            c.args(["add", "--json", "--head"])
                .arg(&head)
                .args(["--label", class])
                .args(pick(class, 4));
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (add("tools"), add("flowers"));
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let h = graft::store::headfile::read(&head).unwrap();
        let mut labels = h.head.labels.clone();
        labels.sort();
        assert_eq!(
            labels,
            ["birds", "flowers", "fruit", "tools"],
            "round {round}"
        );
        assert_eq!(h.examples.len(), 14, "round {round}");
    }
}
