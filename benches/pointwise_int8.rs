//! graft's int8 1×1 convolution (`quant::kernel`, what the QDQ `int8` graph runs on a CPU with
//! VNNI) beside its float one (`pointwise::kernel`, what fp32 and w8 run) on EfficientNet-
//! Lite0's 19 1×1 shapes. One thread, the same data (the float kernel reads the dequantised
//! values the int8 one packs), every vectorised float and integer instruction set this CPU
//! has, timed alternately in one process. Prints one line per shape with the medians and each
//! int8 kernel's ratio to the float kernel of its vector width (AVX-VNNI to AVX2, AVX-512
//! VNNI to AVX-512), and checks that all computed the same sums (within float rounding).
//!
//! ```sh
//! cargo bench --bench pointwise_int8
//! ```

mod common;

use common::median;
use graft::backbone::depthwise::Isa;
use graft::backbone::pointwise::kernel::{pack, Pointwise, Shape};
use graft::backbone::pointwise::LITE0_SHAPES;
use graft::backbone::quant::kernel::{pack_weights, Isa8, Quantized};

fn main() {
    let floats: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|i| *i != Isa::Scalar)
        .collect();
    let int8: Vec<Isa8> = Isa8::available()
        .into_iter()
        .filter(|i| *i != Isa8::Scalar)
        .collect();
    // The float kernel of the same vector width as each int8 one: what the same CPU would run
    // instead.
    let partner = |i: Isa8| -> usize {
        let want = if i.name() == "avx-vnni" {
            "avx2+fma"
        } else {
            "avx512"
        };
        floats
            .iter()
            .position(|f| f.name() == want)
            .unwrap_or(floats.len() - 1)
    };
    if int8.is_empty() {
        println!(
            "pointwise_int8: this CPU has no vectorised int8 kernel (AVX-512 VNNI or AVX-VNNI)"
        );
        return;
    }
    print!("ms per convolution, one thread; float");
    for f in &floats {
        print!(" {}", f.name());
    }
    print!("; int8");
    for i in &int8 {
        print!(" {}", i.name());
    }
    println!();
    let (mut total_f, mut total_q) = (vec![0.0; floats.len()], vec![0.0; int8.len()]);
    for &(cin, cout, side, residual) in LITE0_SHAPES.iter() {
        let shape = Shape::square(cin, cout, side);
        // An input on a u8 grid (scale 0.05, zero point 128) and s8 weights (scale 0.01).
        let (xs, zp) = (0.05f32, 128u8);
        let x: Vec<f32> = (0..cin * shape.hw)
            .map(|i| (((i * 104729) % 256) as f32 - zp as f32) * xs)
            .collect();
        let q: Vec<i8> = (0..cout * cin)
            .map(|i| ((i * 7919) % 255) as i32 - 127)
            .map(|v| v as i8)
            .collect();
        let ws = 0.01f32;
        let w: Vec<f32> = q.iter().map(|&v| v as f32 * ws).collect();
        let bias = vec![0.1f32; cout];
        let res = residual.then(|| vec![0.5f32; cout * shape.hw]);
        let (qw, sums) = pack_weights(&q, cin, cout);
        let padded = sums.len();
        let zp_sums: Vec<i32> = sums.iter().map(|s| s * zp as i32).collect();
        let scales: Vec<f32> = (0..padded).map(|_| xs * ws).collect();
        let qbias: Vec<f32> = (0..padded)
            .map(|c| if c < cout { 0.1 } else { 0.0 })
            .collect();
        let mut out_f = vec![0f32; cout * shape.hw];
        let mut out_q = vec![0f32; cout * shape.hw];
        print!(
            "{cin:>5} -> {cout:>5} {side:>3}x{side:<3}{}",
            if residual { " +res" } else { "     " },
        );
        let mut tf = vec![0.0; floats.len()];
        for (k, &isa) in floats.iter().enumerate() {
            let (pw, pb) = pack(&w, &bias, cin, cout, shape.rows(isa));
            let float = Pointwise {
                shape,
                weights: &pw,
                bias: &pb,
                lo: f32::NEG_INFINITY,
                hi: f32::INFINITY,
                post: None,
                isa,
            };
            tf[k] = median(|| float.run(&x, res.as_deref(), &mut out_f));
            total_f[k] += tf[k];
            print!("  {} {:.3}", isa.name(), tf[k] * 1e3);
        }
        for (k, &i8isa) in int8.iter().enumerate() {
            let quantized = Quantized {
                shape,
                weights: &qw,
                zp_sums: &zp_sums,
                scales: &scales,
                bias: &qbias,
                lo: f32::NEG_INFINITY,
                hi: f32::INFINITY,
                inv: xs.recip(),
                zero_point: zp,
                grid: None,
                sum: None,
                isa: i8isa,
                pack_positions: false,
            };
            let tq = median(|| quantized.run(&x, res.as_deref(), &mut out_q));
            total_q[k] += tq;
            let scale = out_f.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = out_f
                .iter()
                .zip(&out_q)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{cin}->{cout}: int8 and float differ by {worst}"
            );
            print!(
                "  {} {:.3} ({:.2}x)",
                i8isa.name(),
                tq * 1e3,
                tf[partner(i8isa)] / tq
            );
        }
        println!();
    }
    print!("all 19:");
    for (k, f) in floats.iter().enumerate() {
        print!(" {} {:.3} ms,", f.name(), total_f[k] * 1e3);
    }
    for (k, &i) in int8.iter().enumerate() {
        let f = total_f[partner(i)];
        print!(
            " {} {:.3} ms ({:.2}x)",
            i.name(),
            total_q[k] * 1e3,
            f / total_q[k]
        );
    }
    println!();
}
