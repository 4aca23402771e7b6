//! Head files: `headfile::from_bytes` on any bytes, as given and sealed.
//!
//! A head file ends with the sha256 of everything before it, so random bytes stop at the
//! checksum; the target also reads `data + sha256(data)`, which takes mutated content past it
//! (the seed corpus holds head files without their sha256). Properties, beyond "no panic":
//! - a head that is read predicts on a finite vector of its size (up to 65 536 values) without
//!   an error, and a known label passes its threshold;
//! - a head that is read writes (`to_bytes`) and reads back the same.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/headfile.rs`) and the test that replays every
//! committed seed (`tests/integration/fuzz_seeds.rs`).

use std::path::Path;

use graft::store::headfile;
use sha2::{Digest, Sha256};

const MAX_PREDICT_DIM: usize = 1 << 16;

/// A finite vector from the data's hash (xorshift64*): values in [-8, 8), some exact zeros.
fn vector(seed: &[u8], dim: usize) -> Vec<f32> {
    let d = Sha256::digest(seed);
    let mut s = u64::from_le_bytes(d[..8].try_into().unwrap_or_default()) | 1;
    (0..dim)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
            if r % 7 == 0 {
                0.0
            } else {
                ((r >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
            }
        })
        .collect()
}

fn check(bytes: &[u8]) {
    let path = Path::new("fuzz.graft");
    let Ok(file) = headfile::from_bytes(bytes, path) else {
        return;
    };
    let dim = file.backbone.dim;
    if dim <= MAX_PREDICT_DIM {
        let v = vector(bytes, dim);
        let p = file
            .head
            .predict(&v, None, 3)
            .expect("a head read from a file predicts on a vector of its size");
        if !p.unknown {
            assert!(
                p.score.is_finite() && p.score >= file.head.threshold,
                "{p:?}"
            );
            assert!(file.head.labels.contains(&p.label));
        }
    }
    let again = headfile::to_bytes(&file, path).expect("a head that was read writes");
    let back = headfile::from_bytes(&again, path).expect("a written head reads back");
    assert_eq!(back, file, "write + read changed the head");
}

/// One input, as the fuzz target gets it: panics on a finding.
pub fn one(data: &[u8]) {
    check(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&Sha256::digest(data));
    check(&sealed);
}
