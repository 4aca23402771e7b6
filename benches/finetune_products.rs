//! The matrix products of fine-tuning one block deeper (`head::deep`, one thread's share of a
//! 32-example mini-batch: 1 568 stacked positions), timed two ways on one thread:
//! ndarray's `general_mat_mul` (matrixmultiply, what graft uses) and tract-linalg's kernel for
//! this CPU (`MmmDispatch::native().preferred_kernel`, AVX-512 where there is one), packing both
//! operands and storing the result on each call, as matrixmultiply does.
//!
//! ```sh
//! cargo bench --bench finetune_products
//! ```
//!
//! Prints per product: milliseconds (median of 15) each way, the ratio, and the largest
//! relative difference of the results; then the whole step's ratio. It measures what routing
//! these products through `backbone` (which owns tract) would buy; graft does not do it yet.

use std::time::Instant;

use ndarray::linalg::general_mat_mul;
use ndarray::Array2;
use tract_linalg::mmm::{AsInputValue, FusedSpec};
use tract_onnx::prelude::*;

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn main() {
    let r = 32 * 49;
    // (what, m, k, n): C[m×n] = A[m×k]·B[k×n], the shapes of one training step.
    let shapes = [
        ("expand forward", r, 192, 1152),
        ("project forward", r, 1152, 320),
        ("top forward", r, 320, 1280),
        ("top weight gradient", 1280, r, 320),
        ("project input gradient", r, 1280, 320),
        ("project weight gradient", 320, r, 1152),
        ("depthwise input gradient", r, 320, 1152),
        ("expand weight gradient", 1152, r, 192),
    ];
    let runs = 15;
    let (mut total_nd, mut total_tr) = (0.0, 0.0);
    println!(
        "product                     m     k     n   ndarray ms  tract ms  ratio  max rel diff"
    );
    for (what, m, k, n) in shapes {
        let a = Array2::<f32>::from_shape_fn((m, k), |(i, j)| {
            ((i * 7 + j * 3) % 13) as f32 * 0.01 - 0.06
        });
        let b = Array2::<f32>::from_shape_fn((k, n), |(i, j)| {
            ((i * 5 + j * 11) % 17) as f32 * 0.01 - 0.08
        });
        let mut c = Array2::<f32>::zeros((m, n));
        let nd = median_ms(runs, || general_mat_mul(1.0, &a, &b, 0.0, &mut c));

        let ta = Tensor::from_shape(&[m, k], a.as_slice().expect("standard layout")).expect("A");
        let tb = Tensor::from_shape(&[k, n], b.as_slice().expect("standard layout")).expect("B");
        let mmm = tract_linalg::MmmDispatch::native()
            .preferred_kernel(DatumType::F32, Some(m), Some(k), Some(n))
            .expect("an f32 kernel");
        let (pack_a, pack_b) = &mmm.packings()[0];
        let mut tc = Tensor::zero::<f32>(&[m, n]).expect("a tensor");
        let tr = median_ms(runs, || unsafe {
            let pa = pack_a.prepare_one(&ta, 1, 0).expect("packs A");
            let pb = pack_b.prepare_one(&tb, 0, 1).expect("packs B");
            let store = mmm.c_view(Some(0), Some(1)).wrap(&tc.view_mut());
            mmm.run(
                m,
                n,
                &[
                    FusedSpec::AddMatMul {
                        a: AsInputValue::Borrowed(&*pa),
                        b: AsInputValue::Borrowed(&*pb),
                        packing: 0,
                    },
                    FusedSpec::Store(store),
                ],
            )
            .expect("runs");
        });
        let got = tc.to_plain_array_view::<f32>().expect("f32");
        let scale = c.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
        let diff = c
            .iter()
            .zip(got.iter())
            .fold(0f32, |d, (x, y)| d.max((x - y).abs()))
            / scale;
        println!(
            "{what:<26} {m:>5} {k:>5} {n:>5} {nd:>10.2} {tr:>9.2} {:>6.2}x  {diff:.1e}   ({})",
            nd / tr,
            mmm.name()
        );
        total_nd += nd;
        total_tr += tr;
    }
    println!(
        "one step's products: ndarray {total_nd:.1} ms, tract-linalg {total_tr:.1} ms: {:.2}x",
        total_nd / total_tr
    );
}
