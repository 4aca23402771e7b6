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

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "depthwise"

# name: (channels in, spatial size, kernel, stride, pads [top, left, bottom, right], group)
# The depthwise shapes are blocks 1, 3 and 12 of EfficientNet-Lite0; the 1x1 is block 1's
# projection, the same work tract's matrix-multiply kernels do well.
CASES = {
    "dw_b1_96x112_k3s2": (96, 112, 3, 2, [0, 0, 1, 1], 96),
    "dw_b3_144x56_k5s2": (144, 56, 5, 2, [1, 1, 2, 2], 144),
    "dw_b12_672x7_k5s1": (672, 7, 5, 1, [2, 2, 2, 2], 672),
    "pw_b1_96to24x56_k1": (96, 56, 1, 1, [0, 0, 0, 0], 1),
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
    for name, (c, size, k, stride, pads, group) in CASES.items():
        path, shape = make(name, c, size, k, stride, pads, group)
        ort_times[name] = ort_ms(path, shape, args.runs)
        out = (size + pads[0] + pads[2] - k) // stride + 1
        cout = 24 if group == 1 else c
        macs[name] = cout * out * out * k * k * (c // group)
    env = dict(os.environ, GRAFT_DEPTHWISE_DIR=str(OUT), GRAFT_THREADS="1")
    text = subprocess.check_output(["cargo", "bench", "--quiet", "--bench", "depthwise"],
                                   cwd=ROOT, env=env, text=True)
    tract_times = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in CASES:
            tract_times[parts[0]] = float(parts[1])
    print(f"onnxruntime {ort.__version__} vs tract (cargo bench --bench depthwise), 1 thread, "
          f"median of {args.runs}")
    print(f"{'node':<22} {'MMAC':>7} {'tract ms':>9} {'ort ms':>7} {'ratio':>6} {'tract GMAC/s':>12}")
    for name in CASES:
        t, o = tract_times[name], ort_times[name]
        print(f"{name:<22} {macs[name] / 1e6:>7.2f} {t:>9.3f} {o:>7.3f} {t / o:>5.1f}x "
              f"{macs[name] / t / 1e6:>12.2f}")


if __name__ == "__main__":
    main()
