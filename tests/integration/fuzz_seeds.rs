//! Every committed fuzz seed (`fuzz/corpus/<target>/`) through its fuzz target's checks, in the
//! test build (debug assertions on, no sanitizer): what the fuzzers once found and the inputs
//! they start from stay covered by every test run, with no nightly toolchain or instrumented
//! build (`bash fuzz/run.sh SECONDS` is the fuzzing itself).

#[path = "../../fuzz/checks/export_meta.rs"]
mod export_meta;
#[path = "../../fuzz/checks/headfile.rs"]
mod headfile;
#[path = "../../fuzz/checks/image.rs"]
mod image;
#[path = "../../fuzz/checks/manifest.rs"]
mod manifest;
#[path = "../../fuzz/checks/protocol.rs"]
mod protocol;

/// A fuzz target's checks on one input.
type Check = fn(&[u8]);

#[test]
fn every_committed_fuzz_seed_passes_its_targets_checks() {
    let targets: [(&str, Check); 5] = [
        ("export_meta", export_meta::one),
        ("headfile", headfile::one),
        ("image", image::one),
        ("manifest", manifest::one),
        ("protocol", protocol::one),
    ];
    let root = crate::common::root().join("fuzz");
    let listed = std::fs::read_dir(root.join("fuzz_targets"))
        .unwrap()
        .count();
    assert_eq!(
        listed,
        targets.len(),
        "a fuzz target without its seeds' test"
    );
    for (name, one) in targets {
        let dir = root.join("corpus").join(name);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        seeds.sort();
        assert!(seeds.len() >= 5, "{name}: only {} seeds", seeds.len());
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            let outcome = std::panic::catch_unwind(|| one(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} fails its checks",
                seed.display()
            );
        }
    }
}
