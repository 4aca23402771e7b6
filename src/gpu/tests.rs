//! Per-operator tests: one-node (or few-node) graphs with random shapes and weights, run on the
//! GPU and through tract ([`Graph::run_on_cpu`]), compared value by value. They need a GPU
//! adapter; CI uses Mesa's software Vulkan driver, lavapipe.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::backbone::graph::{Attr, Constant, DataType, Node};

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn graph(chw: [usize; 3], nodes: Vec<Node>, outputs: &[&str]) -> Graph {
    Graph {
        model: "op-test".into(),
        input: "x".into(),
        input_chw: chw,
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        nodes,
        ..Graph::default()
    }
}

/// Runs `g` on the GPU and on tract for `batch` random images; asserts every output agrees to
/// `tol` relative to the output's largest value. Returns the GPU's plan size (kernels, fused).
fn check(g: &Graph, batch: usize, max_batch: usize, seed: u64, tol: f32) -> (usize, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let [c, h, w] = g.input_chw;
    let input = random(&mut rng, batch * c * h * w, 1.0);
    let want = g.run_on_cpu(&input, batch).expect("tract runs the graph");
    let mut plan = (0, 0);
    // Both matrix-product kernels, whatever the adapter would pick.
    for tiled in [true, false] {
        let options = GpuOptions {
            max_batch,
            tiled_matmul: Some(tiled),
            ..GpuOptions::default()
        };
        let gpu = GpuBackbone::from_graph(g, DeviceChoice::Gpu, &options)
            .expect("a GPU adapter (CI: mesa-vulkan-drivers)")
            .expect("gpu chosen");
        let got = gpu.run(&input, batch).expect("the GPU runs the graph");
        compare(g, &want, &got, tol);
        let s = gpu.summary();
        plan = (s.kernels, s.fused_nodes);
    }
    plan
}

fn compare(g: &Graph, want: &[(Vec<usize>, Vec<f32>)], got: &[Vec<f32>], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (o, ((shape, want), got)) in want.iter().zip(got).enumerate() {
        assert_eq!(got.len(), want.len(), "output {o}: shape {shape:?}");
        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = want
            .iter()
            .zip(got)
            .map(|(a, b)| (a - b).abs() / peak)
            .fold(0f32, f32::max);
        assert!(
            worst <= tol,
            "output {o} {shape:?}: worst relative error {worst:e} > {tol:e} ({:?})",
            g.nodes.iter().map(|n| n.op.as_str()).collect::<Vec<_>>()
        );
    }
}

struct ConvCase {
    c_in: usize,
    c_out: usize,
    hw: [usize; 2],
    k: [usize; 2],
    strides: [i64; 2],
    pads: [i64; 4],
    group: usize,
    dilation: [i64; 2],
    bias: bool,
}

fn conv_graph(case: &ConvCase, seed: u64) -> Graph {
    let mut rng = StdRng::seed_from_u64(seed);
    let ConvCase {
        c_in, c_out, hw, k, ..
    } = *case;
    let per_group = c_in / case.group;
    let mut g = graph([c_in, hw[0], hw[1]], vec![], &["y"]);
    let fan_in = (per_group * k[0] * k[1]) as f32;
    g.constants.insert(
        "w".into(),
        Constant::f32(
            &[c_out, per_group, k[0], k[1]],
            random(
                &mut rng,
                c_out * per_group * k[0] * k[1],
                1.0 / fan_in.sqrt(),
            ),
        ),
    );
    let mut inputs = vec!["x", "w"];
    if case.bias {
        g.constants.insert(
            "b".into(),
            Constant::f32(&[c_out], random(&mut rng, c_out, 0.5)),
        );
        inputs.push("b");
    }
    g.nodes.push(
        Node::new("Conv", "conv", &inputs, &["y"])
            .with("group", Attr::Int(case.group as i64))
            .with("kernel_shape", Attr::Ints(vec![k[0] as i64, k[1] as i64]))
            .with("strides", Attr::Ints(case.strides.to_vec()))
            .with("pads", Attr::Ints(case.pads.to_vec()))
            .with("dilations", Attr::Ints(case.dilation.to_vec())),
    );
    g
}

#[test]
fn convolutions_match_tract_over_strides_pads_groups_and_odd_sizes() {
    let cases = [
        // stem-like: 3 → 8, 3×3 stride 2, TF "same" padding (bottom/right only)
        ConvCase {
            c_in: 3,
            c_out: 8,
            hw: [17, 15],
            k: [3, 3],
            strides: [2, 2],
            pads: [0, 0, 1, 1],
            group: 1,
            dilation: [1, 1],
            bias: true,
        },
        // depthwise 3×3 and 5×5, stride 1 and 2
        ConvCase {
            c_in: 12,
            c_out: 12,
            hw: [9, 11],
            k: [3, 3],
            strides: [1, 1],
            pads: [1, 1, 1, 1],
            group: 12,
            dilation: [1, 1],
            bias: true,
        },
        ConvCase {
            c_in: 7,
            c_out: 7,
            hw: [13, 10],
            k: [5, 5],
            strides: [2, 2],
            pads: [1, 1, 2, 2],
            group: 7,
            dilation: [1, 1],
            bias: false,
        },
        // grouped (not depthwise), channel multiplier 2
        ConvCase {
            c_in: 6,
            c_out: 12,
            hw: [8, 9],
            k: [3, 3],
            strides: [1, 2],
            pads: [1, 0, 1, 0],
            group: 3,
            dilation: [1, 1],
            bias: true,
        },
        // dilated, rectangular kernel, no padding
        ConvCase {
            c_in: 4,
            c_out: 5,
            hw: [12, 12],
            k: [3, 2],
            strides: [1, 1],
            pads: [0, 0, 0, 0],
            group: 1,
            dilation: [2, 3],
            bias: true,
        },
        // 1×1 → the tiled matmul: odd sizes on every axis of the tiles
        ConvCase {
            c_in: 37,
            c_out: 70,
            hw: [9, 11],
            k: [1, 1],
            strides: [1, 1],
            pads: [0, 0, 0, 0],
            group: 1,
            dilation: [1, 1],
            bias: true,
        },
        ConvCase {
            c_in: 130,
            c_out: 3,
            hw: [1, 1],
            k: [1, 1],
            strides: [1, 1],
            pads: [0, 0, 0, 0],
            group: 1,
            dilation: [1, 1],
            bias: false,
        },
        // 1×1 with stride 2: not a plain matmul, the direct kernel
        ConvCase {
            c_in: 5,
            c_out: 6,
            hw: [7, 7],
            k: [1, 1],
            strides: [2, 2],
            pads: [0, 0, 0, 0],
            group: 1,
            dilation: [1, 1],
            bias: true,
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let g = conv_graph(case, 10 + i as u64);
        for batch in [1, 3] {
            check(&g, batch, 64, 100 + i as u64, 1e-5);
        }
    }
}

#[test]
fn epilogues_fuse_clip_residual_add_and_match_tract() {
    // conv 1×1 → Clip(0, 6) → conv 3×3 depthwise → Add(first Clip output) → Relu
    let mut rng = StdRng::seed_from_u64(7);
    let c = 16;
    let mut g = graph([c, 10, 9], vec![], &["out"]);
    g.constants.insert(
        "w1".into(),
        Constant::f32(&[c, c, 1, 1], random(&mut rng, c * c, 0.4)),
    );
    g.constants
        .insert("b1".into(), Constant::f32(&[c], random(&mut rng, c, 0.5)));
    g.constants.insert(
        "w2".into(),
        Constant::f32(&[c, 1, 3, 3], random(&mut rng, c * 9, 0.4)),
    );
    g.constants
        .insert("lo".into(), Constant::f32(&[], vec![0.0]));
    g.constants
        .insert("hi".into(), Constant::f32(&[], vec![6.0]));
    g.nodes = vec![
        Node::new("Conv", "expand", &["x", "w1", "b1"], &["a"]),
        Node::new("Clip", "clip", &["a", "lo", "hi"], &["b"]),
        Node::new("Conv", "dw", &["b", "w2"], &["d"])
            .with("group", Attr::Int(c as i64))
            .with("pads", Attr::Ints(vec![1, 1, 1, 1])),
        Node::new("Add", "add", &["b", "d"], &["e"]),
        Node::new("Relu", "relu", &["e"], &["out"]),
    ];
    let (kernels, fused) = check(&g, 2, 64, 8, 1e-5);
    // Clip into the matmul; the Add and the Relu after it (the second clip stage) into the
    // depthwise conv.
    assert_eq!((kernels, fused), (2, 3));
}

#[test]
fn gemm_matmul_pool_and_flatten_match_tract() {
    let mut rng = StdRng::seed_from_u64(11);
    let (c, m) = (21, 13);
    let mut g = graph([c, 5, 6], vec![], &["gemm_t", "gemm_n", "mm", "mean"]);
    g.constants.insert(
        "bt".into(),
        Constant::f32(&[m, c], random(&mut rng, m * c, 0.3)),
    );
    g.constants.insert(
        "bn".into(),
        Constant::f32(&[c, m], random(&mut rng, m * c, 0.3)),
    );
    g.constants
        .insert("bias".into(), Constant::f32(&[m], random(&mut rng, m, 0.3)));
    g.constants
        .insert("one".into(), Constant::f32(&[1], vec![0.25]));
    g.nodes = vec![
        Node::new("GlobalAveragePool", "gap", &["x"], &["p"]),
        Node::new("Flatten", "flat", &["p"], &["f"]).with("axis", Attr::Int(1)),
        Node::new("Gemm", "gemm_t", &["f", "bt", "bias"], &["gemm_t"])
            .with("transB", Attr::Int(1))
            .with("alpha", Attr::Float(0.5))
            .with("beta", Attr::Float(2.0)),
        Node::new("Gemm", "gemm_n", &["f", "bn", "one"], &["gemm_n"]),
        Node::new("MatMul", "mm", &["f", "bn"], &["mm"]),
        Node::new("ReduceMean", "mean", &["x"], &["mean"])
            .with("axes", Attr::Ints(vec![2, 3]))
            .with("keepdims", Attr::Int(0)),
    ];
    for batch in [1, 5] {
        check(&g, batch, 64, 12, 1e-5);
    }
}

#[test]
fn gem_pooling_is_one_kernel_and_matches_tract() {
    // What `[graph] gem_power = 3` adds beside the average pool.
    let mut g = graph([19, 7, 7], vec![], &["f"]);
    for (name, v) in [("zero", 0.0), ("p", 3.0), ("inv_p", 1.0 / 3.0)] {
        g.constants.insert(name.into(), Constant::f32(&[], vec![v]));
    }
    g.nodes = vec![
        Node::new("Max", "clamp", &["x", "zero"], &["c"]),
        Node::new("Pow", "pow", &["c", "p"], &["p3"]),
        Node::new("GlobalAveragePool", "pool", &["p3"], &["m"]),
        Node::new("Pow", "root", &["m", "inv_p"], &["r"]),
        Node::new("Flatten", "flat", &["r"], &["f"]).with("axis", Attr::Int(1)),
    ];
    for batch in [1, 3] {
        let (kernels, fused) = check(&g, batch, 64, 31, 1e-5);
        assert_eq!((kernels, fused), (1, 3));
    }
    // Another exponent than its root's is not GeM: refused by name, not miscomputed.
    g.constants
        .insert("inv_p".into(), Constant::f32(&[], vec![0.5]));
    let err = crate::gpu::lower::lower(&g).unwrap_err();
    assert!(err.to_string().contains("GeM pooling"), "{err}");
}

#[test]
fn activation_quantize_dequantize_pairs_match_tract() {
    // The int8 QDQ pattern: conv → Q → DQ → Add(residual DQ) → Q → DQ, u8 activations.
    let mut rng = StdRng::seed_from_u64(21);
    let c = 8;
    let mut g = graph([c, 7, 7], vec![], &["out"]);
    g.constants.insert(
        "w".into(),
        Constant::f32(&[c, c, 1, 1], random(&mut rng, c * c, 0.4)),
    );
    let scalar = |v: f32, dtype: DataType| Constant {
        dims: vec![],
        dtype,
        values: vec![v],
    };
    g.constants.insert("s".into(), scalar(0.023, DataType::F32));
    g.constants.insert("zp".into(), scalar(128.0, DataType::U8));
    g.constants
        .insert("s2".into(), scalar(0.041, DataType::F32));
    g.constants.insert("zp2".into(), scalar(-3.0, DataType::I8));
    g.nodes = vec![
        Node::new("QuantizeLinear", "qx", &["x", "s", "zp"], &["xq"]),
        Node::new("DequantizeLinear", "dqx", &["xq", "s", "zp"], &["xd"]),
        Node::new("Conv", "conv", &["xd", "w"], &["a"]),
        Node::new("QuantizeLinear", "qa", &["a", "s", "zp"], &["aq"]),
        Node::new("DequantizeLinear", "dqa", &["aq", "s", "zp"], &["ad"]),
        Node::new("Add", "add", &["ad", "xd"], &["r"]),
        Node::new("QuantizeLinear", "qr", &["r", "s2", "zp2"], &["rq"]),
        Node::new("DequantizeLinear", "dqr", &["rq", "s2", "zp2"], &["out"]),
    ];
    // Outputs are on a 0.041 grid: a sum rounded differently by the two engines moves one
    // value by a step (0.041 of a peak near 5), rarely. Allow one step.
    let (kernels, fused) = check(&g, 2, 64, 22, 0.041 / 4.0 + 1e-4);
    assert_eq!(kernels, 2); // the input pair as an element-wise kernel, then the conv
    assert_eq!(fused, 6); // DQ after the input Q; Q, DQ, Add, Q, DQ after the conv
}

#[test]
fn batches_larger_than_a_dispatch_run_in_chunks_in_order() {
    let case = ConvCase {
        c_in: 3,
        c_out: 4,
        hw: [6, 6],
        k: [3, 3],
        strides: [1, 1],
        pads: [1, 1, 1, 1],
        group: 1,
        dilation: [1, 1],
        bias: true,
    };
    let g = conv_graph(&case, 31);
    // 7 images, 2 per dispatch: four chunks, the last one short.
    check(&g, 7, 2, 32, 1e-5);
}

#[test]
fn adapters_are_listed_and_software_ones_are_not_auto() {
    let all = adapters();
    assert!(!all.is_empty(), "no adapter: install mesa-vulkan-drivers");
    for a in &all {
        let software = a.device_type == "Cpu" || a.name.to_lowercase().contains("llvmpipe");
        if software {
            assert!(a.auto_skips.is_some(), "{a:?}");
        }
    }
}

#[test]
fn an_operator_without_a_kernel_fails_on_gpu_and_falls_back_on_auto() {
    let mut g = conv_graph(
        &ConvCase {
            c_in: 2,
            c_out: 2,
            hw: [4, 4],
            k: [1, 1],
            strides: [1, 1],
            pads: [0, 0, 0, 0],
            group: 1,
            dilation: [1, 1],
            bias: false,
        },
        1,
    );
    g.nodes.push(Node::new(
        "Sigmoid",
        "/_blocks.0/_swish/Sigmoid",
        &["y"],
        &["z"],
    ));
    g.outputs = vec!["z".into()];
    let options = GpuOptions::default();
    let e = GpuBackbone::from_graph(&g, DeviceChoice::Gpu, &options).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("cannot run node Sigmoid \"/_blocks.0/_swish/Sigmoid\""),
        "{msg}"
    );
    assert!(matches!(
        GpuBackbone::from_graph(&g, DeviceChoice::Auto, &options),
        Ok(None)
    ));
    assert!(matches!(
        GpuBackbone::from_graph(&g, DeviceChoice::Cpu, &options),
        Ok(None)
    ));
}

/// Thirty convolutions drawn at random (seeded): channels, groups (depthwise, grouped, dense),
/// kernel sizes, strides, asymmetric pads, dilations and map sizes, each against tract.
#[test]
fn random_convolutions_match_tract() {
    let mut rng = StdRng::seed_from_u64(2026);
    for i in 0..30u64 {
        let groups = [1, 2, 3, 4][rng.gen_range(0..4)];
        let depthwise = rng.gen_bool(0.3);
        let c_in = if depthwise {
            rng.gen_range(1..=20)
        } else {
            groups * rng.gen_range(1..=6)
        };
        let (group, c_out) = if depthwise {
            (c_in, c_in)
        } else {
            (groups, groups * rng.gen_range(1..=6))
        };
        let k = [rng.gen_range(1..=5), rng.gen_range(1..=5)];
        let dilation = [rng.gen_range(1..=2), rng.gen_range(1..=2)];
        let pads = [
            rng.gen_range(0..=2),
            rng.gen_range(0..=2),
            rng.gen_range(0..=2),
            rng.gen_range(0..=2),
        ];
        // Big enough for the dilated kernel after padding.
        let reach = |a: usize| (dilation[a] as usize) * (k[a] - 1) + 1;
        let hw = [
            reach(0) + rng.gen_range(0..=12),
            reach(1) + rng.gen_range(0..=12),
        ];
        let case = ConvCase {
            c_in,
            c_out,
            hw,
            k,
            strides: [rng.gen_range(1..=3), rng.gen_range(1..=3)],
            pads,
            group,
            dilation,
            bias: rng.gen_bool(0.5),
        };
        let g = conv_graph(&case, 500 + i);
        let batch = rng.gen_range(1..=3);
        check(&g, batch, 64, 600 + i, 1e-5);
    }
}
