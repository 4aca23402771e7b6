//! graft's two depthwise layouts side by side on EfficientNet-Lite0's 16 depthwise shapes: one
//! channel plane at a time (`depthwise::kernel`) and channels side by side (`depthwise::
//! blocked`, what x86 runs). One thread, the same random data, the two timed alternately in
//! one process; prints one line per shape with both medians and their ratio, and checks that
//! the two layouts computed the same sums.
//!
//! ```sh
//! cargo bench --bench depthwise_layouts            # the best vector width of this CPU
//! GRAFT_BENCH_ISA=avx2+fma cargo bench --bench depthwise_layouts
//! ```

mod common;

use common::median;
use graft::backbone::depthwise::blocked::{self, BlockScratch, Blocked};
use graft::backbone::depthwise::kernel::{Plane, Scratch};
use graft::backbone::depthwise::{lite0_geometry, LITE0_SHAPES};

fn main() {
    let Some(isa) = common::isa("depthwise_layouts") else {
        std::process::exit(1);
    };
    let lanes = blocked::block_channels(isa);
    println!(
        "isa {} ({lanes} lanes); ms per convolution, one thread",
        isa.name()
    );
    for i in 0..LITE0_SHAPES.len() {
        let g = lite0_geometry(i);
        let (c, h, k, s, ho) = (g.channels, g.h, g.kh, g.sh, g.ho);
        let x: Vec<f32> = (0..c * h * h)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0)
            .collect();
        let w: Vec<f32> = (0..c * k * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let b = vec![0.1f32; c];
        let mut out = vec![0f32; c * ho * ho];

        let offsets = g.tap_offsets();
        let plane = Plane {
            geo: &g,
            offsets: &offsets,
            isa,
            lo: 0.0,
            hi: 6.0,
        };
        let mut scratch = Scratch::default();
        let planes = median(|| {
            for (p, o) in out.chunks_exact_mut(ho * ho).enumerate() {
                let (i, t) = (p * h * h, p * k * k);
                plane.run(&x[i..i + h * h], &w[t..t + k * k], b[p], o, &mut scratch);
            }
        });
        let planes_sum: f64 = out.iter().map(|v| *v as f64).sum();

        let (pw, pb) = blocked::pack(&w, &b, c, k * k, lanes);
        let op = Blocked {
            geo: &g,
            weights: &pw,
            bias: &pb,
            isa,
            lo: 0.0,
            hi: 6.0,
            grid: None,
            expand: None,
            stem: None,
        };
        let mut scratch = BlockScratch::default();
        let blocked_s = median(|| {
            for (blk, o) in out.chunks_mut(lanes * ho * ho).enumerate() {
                let cn = o.len() / (ho * ho);
                let i = blk * lanes * h * h;
                op.run(&x[i..i + cn * h * h], blk, o, &mut scratch);
            }
        });
        let blocked_sum: f64 = out.iter().map(|v| *v as f64).sum();
        let same = (planes_sum - blocked_sum).abs() <= 1e-4 * planes_sum.abs().max(1.0);
        println!(
            "{c:5}ch {h:3}x{h:<3} k{k} s{s}: planes {:.3} ms  blocked {:.3} ms  planes/blocked {:.2}x{}",
            planes * 1e3,
            blocked_s * 1e3,
            planes / blocked_s,
            if same { "" } else { "  (SUMS DIFFER)" }
        );
    }
}
