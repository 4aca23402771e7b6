"""Minimal reproducer for tract's depthwise convolution vs onnxruntime's, in one run.

Writes single-node ONNX models (a depthwise Conv, and for contrast the 1x1 Conv that follows it
in the same block) with the shapes of EfficientNet-Lite0's slowest nodes under tract
(`graft bench --profile`), times them in onnxruntime (one thread), runs `cargo bench --bench
depthwise` (tract, one thread) on the same files and prints the ratios.

    .venv/bin/python benches/depthwise_repro.py [--runs 50]

Needs numpy, onnx, onnxruntime (models/export/requirements.txt).
"""
import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compare_onnxruntime import cpu_name  # the same machine name in both scripts' tables

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "depthwise"

# name: (channels in, spatial size, kernel, stride, pads [top, left, bottom, right], group, count)
# Every depthwise shape of EfficientNet-Lite0 at 224x224 (count: how many of its 16 depthwise
# nodes have it), and for contrast block 1's 1x1 projection, the work tract's matrix-multiply
# kernels do well.
CASES = {
    "dw_b0_32x112_k3s1": (32, 112, 3, 1, [1, 1, 1, 1], 32, 1),
    "dw_b1_96x112_k3s2": (96, 112, 3, 2, [0, 0, 1, 1], 96, 1),
    "dw_b2_144x56_k3s1": (144, 56, 3, 1, [1, 1, 1, 1], 144, 1),
    "dw_b3_144x56_k5s2": (144, 56, 5, 2, [1, 1, 2, 2], 144, 1),
    "dw_b4_240x28_k5s1": (240, 28, 5, 1, [2, 2, 2, 2], 240, 1),
    "dw_b5_240x28_k3s2": (240, 28, 3, 2, [0, 0, 1, 1], 240, 1),
    "dw_b6_480x14_k3s1": (480, 14, 3, 1, [1, 1, 1, 1], 480, 2),
    "dw_b8_480x14_k5s1": (480, 14, 5, 1, [2, 2, 2, 2], 480, 1),
    "dw_b9_672x14_k5s1": (672, 14, 5, 1, [2, 2, 2, 2], 672, 2),
    "dw_b11_672x14_k5s2": (672, 14, 5, 2, [1, 1, 2, 2], 672, 1),
    "dw_b12_1152x7_k5s1": (1152, 7, 5, 1, [2, 2, 2, 2], 1152, 3),
    "dw_b15_1152x7_k3s1": (1152, 7, 3, 1, [1, 1, 1, 1], 1152, 1),
    "pw_b1_96to24x56_k1": (96, 56, 1, 1, [0, 0, 0, 0], 1, 0),
}


def make(name, c, size, k, stride, pads, group):
    rng = np.random.default_rng(0)
    cout = 24 if group == 1 else c
    w = rng.standard_normal((cout, c // group, k, k)).astype(np.float32) * 0.1
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k],
                            strides=[stride, stride], pads=pads, group=group)
    graph = helper.make_graph(
        [node], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = OUT / f"{name}.onnx"
    onnx.save(model, str(path))
    return path, (1, c, size, size)


def ort_ms(path, shape, runs):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.full(shape, 0.5, dtype=np.float32)
    sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ort_times, macs = {}, {}
    for name, (c, size, k, stride, pads, group, _) in CASES.items():
        path, shape = make(name, c, size, k, stride, pads, group)
        ort_times[name] = ort_ms(path, shape, args.runs)
        out = (size + pads[0] + pads[2] - k) // stride + 1
        cout = 24 if group == 1 else c
        macs[name] = cout * out * out * k * k * (c // group)
    env = dict(os.environ, GRAFT_DEPTHWISE_DIR=str(OUT), GRAFT_THREADS="1")
    text = subprocess.check_output(["cargo", "bench", "--quiet", "--bench", "depthwise"],
                                   cwd=ROOT, env=env, text=True)
    tract_times, graft_times = {}, {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in CASES:
            tract_times[parts[0]] = float(parts[1])
            graft_times[parts[0]] = float(parts[2])
    print(f"machine: {cpu_name()}; onnxruntime {ort.__version__} vs tract's plan vs graft's depthwise "
          f"(cargo bench --bench depthwise), 1 thread, median of {args.runs}")
    print(f"{'node':<22} {'MMAC':>6} {'tract ms':>8} {'graft ms':>8} {'ort ms':>7} {'tract/ort':>9} "
          f"{'graft/ort':>9} {'graft GMAC/s':>12}")
    totals = [0.0, 0.0, 0.0]
    for name, case in CASES.items():
        t, g, o = tract_times[name], graft_times[name], ort_times[name]
        for i, v in enumerate((t, g, o)):
            totals[i] += v * case[-1]
        print(f"{name:<22} {macs[name] / 1e6:>6.2f} {t:>8.3f} {g:>8.3f} {o:>7.3f} {t / o:>8.1f}x "
              f"{g / o:>8.1f}x {macs[name] / g / 1e6:>12.2f}")
    t, g, o = totals
    print(f"{'all 16 depthwise nodes':<29} {t:>8.3f} {g:>8.3f} {o:>7.3f} {t / o:>8.1f}x {g / o:>8.1f}x")


if __name__ == "__main__":
    main()
