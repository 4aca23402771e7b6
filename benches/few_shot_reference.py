"""Reference few-shot experiments on graft's own embeddings, outside graft (numpy + scikit-learn),
for the feature-transform leads of issue 16. Prints accuracy per variant and shots.

    graft embed target/graft-data/kiosk --out /tmp/kiosk-emb.jsonl
    target/pyenv/bin/pip install scikit-learn==1.9.1
    target/pyenv/bin/python benches/few_shot_reference.py /tmp/kiosk-emb.jsonl

Variants: the power transform (p = 1, 0.5) and centring before L2 on the mean of the training
examples ("train", SimpleShot-style) or of every other photo without its label ("unlabelled",
a stand-in for the frames a kiosk sees of its own scene). Heads: logistic regression
(C = 20, graft's alpha 0.05) and nearest centroid by cosine. Splits: `shots` photos per class,
tested on photos of other objects (files `<object>_<n>.jpg`), 10 seeded draws. The draws are
numpy's, not graft's: compare the variants with each other, not with `graft curve`.
"""
import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression

from fewshot_draws import draw, object_groups

rows = [json.loads(l) for l in open(sys.argv[1])][1:]
X = np.array([r["embedding"] for r in rows], dtype=np.float64)
lab = [r["path"].split("/")[-2] for r in rows]
classes = sorted(set(lab))
y = np.array([classes.index(l) for l in lab])
grp = object_groups(lab, [r["path"] for r in rows])


def l2(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


VARIANTS = {
    "p1": (1.0, None),
    "p0.5": (0.5, None),
    "p0.5+centre(train)": (0.5, "train"),
    "p0.5+centre(unlabelled)": (0.5, "unlabelled"),
}
SHOTS = [1, 2, 5, 10]
res = {(h, k): {} for h in ("logistic", "centroid") for k in VARIANTS}
for shots in SHOTS:
    for t in range(10):
        tr, te = draw(y, grp, shots, 1000 + t)
        for k, (p, centre) in VARIANTS.items():
            F = l2(np.sign(X) * np.abs(X) ** p)
            if centre == "train":
                F = F - F[tr].mean(0)
            elif centre == "unlabelled":
                F = F - F[[i for i in range(len(y)) if i not in tr]].mean(0)
            F = l2(F)
            m = LogisticRegression(C=20, max_iter=500).fit(F[tr], y[tr])
            res[("logistic", k)].setdefault(shots, []).append((m.predict(F[te]) == y[te]).mean())
            C = l2(np.stack([F[[i for i in tr if y[i] == c]].mean(0) for c in range(len(classes))]))
            res[("centroid", k)].setdefault(shots, []).append(((F[te] @ C.T).argmax(1) == y[te]).mean())
print("%-9s %-24s" % ("head", "variant") + "".join("%10s" % f"{s}-shot" for s in SHOTS))
for (h, k), v in res.items():
    print("%-9s %-24s" % (h, k) + "".join("%9.1f%%" % (100 * np.mean(v[s])) for s in SHOTS))
