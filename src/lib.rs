//! # graft — grow new image classifiers on the edge
//!
//! A frozen, pretrained, quantised ONNX backbone is the *rootstock*: it turns a picture into an
//! embedding (and can classify ImageNet directly). A small classifier trained on the device from
//! a handful of examples is the *scion* grafted onto it.
//!
//! Modules, each owning one outside dependency and hiding its types:
//!
//! | module | owns | does |
//! |---|---|---|
//! | [`backbone`] | tract, image | manifests, decoding, preprocessing, embeddings, ImageNet top-k |
//! | [`head`] | linfa | few-shot heads: fit, cross-validate, calibrate, predict, metrics |
//! | [`store`] | serde_json, tempfile | atomic files: head files, embedding files, the embedding cache, image folders |
//! | [`plot`] | plotters | confusion matrices and learning curves as SVG |
//! | `gpu` (feature `gpu`) | wgpu | the backbone's forward pass on a GPU: graft's WGSL executor |
//!
//! Dependencies point one way: `cli → plot/store → head → backbone`, `cli → gpu → backbone`.
//!
//! Cargo features, by axis: `serial` (default: UART kiosks), `camera` (V4L2 cameras through
//! nokhwa), `gpu` (wgpu; `--device auto|cpu|gpu`).
//!
//! ```no_run
//! use graft::backbone::Backbone;
//! let bb = Backbone::load_named("efficientnet-lite0")?;
//! let top = bb.classify_file(std::path::Path::new("cat.jpg"), 5)?;
//! println!("{} {:.3}", top[0].label, top[0].probability);
//! # Ok::<(), graft::backbone::BackboneError>(())
//! ```

pub mod backbone;
pub mod board;
pub mod capture;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod head;
pub mod kiosk;
pub mod live;
pub mod plot;
#[cfg(feature = "serial")]
pub mod serial;
pub mod store;
