//! graft as a library, no command line: embed a labelled image folder with the bundled
//! backbone, train a head (its kind chosen by cross-validation), save it, read it back, and
//! predict new pictures with it.
//!
//! ```sh
//! cargo run --release --example few_shot -- DATASET HEAD_OUT IMAGE...
//! # e.g. after `bash tests/run.sh` has made the photo set:
//! cargo run --release --example few_shot -- target/graft-data/kiosk/train /tmp/kiosk.graft \
//!     target/graft-data/kiosk/test/apple
//! ```
//!
//! `DATASET` is `DATASET/<label>/*.jpg`; each `IMAGE` is a file or a folder of them.

use std::path::PathBuf;

use graft::{Backbone, ImageFolder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [dataset, out, photos @ ..] = args.as_slice() else {
        return Err("usage: few_shot DATASET HEAD_OUT IMAGE...".into());
    };

    // The rootstock: the bundled EfficientNet-Lite0, compiled into the library.
    let backbone = Backbone::load_named(graft::backbone::DEFAULT_MODEL)?;

    // 1. Embed the folder (no cache here: `graft::store::cache::Cache` adds one).
    let (set, _) = ImageFolder::scan(dataset)?.embed(&backbone, None, |_| {})?;

    // 2. Train: `None` lets cross-validation choose the head type.
    let (file, trained) = set.fit(backbone.id(), None, &graft::HeadParams::default(), 0)?;
    println!(
        "{} head on {} examples of {} classes, held-out accuracy {:.1}% ({})",
        file.head.kind,
        file.examples.len(),
        file.head.labels.len(),
        trained.report.accuracy * 100.0,
        trained.report.method
    );

    // 3. Save atomically, 4. read it back (checked against the backbone that will run it).
    graft::headfile::write(out, &file)?;
    let head = graft::headfile::read(out)?;
    backbone.id().check_file(&head.backbone, out)?;

    // 5. Predict.
    for photo in graft::store::files::collect_images(photos)? {
        let e = backbone.embed_file(&photo)?;
        let p = head.head.predict(&e.vector, None, 3)?;
        println!("{}: {} {:.3}", photo.display(), p.label, p.score);
    }
    Ok(())
}
