//! # graft — grow new image classifiers on the edge
//!
//! A frozen, pretrained, quantised ONNX backbone is the *rootstock*: it turns a picture into an
//! embedding (and can classify ImageNet directly). A small classifier trained on the device from
//! a handful of examples is the *scion* grafted onto it. This crate is the library; the `graft`
//! command line (`cli/`) is a thin front end over it, as are the serial/TCP kiosk and the live
//! camera loop, which live here.
//!
//! ## The few things most programs need
//!
//! | item | what it is |
//! |---|---|
//! | [`Backbone`] | a loaded model: [`Backbone::load_named`], [`Backbone::embed_file`], [`Backbone::classify_file`] |
//! | [`ImageFolder`] | a labelled folder `DATASET/<label>/*.jpg` |
//! | [`ExampleSet`] | class names + stored examples; [`ExampleSet::fit`] trains a head |
//! | [`HeadFile`] | a trained head with its examples, as saved: [`headfile::write`] / [`headfile::read`] |
//! | [`Head`] | the fitted classifier: [`Head::predict`] gives a [`Prediction`] (label or `unknown`) |
//! | [`add_examples`] | **the** way examples are added to a head file or a kiosk, then refit |
//! | [`Label`] | a validated class name, the same rule for every front end |
//! | [`FrameSource`] | frames from a camera or images ([`capture::open`]) |
//! | [`Kiosk`] | the kiosk's state in a data folder, driven by the line protocol ([`kiosk`]) |
//!
//! `examples/few_shot.rs` embeds a folder, trains, saves, reloads and predicts with these alone.
//!
//! ## Modules
//!
//! Each owns one outside dependency and hides its types behind graft's own:
//!
//! | module | owns | does |
//! |---|---|---|
//! | [`backbone`] | tract, image, prost | manifests, decoding, preprocessing, embeddings, ImageNet top-k, export |
//! | [`head`] | linfa, ndarray | few-shot heads: fit, cross-validate, calibrate, evaluate, predict; labels |
//! | [`store`] | serde_json, tempfile, sha2 | atomic files: head files, embedding files, the cache, image folders; adding examples |
//! | [`capture`] | nokhwa (feature `camera`), glob | frame sources: V4L2 cameras, image files, memory |
//! | [`live`] | — | one frame → label with per-stage times; temporal smoothing |
//! | [`kiosk`] | — (std TCP) | the line protocol, the kiosk's data folder, the request loop |
//! | `serial` (feature `serial`) | serialport | serial ports and PTY pairs |
//! | `gpu` (feature `gpu`) | wgpu | the backbone's forward pass on a GPU: graft's WGSL executor |
//! | [`board`] | toml | board profiles (`boards/*.toml`) and detection |
//! | [`plot`] | plotters | confusion matrices and learning curves as SVG |
//! | [`userfile`] | — | opening the files a user names: regular files only (a FIFO would block) |
//!
//! Dependencies point one way: `kiosk → live → capture / store → head → backbone`,
//! `gpu → backbone`, `board → capture`. The library never reads the environment (the binary
//! does, and passes options down), never touches the network, and writes every file that
//! matters atomically.
//!
//! Cargo features, by axis: `serial` (default: UART kiosks), `camera` (V4L2 cameras through
//! nokhwa), `gpu` (wgpu; [`DeviceChoice`]), `fault-injection` (tests only).
//!
//! ```no_run
//! use graft::Backbone;
//! let bb = Backbone::load_named("efficientnet-lite0")?;
//! let top = bb.classify_file(std::path::Path::new("cat.jpg"), 5)?;
//! println!("{} {:.3}", top[0].label, top[0].probability);
//! # Ok::<(), graft::BackboneError>(())
//! ```

#![warn(missing_docs)]

pub mod backbone;
pub mod board;
pub mod capture;
#[cfg(feature = "fleet")]
pub mod fleet;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod head;
pub mod kiosk;
pub mod live;
pub mod plot;
#[cfg(feature = "serial")]
pub mod serial;
pub mod store;
pub mod userfile;
#[cfg(feature = "web")]
pub mod web;

pub use backbone::{
    Backbone, BackboneError, BackboneId, CpuKernels, DeviceChoice, Embedding, FieldError,
    LoadOptions, ModelSpec, RgbFrame,
};
pub use capture::{CaptureError, Frame, FrameSource, SourceSpec};
pub use head::{Examples, Head, HeadError, HeadKind, HeadParams, Label, LabelError, Prediction};
pub use kiosk::{Kiosk, KioskError};
pub use store::dataset::ImageFolder;
pub use store::headfile::{self, Example, HeadFile};
pub use store::learn::{
    add_examples, ExampleSet, ExampleStore, FrameSaver, HeadFileStore, LearnError, NewExample,
};
pub use store::StoreError;

/// The module map held by a test: each outside crate is named only inside the module that owns
/// it (ARCHITECTURE.md, "Module map"). A crate per module would have the compiler hold it, at
/// the price of public cross-crate APIs for today's `pub(crate)` seams; this test holds the
/// same rule for the price of a file scan.
#[cfg(test)]
mod ownership {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn each_outside_crate_is_named_only_in_the_module_that_owns_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let owners: &[(&[&str], &str)] = &[
            (
                &[
                    "tract_onnx::",
                    "tract_linalg::",
                    "tract_core::",
                    "prost::",
                    "image::",
                ],
                "backbone/",
            ),
            (
                &[
                    "linfa::",
                    "linfa_logistic::",
                    "linfa_nn::",
                    "linfa_bayes::",
                    "ndarray::",
                ],
                "head/",
            ),
            (&["wgpu::", "pollster::", "bytemuck::"], "gpu/"),
            (&["nokhwa::"], "capture/"),
            (&["serialport::"], "serial/"),
            (
                &[
                    "rumqttc::",
                    "rustls::",
                    "rustls_pemfile::",
                    "rustls_native_certs::",
                ],
                "fleet/",
            ),
            (&["plotters::"], "plot.rs"),
            (&["httparse::", "percent_encoding::"], "web/"),
            (&["tar::"], "store/backup.rs"),
        ];
        let mut files = Vec::new();
        sources(&src, &mut files);
        assert!(files.len() > 20, "found only {} sources", files.len());
        let mut wrong = Vec::new();
        for f in &files {
            let rel = f
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(f).unwrap();
            for (names, owner) in owners {
                for name in *names {
                    let named = text.lines().any(|l| {
                        let code = l.split("//").next().unwrap_or("");
                        code.match_indices(name).any(|(i, _)| {
                            // a whole path segment (not `my_image::`), outside a string
                            let before = if i == 0 { b' ' } else { code.as_bytes()[i - 1] };
                            !(before.is_ascii_alphanumeric() || before == b'_' || before == b'"')
                        })
                    });
                    if named && !rel.starts_with(owner) {
                        wrong.push(format!("{rel} names {name} (owned by {owner})"));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
