//! graft's float 1×1 convolution kernel (`pointwise::kernel`, what fp32 and w8 run) on
//! EfficientNet-Lite0's 19 1×1 shapes, one thread, in GMAC/s: once with the input's first
//! row on a cache line, once 16 bytes off (a tensor's rows of 14×14 or 7×7 positions start
//! anywhere in a line, whatever the first does), for every vectorised instruction set this
//! CPU has, and where it has AMX the matrix unit's kernel (`pointwise::amx`), with float
//! weights (`amx-bf16`, three tile products per product) and with `w8`'s integer weights
//! (`amx-w8`, two). With `CIN COUT HW` it times that one shape 20 times (for `perf record`), on the
//! widest instruction set or `GRAFT_BENCH_ISA`'s.
//!
//! `GRAFT_BENCH_INPUTS=N` takes turns over `N` copies of the input, so that on the wide maps
//! it comes from beyond L2, as in a frame, where the operator before wrote it and more.
//!
//! ```sh
//! cargo bench --bench pointwise_tiles
//! cargo bench --bench pointwise_tiles -- 672 112 196
//! GRAFT_BENCH_ISA=avx2+fma GRAFT_BENCH_INPUTS=8 cargo bench --bench pointwise_tiles -- 144 24 3136
//! ```

mod common;

use common::median;
use graft::backbone::depthwise::Isa;
use graft::backbone::pointwise::kernel::{pack, Pointwise, Shape};
use graft::backbone::pointwise::LITE0_SHAPES;

/// GMAC/s of one convolution over an input `off` floats past a 64-byte boundary.
fn gmacs(shape: Shape, isa: Isa, off: usize) -> f64 {
    let Shape { cin, cout, hw, .. } = shape;
    let copies = std::env::var("GRAFT_BENCH_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let buffers: Vec<Vec<f32>> = (0..copies)
        .map(|_| {
            (0..cin * hw + 32)
                .map(|i| ((i * 104729) % 256) as f32 * 0.01)
                .collect()
        })
        .collect();
    let inputs: Vec<&[f32]> = buffers
        .iter()
        .map(|b| {
            let at = (64 - b.as_ptr() as usize % 64) % 64 / 4 + off;
            &b[at..at + cin * hw]
        })
        .collect();
    let w: Vec<f32> = (0..cin * cout)
        .map(|i| ((i * 7919) % 255) as f32 * 0.001)
        .collect();
    let (pw, pb) = pack(&w, &vec![0.1; cout], cin, cout, shape.rows(isa));
    let p = Pointwise {
        shape,
        weights: &pw,
        bias: &pb,
        lo: 0.0,
        hi: 6.0,
        post: None,
        isa,
    };
    let mut out = vec![0f32; cout * hw];
    let mut turn = 0;
    let t = median(|| {
        turn += 1;
        p.run(inputs[turn % copies], None, &mut out)
    });
    shape.macs() as f64 / t / 1e9
}

/// GMAC/s of the matrix unit's kernel on `shape` (integer weights times a scale per output
/// channel with `integer`), the input `off` floats past a 64-byte boundary.
#[cfg(target_arch = "x86_64")]
fn amx_gmacs(shape: Shape, off: usize, integer: bool) -> f64 {
    use graft::backbone::pointwise::amx::{Matrix, Weights};
    let Shape { cin, cout, hw, .. } = shape;
    let buffer: Vec<f32> = (0..cin * hw + 32)
        .map(|i| ((i * 104729) % 256) as f32 * 0.01)
        .collect();
    let at = (64 - buffer.as_ptr() as usize % 64) % 64 / 4 + off;
    let input = &buffer[at..at + cin * hw];
    let w: Vec<f32> = (0..cin * cout)
        .map(|i| {
            let q = ((i * 7919) % 255) as f32 - 127.0;
            if integer {
                q * 0.001
            } else {
                q * 0.001 + 1e-7 * (i % 7) as f32
            }
        })
        .collect();
    let weights = Weights::pack(&w, &vec![0.1; cout], cin, cout);
    let m = Matrix {
        weights: &weights,
        batch: 1,
        hw,
        lo: 0.0,
        hi: 6.0,
        post: None,
        threads: 1,
    };
    let mut out = vec![0f32; cout * hw];
    let t = median(|| m.run(input, None, &mut out));
    shape.macs() as f64 / t / 1e9
}

fn main() {
    let isas: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|i| *i != Isa::Scalar)
        .collect();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if let [cin, cout, hw] = args.as_slice() {
        let Some(isa) = common::isa("pointwise_tiles") else {
            std::process::exit(1);
        };
        let shape = Shape {
            batch: 1,
            cin: *cin,
            cout: *cout,
            hw: *hw,
        };
        for _ in 0..20 {
            println!("{} {:.1} GMAC/s", isa.name(), gmacs(shape, isa, 0));
        }
        return;
    }
    print!("GMAC/s, one thread, input aligned / 16 bytes off:");
    for isa in &isas {
        print!(" {}", isa.name());
    }
    #[cfg(target_arch = "x86_64")]
    let amx = graft::backbone::pointwise::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    let amx = false;
    if amx {
        print!(" amx-bf16 amx-w8");
    }
    println!();
    let mut totals = vec![0.0; isas.len()];
    let mut amx_totals = [0.0; 2];
    for &(cin, cout, side, _) in LITE0_SHAPES.iter() {
        let shape = Shape::square(cin, cout, side);
        print!("{cin:>5} -> {cout:>5} {side:>3}x{side:<3}");
        for (k, &isa) in isas.iter().enumerate() {
            let (a, b) = (gmacs(shape, isa, 0), gmacs(shape, isa, 4));
            totals[k] += shape.macs() as f64 / a / 1e6;
            print!("  {} {a:5.1} / {b:5.1}", isa.name());
        }
        #[cfg(target_arch = "x86_64")]
        if amx {
            for (k, (name, integer)) in [("amx-bf16", false), ("amx-w8", true)].iter().enumerate() {
                let (a, b) = (amx_gmacs(shape, 0, *integer), amx_gmacs(shape, 4, *integer));
                amx_totals[k] += shape.macs() as f64 / a / 1e6;
                print!("  {name} {a:5.1} / {b:5.1}");
            }
        }
        println!();
    }
    for (isa, t) in isas.iter().zip(&totals) {
        println!("all 19, aligned: {} {t:.3} ms", isa.name());
    }
    if amx {
        for (name, t) in ["amx-bf16", "amx-w8"].iter().zip(amx_totals) {
            println!("all 19, aligned: {name} {t:.3} ms");
        }
    }
}
