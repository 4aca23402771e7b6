"""graft (tract) vs onnxruntime on the same ONNX file and the same photo, in one run.

For each bundled model and thread count it runs `graft bench --json` (load, embed batch-1
latency, median of --runs) and onnxruntime on the same .onnx with the reference preprocessing
(models/export/preprocess.py, which graft's golden test checks it matches), then prints the
latency ratio and the cosine between graft's and onnxruntime's embeddings of the photo.
Both embed: graft's plan stops at the features (`Backbone::embed`, no ImageNet classifier), and
onnxruntime runs the file with the features as its only output, so it prunes the classifier too.

    cargo build --release
    .venv/bin/python benches/compare_onnxruntime.py [--graft target/release/graft] [--runs 30]
        [--rounds 3] [--kernels graft,tract]

Each row is measured in `--rounds` rounds, graft and onnxruntime alternating within a round
(graft bench runs `--runs` passes, then onnxruntime as many), and reports the median of the
rounds: on a shared VM a neighbour's burst then hits both sides instead of one. `--kernels`
also runs graft with `--cpu-kernels tract` (tract's plan unchanged) for the A/B, or `vector`
(graft's 1×1s on the vector units where the CPU has a matrix unit, AMX).

Needs numpy, pillow, onnx, onnxruntime (models/export/requirements.txt).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models" / "export"))
from preprocess import preprocess_path  # noqa: E402

# graft model name -> the file onnxruntime runs. `w8` is graft's preparation of the int8 file
# (int8 weights, float activations; src/backbone/prepare.rs): onnxruntime runs that same file
# as it is, fully quantised, which is what a user would compare against.
MODELS = {
    "efficientnet-lite0-fp32": ROOT / "models/efficientnet-lite0/fp32.onnx",
    "efficientnet-lite0-int8": ROOT / "models/efficientnet-lite0/int8.onnx",
    "efficientnet-lite0-w8": ROOT / "models/efficientnet-lite0/int8.onnx",
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ort_session(path: Path, threads: int):
    """onnxruntime on `path` with the features as the only output (the logits' classifier,
    which nothing then reads, is pruned: as graft's embedding plan skips it)."""
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    t = time.perf_counter()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, (time.perf_counter() - t) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--graft", default=str(ROOT / "target/release/graft"))
    ap.add_argument("--image", default=str(ROOT / "tests/fixtures/images/chelsea.jpg"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernels", default="graft,tract")
    args = ap.parse_args()
    x = preprocess_path(args.image)
    # The accuracy yardstick for every form: onnxruntime's fp32 embedding of the photo.
    fp32_sess, _ = ort_session(MODELS["efficientnet-lite0-fp32"], 1)
    fp32_ref = fp32_sess.run(["features"], {"input": x})[0][0]
    rows = []
    for name in args.models.split(","):
        path = MODELS[name]
        for threads in [int(t) for t in args.threads.split(",")]:
            for kernels in args.kernels.split(","):
                sess, load_ms = ort_session(path, threads)
                sess.run(None, {"input": x})
                graft_rounds, ort_rounds, loads = [], [], []
                for _ in range(args.rounds):
                    g = json.loads(subprocess.check_output(
                        [args.graft, "bench", "--json", "--model", name, "--threads", str(threads),
                         "--cpu-kernels", kernels, "--skip-heads",
                         "--runs", str(args.runs), "--max-batch", "1", "--image", args.image], cwd=ROOT))
                    graft_rounds.append(g["embed_batch1_ms"])
                    loads.append(g["load_ms"])
                    times = []
                    for _ in range(args.runs):
                        t = time.perf_counter()
                        sess.run(None, {"input": x})
                        times.append((time.perf_counter() - t) * 1e3)
                    ort_rounds.append(statistics.median(times))
                ort_ms = statistics.median(ort_rounds)
                graft_ms = statistics.median(graft_rounds)
                # The ratio of each round's pair, then their median: a slow spell of the VM
                # then lands on both sides of one ratio.
                ratio = statistics.median(g / o for g, o in zip(graft_rounds, ort_rounds))
                spread = (min(g / o for g, o in zip(graft_rounds, ort_rounds)),
                          max(g / o for g, o in zip(graft_rounds, ort_rounds)))
                # Embedding agreement on the same photo.
                fsess, _ = ort_session(path, 1)
                ref = fsess.run(["features"], {"input": x})[0][0]
                with tempfile.TemporaryDirectory() as d:
                    out = Path(d) / "e.jsonl"
                    subprocess.check_call([args.graft, "embed", "--model", name, "--cpu-kernels", kernels,
                                           args.image, "--out", str(out)],
                                          cwd=ROOT, stderr=subprocess.DEVNULL)
                    emb = np.array(json.loads(out.read_text().splitlines()[1])["embedding"], dtype=np.float64)
                cos = float(emb @ ref / (np.linalg.norm(emb) * np.linalg.norm(ref)))
                cos32 = float(emb @ fp32_ref / (np.linalg.norm(emb) * np.linalg.norm(fp32_ref)))
                rows.append((name, kernels, threads, statistics.median(loads), load_ms, graft_ms, ort_ms,
                             ratio, spread, cos, cos32))
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; onnxruntime {ort.__version__}; "
          f"batch 1, median of {args.rounds} alternating rounds of {args.runs} runs' medians, "
          f"same .onnx file, same photo")
    print("cosine: graft's embedding vs onnxruntime's on the same file; vs fp32: vs onnxruntime's fp32 model")
    print("ratio: median over rounds of graft ms / onnxruntime ms in the same round (min-max)")
    print(f"{'model':<26} {'kernels':>7} {'thr':>3} {'graft load':>10} {'ort load':>9} {'graft ms':>9} "
          f"{'ort ms':>7} {'ratio':>6} {'(min-max)':>12} {'cosine':>8} {'vs fp32':>8}")
    for name, kern, thr, gl, ol, gm, om, ratio, (lo, hi), cos, cos32 in rows:
        print(f"{name:<26} {kern:>7} {thr:>3} {gl:>10.0f} {ol:>9.0f} {gm:>9.2f} {om:>7.2f} {ratio:>5.2f}x "
              f"{f'({lo:.2f}-{hi:.2f})':>12} {cos:>8.5f} {cos32:>8.5f}")
    # Thread scaling of a single frame: 1 thread's latency over 2 threads' (medians).
    by = {(r[0], r[1], r[2]): r[5] for r in rows}
    for (n, k, t), gm in by.items():
        if t != 1 and (n, k, 1) in by:
            print(f"{n} ({k}): {t} threads {by[(n, k, 1)] / gm:.2f}x faster than 1")


if __name__ == "__main__":
    main()
