"""Augmented views of training photos (issue 16, delivery 1), measured outside graft (numpy +
scikit-learn) on graft's own embeddings: does adding a mirrored copy and four corner crops of
each training photo to the training set help a few-shot head?

    target/pyenv/bin/python benches/augmented_views.py make target/graft-data/kiosk /tmp/views
    graft embed target/graft-data/kiosk --out /tmp/orig.jsonl
    graft embed /tmp/views --out /tmp/views.jsonl
    target/pyenv/bin/python benches/augmented_views.py eval /tmp/orig.jsonl /tmp/views.jsonl

`make` writes VIEW/<class>/<file> for VIEW in flip (mirrored) and tl, tr, bl, br (80% x 80%
corner crops). `eval`: logistic regression (C = 20) on power-0.5 + L2 features, `shots` photos
per class (one per object), tested on the other objects' original photos, 20 seeded draws;
training on the originals only, + the mirrored copies, + all five views. Paired differences
against originals only, with their standard error.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np

VIEWS = ["flip", "tl", "tr", "bl", "br"]


def make(src, dst):
    from PIL import Image, ImageOps

    for p in sorted(Path(src).rglob("*.jpg")):
        im = Image.open(p).convert("RGB")
        W, H = im.size
        cw, ch = round(W * 0.8), round(H * 0.8)
        views = {"flip": ImageOps.mirror(im), "tl": im.crop((0, 0, cw, ch)), "tr": im.crop((W - cw, 0, W, ch)),
                 "bl": im.crop((0, H - ch, cw, H)), "br": im.crop((W - cw, H - ch, W, H))}
        for v, img in views.items():
            out = Path(dst) / v / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            img.save(out, quality=92)


def load(path):
    rows = [json.loads(line) for line in open(path)][1:]
    return {tuple(r["path"].split("/")[-2:]): np.array(r["embedding"]) for r in rows}, rows


def feats(v):
    v = np.sign(v) * np.abs(v) ** 0.5
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def evaluate(orig_path, views_path):
    from sklearn.linear_model import LogisticRegression

    orig, _ = load(orig_path)
    _, vrows = load(views_path)
    aug = {}
    for r in vrows:
        p = r["path"].split("/")
        aug.setdefault(tuple(p[-2:]), {})[p[-3]] = np.array(r["embedding"])
    keys = sorted(orig)
    X = feats(np.stack([orig[k] for k in keys]))
    classes = sorted({k[0] for k in keys})
    y = np.array([classes.index(k[0]) for k in keys])
    grp = np.array([k[0] + "/" + re.sub(r"_\d+$", "", k[1].rsplit(".", 1)[0]) for k in keys])
    res = {}
    for shots in (1, 2, 5):
        for t in range(20):
            rng = np.random.default_rng(500 + t)
            tr = []
            for c in range(len(classes)):
                gs = rng.permutation(sorted(set(grp[y == c])))[:shots]
                tr += [rng.choice(np.where(grp == g)[0]) for g in gs]
            used = set(grp[tr])
            te = [i for i in range(len(y)) if grp[i] not in used]
            for name, vs in (("originals", []), ("+ mirrored", ["flip"]), ("+ all five views", VIEWS)):
                Xt = [X[i] for i in tr] + [feats(aug[keys[i]][v]) for i in tr for v in vs]
                yt = [y[i] for i in tr] + [y[i] for i in tr for v in vs]
                m = LogisticRegression(C=20, max_iter=1000).fit(np.stack(Xt), yt)
                res.setdefault((name, shots), []).append((m.predict(X[te]) == y[te]).mean())
    print("%-18s %6s %16s %18s" % ("training set", "shots", "accuracy", "minus originals"))
    for (name, s), v in sorted(res.items(), key=lambda kv: kv[0][1]):
        d = np.array(v) - np.array(res[("originals", s)])
        print("%-18s %6d %8.3f ± %.3f %+9.3f ± %.3f" % (name, s, np.mean(v), np.std(v), d.mean(),
                                                       d.std(ddof=1) / np.sqrt(len(d))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"]:
        make(sys.argv[2], sys.argv[3])
    else:
        evaluate(sys.argv[2], sys.argv[3])
