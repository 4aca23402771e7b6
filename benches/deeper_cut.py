"""One block deeper (issue 20), measured outside graft before porting it: fine-tuning
EfficientNet-Lite0's top block alone (what `--head finetune` trains) against fine-tuning block 15
together with it, both against fixed features, on the same few-shot draws.

    target/pyenv/bin/pip install onnx==1.23.2 jax==0.10.2 jaxlib==0.10.2
    target/pyenv/bin/python benches/deeper_cut.py target/graft-data/kiosk --shots 20 --draws 8

Arms, all on `clip -> GeM (p = 3) -> power 0.75 -> L2 -> linear classifier` (graft's transform):
- `fixed`: the linear classifier alone on the pretrained features (the linear probe);
- `top`: `_conv_head` (320 -> 1280, 1x1) trained with the classifier, from the probe;
- `block15`: block 15 (expand 1x1 192 -> 1152, ReLU6, depthwise 3x3, ReLU6, project 1x1
  1152 -> 320) and `_conv_head` trained with the classifier, from the probe.

Both trained arms use full-rank updates, L2-SP toward the pretrained weights (lambda 0.01 on the
squared distance, as graft), the classifier's L2 as graft's logistic head (alpha 0.05 / n), Adam,
mini-batches of 32. Each trained arm reports its accuracy at every (step size, epochs) pair, and
the best of them chosen on the test photos themselves: an oracle, an upper bound on what early
stopping by cross-validation could reach. If the deeper arm's upper bound does not clearly beat
the top block's, the deeper cut does not pay.

The cut inputs are computed by onnxruntime on the bundled fp32 file with the reference
preprocessing (models/export/preprocess.py), and the script checks its own forward pass of
block 15 against onnxruntime's output of that block before it trains anything. The draws are
numpy's (benches/fewshot_draws.py): test photos show objects never trained on.
"""
import argparse
import glob
import itertools
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, "models/export")
from preprocess import preprocess_path  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fewshot_draws import draw, object_groups  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

MODEL = "models/efficientnet-lite0/fp32.onnx"
B15_IN = "/_blocks.14/Add_output_0"
TOP_IN = "/_blocks.15/_project_conv/Conv_output_0"
CONVS = {
    "e": "/_blocks.15/_expand_conv/Conv",
    "d": "/_blocks.15/_depthwise_conv/Conv",
    "p": "/_blocks.15/_project_conv/Conv",
    "h": "/_conv_head/Conv",
}
ALPHA = 0.05  # graft's logistic_alpha
L2SP = 0.01  # graft's finetune_l2sp
BATCH = 32


def weights():
    m = onnx.load(MODEL)
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    w = {}
    for k, name in CONVS.items():
        n = nodes[name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert list(attrs["strides"]) == [1, 1], name
        w[k + "_w"] = init[n.input[1]].astype(np.float32)
        w[k + "_b"] = init[n.input[2]].astype(np.float32)
        if k == "d":
            assert attrs["group"] == w["d_w"].shape[0] and list(attrs["pads"]) == [1, 1, 1, 1], name
        else:
            assert attrs["group"] == 1 and w[k + "_w"].shape[2:] == (1, 1), name
            w[k + "_w"] = w[k + "_w"][:, :, 0, 0]
    return w


def cut_inputs(root):
    """Block 15's input and output per photo (onnxruntime), cached beside the set."""
    paths = sorted(p for p in glob.glob(root + "/**/*.jpg", recursive=True) if "/empty/" not in p)
    cache = os.path.join("target", "deeper-cut-" + root.strip("/").replace("/", "_") + ".npz")
    if os.path.exists(cache):
        z = np.load(cache)
        if list(z["paths"]) == paths:
            return z["x"], z["p"], paths
    m = onnx.load(MODEL)
    for t in (B15_IN, TOP_IN):
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xs, ps = [], []
    for p in paths:
        x, out = s.run([B15_IN, TOP_IN], {"input": preprocess_path(p).astype(np.float32)})
        xs.append(x[0])
        ps.append(out[0])
    x, p = np.stack(xs), np.stack(ps)
    np.savez(cache, x=x, p=p, paths=np.array(paths))
    return x, p, paths


def conv1x1(x, w, b):
    return jnp.einsum("nchw,oc->nohw", x, w) + b[None, :, None, None]


def block15(t, x):
    e = jnp.clip(conv1x1(x, t["e_w"], t["e_b"]), 0.0, 6.0)
    d = jax.lax.conv_general_dilated(
        e, t["d_w"], (1, 1), ((1, 1), (1, 1)), feature_group_count=e.shape[1],
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    d = jnp.clip(d + t["d_b"][None, :, None, None], 0.0, 6.0)
    return conv1x1(d, t["p_w"], t["p_b"])


def features(t, p):
    """graft's transform after the top block: clip, GeM p = 3, power 0.75, L2."""
    h = jnp.clip(conv1x1(p, t["h_w"], t["h_b"]), 0.0, 6.0)
    g = (jnp.mean(h ** 3, axis=(2, 3)) + 1e-12) ** (1.0 / 3.0)
    f = (g + 1e-6) ** 0.75
    return f / jnp.linalg.norm(f, axis=1, keepdims=True)


def ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def adam(grads, params, state, lr):
    m, v, k = state
    k = k + 1
    m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
    v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
    params = jax.tree.map(
        lambda p, a, b: p - lr * (a / (1 - 0.9 ** k)) / (jnp.sqrt(b / (1 - 0.999 ** k)) + 1e-8),
        params, m, v)
    return params, (m, v, k)


def zeros_like(t):
    return jax.tree.map(jnp.zeros_like, t)


def probe(f, y, ncls):
    """The linear probe: mean cross-entropy + alpha / (2n) |W|^2, full batch, to convergence."""
    n = f.shape[0]
    c = {"W": jnp.zeros((f.shape[1], ncls)), "b": jnp.zeros(ncls)}

    @jax.jit
    def step(c, state):
        loss = lambda c: ce(f @ c["W"] + c["b"], y) + ALPHA / (2 * n) * jnp.sum(c["W"] ** 2)
        return adam(jax.grad(loss)(c), c, state, 0.05)

    state = (zeros_like(c), zeros_like(c), 0)
    for _ in range(600):
        c, state = step(c, state)
    return c


def make_trainer(arm, w0, n):
    train_keys = ["h_w", "h_b"] if arm == "top" else ["e_w", "e_b", "d_w", "d_b", "p_w", "p_b", "h_w", "h_b"]
    frozen = {k: v for k, v in w0.items() if k not in train_keys}

    def loss(params, xb, yb):
        t = dict(frozen, **params["t"])
        p = xb if arm == "top" else block15(t, xb)
        logits = features(t, p) @ params["c"]["W"] + params["c"]["b"]
        sp = sum(jnp.sum((params["t"][k] - w0[k]) ** 2) for k in train_keys)
        return ce(logits, yb) + ALPHA / (2 * n) * jnp.sum(params["c"]["W"] ** 2) + L2SP * sp

    @jax.jit
    def step(params, state, xb, yb, lr):
        return adam(jax.grad(loss)(params, xb, yb), params, state, lr)

    @jax.jit
    def predict(params, xs):
        t = dict(frozen, **params["t"])
        p = xs if arm == "top" else block15(t, xs)
        return jnp.argmax(features(t, p) @ params["c"]["W"] + params["c"]["b"], 1)

    return train_keys, step, predict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--shots", default="20")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--lrs", default="0.0001,0.0003,0.001")
    ap.add_argument("--epochs", default="5,10,20,30")
    a = ap.parse_args()
    lrs = [float(s) for s in a.lrs.split(",")]
    checkpoints = [int(s) for s in a.epochs.split(",")]

    t0 = time.time()
    X, P, paths = cut_inputs(a.dataset)
    w0 = {k: jnp.asarray(v) for k, v in weights().items()}
    # The script's forward pass of block 15 against onnxruntime's, on every photo.
    mine = np.concatenate([np.asarray(block15(w0, jnp.asarray(X[i:i + 64]))) for i in range(0, len(X), 64)])
    cos = (mine * P).reshape(len(P), -1).sum(1) / (
        np.linalg.norm(mine.reshape(len(P), -1), axis=1) * np.linalg.norm(P.reshape(len(P), -1), axis=1))
    assert cos.min() > 0.99999, f"block 15 differs from onnxruntime's: cosine {cos.min()}"
    labels = [p.split("/")[-2] for p in paths]
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    grp = object_groups(labels, paths)
    print(f"{a.dataset}: {len(paths)} photos, {len(classes)} classes, {a.draws} draws; "
          f"block 15 matches onnxruntime (cosine >= {cos.min():.6f}); inputs in {time.time() - t0:.0f} s")

    Xj, Pj = jnp.asarray(X), jnp.asarray(P)
    f0 = np.concatenate([np.asarray(features(w0, Pj[i:i + 64])) for i in range(0, len(P), 64)])
    arms = ["top", "block15"]
    for shots in [int(s) for s in a.shots.split(",")]:
        acc = {"fixed": []}
        for arm, lr, ep in itertools.product(arms, lrs, checkpoints):
            acc[(arm, lr, ep)] = []
        fit_s = {arm: [] for arm in arms}
        for d in range(a.draws):
            tr, te = draw(y, grp, shots, 1000 + d)
            tr, te = np.array(tr), np.array(te)
            n = len(tr)
            c0 = probe(jnp.asarray(f0[tr]), jnp.asarray(y[tr]), len(classes))
            pred = np.argmax(f0[te] @ np.asarray(c0["W"]) + np.asarray(c0["b"]), 1)
            acc["fixed"].append((pred == y[te]).mean())
            for arm in arms:
                keys, step, predict = make_trainer(arm, w0, n)
                inputs = Pj if arm == "top" else Xj
                for lr in lrs:
                    params = {"t": {k: w0[k] for k in keys}, "c": c0}
                    state = (zeros_like(params), zeros_like(params), 0)
                    rng = np.random.default_rng(d)
                    start = time.time()
                    for ep in range(1, max(checkpoints) + 1):
                        order = rng.permutation(tr)
                        for i in range(0, n - BATCH + 1 if n >= BATCH else 1, BATCH):
                            b = order[i:i + BATCH]
                            params, state = step(params, state, inputs[b], jnp.asarray(y[b]), lr)
                        if ep in checkpoints:
                            pr = np.concatenate([np.asarray(predict(params, inputs[te[i:i + 64]]))
                                                 for i in range(0, len(te), 64)])
                            acc[(arm, lr, ep)].append((pr == y[te]).mean())
                    fit_s[arm].append(time.time() - start)
            print(f"  draw {d + 1}/{a.draws} at {shots} shots done ({time.time() - t0:.0f} s)", file=sys.stderr)

        base = np.array(acc["fixed"])

        def row(name, v):
            diff = (np.array(v) - base) * 100
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
            return f"| {shots} | {name} | {np.mean(v) * 100:.1f}% | {diff.mean():+.1f} ± {se:.1f} |"

        print(f"\n{shots} shots, {len(base)} draws (difference: paired, points ± standard error)")
        print("| shots | arm | accuracy | vs fixed |")
        print("|---|---|---|---|")
        print(f"| {shots} | fixed features (probe) | {base.mean() * 100:.1f}% | |")
        bests = {arm: max(((lr, ep) for lr in lrs for ep in checkpoints), key=lambda k: np.mean(acc[(arm,) + k]))
                 for arm in arms}
        for arm in arms:
            best = bests[arm]
            for lr in lrs:
                cells = " / ".join(f"{np.mean(acc[(arm, lr, ep)]) * 100:.1f}" for ep in checkpoints)
                print(f"| {shots} | {arm}, step {lr:g}, epochs {'/'.join(map(str, checkpoints))} | {cells}% | |")
            print(row(f"**{arm}, best of all (oracle: step {best[0]:g}, {best[1]} epochs)**", acc[(arm,) + best]))
            print(f"| {shots} | {arm}: seconds per fit of {max(checkpoints)} epochs (2 cores) | "
                  f"{np.mean(fit_s[arm]):.1f} | |")
        diff = (np.array(acc[("block15",) + bests["block15"]]) - np.array(acc[("top",) + bests["top"]])) * 100
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
        print(f"| {shots} | block15's best minus top's best | | {diff.mean():+.1f} ± {se:.1f} |")


if __name__ == "__main__":
    main()
