"""How the 7x7 feature map is pooled, measured outside graft (issue 16): average (the file's),
GeM with p = 2, 3, 4, max, and average and max concatenated, each through logistic regression on power-transformed + L2
features, tested on photos of objects never trained on. Prints accuracy per shots and the paired
difference against the plain pipeline (average, power 1), +- standard error over draws.

    target/pyenv/bin/pip install onnx==1.23.2 scikit-learn==1.9.1
    target/pyenv/bin/python benches/pooling.py target/graft-data/kiosk 20
    target/pyenv/bin/python benches/pooling.py target/graft-data/scenes/wood/objects 15

The map is the input of the graph's GlobalAveragePool (`/_swish_1/Clip_output_0`, after the last
ReLU6), computed by onnxruntime on the bundled fp32 file with the reference preprocessing
(models/export/preprocess.py). The draws are numpy's, not graft's: compare variants with each
other; `graft curve --baseline efficientnet-lite0-fp32` measures the adopted one in graft.
"""
import glob
import sys

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, "models/export")
from preprocess import preprocess_path  # noqa: E402

from fewshot_draws import draw, object_groups  # noqa: E402

MAP = "/_swish_1/Clip_output_0"


def feature_maps(root):
    m = onnx.load("models/efficientnet-lite0/fp32.onnx")
    m.graph.output.append(onnx.helper.make_tensor_value_info(MAP, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    paths = sorted(p for p in glob.glob(root + "/**/*.jpg", recursive=True) if "/empty/" not in p)
    maps = []
    for p in paths:
        x = preprocess_path(p)
        x = x[None] if x.ndim == 3 else x
        maps.append(s.run([MAP], {"input": x.astype(np.float32)})[0][0].reshape(1280, -1))
    return np.stack(maps), paths


def l2(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def main():
    root = sys.argv[1]
    draws = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    M, paths = feature_maps(root)
    lab = [p.split("/")[-2] for p in paths]
    classes = sorted(set(lab))
    y = np.array([classes.index(c) for c in lab])
    grp = object_groups(lab, paths)

    def gem(p):
        return (np.maximum(M, 0) ** p).mean(2) ** (1 / p)

    feats = {"average": M.mean(2), "gem2": gem(2), "gem3": gem(3), "gem4": gem(4), "max": M.max(2)}
    # Both poolings side by side, each square-rooted and unit length first.
    feats["avg|max"] = np.concatenate([l2(np.sqrt(feats["average"])), l2(np.sqrt(feats["max"]))], 1)
    variants = [("average", 1.0), ("average", 0.5)]
    variants += [(k, 0.5) for k in ("gem2", "gem3", "gem4", "max", "avg|max")]
    variants += [("gem3", 0.75), ("gem3", 1.0)]
    shots_list = [1, 2, 5, 10]
    res = {}
    for shots in shots_list:
        for t in range(draws):
            tr, te = draw(y, grp, shots, 1000 + t)
            for k, p in variants:
                X = feats[k]
                F = l2(np.sign(X) * np.abs(X) ** p)
                m = LogisticRegression(C=20, max_iter=500).fit(F[tr], y[tr])
                res.setdefault((k, p), {}).setdefault(shots, []).append((m.predict(F[te]) == y[te]).mean())
    base = res[("average", 1.0)]
    print(f"{root}: {len(paths)} photos, {len(classes)} classes, {draws} draws")
    print("%-8s %-6s" % ("pooling", "power") + "".join("%22s" % f"{s}-shot" for s in shots_list))
    for (k, p), v in res.items():
        cells = []
        for s in shots_list:
            d = np.subtract(v[s], base[s]) * 100
            cells.append("%6.1f%% (%+.1f±%.1f)" % (100 * np.mean(v[s]), d.mean(), d.std() / np.sqrt(draws)))
        print("%-8s %-6s" % (k, p) + "".join("%22s" % c for c in cells))


if __name__ == "__main__":
    main()
