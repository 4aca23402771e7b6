"""Domain adaptation and the empty-scene class on a kiosk's own scene (issue 16, deliveries 4 and 5),
measured outside graft (numpy + scikit-learn) on graft's own embeddings.

    target/pyenv/bin/python benches/scene_set.py                      # the scene set
    graft embed target/graft-data/scenes --out /tmp/scenes-emb.jsonl
    target/pyenv/bin/pip install scikit-learn==1.9.1
    target/pyenv/bin/python benches/scene_adaptation.py /tmp/scenes-emb.jsonl

Per scene and draw: 6 classes taught with `shots` objects each (one photo per object), 2 classes
never taught; tested on the other objects of the taught classes (closed-set accuracy), on the
never-taught ones (AUROC of known vs never-taught, by the maximum probability and by cosine to
the nearest class mean) and on empty-scene frames. Features as graft's heads take them: the
square root (power 0.5), then L2. Variants:

- `plain`: as graft does today;
- `centre(train)`: minus the mean of the taught photos, then L2 again (SimpleShot's centring;
  needs no unlabelled frames);
- `centre(empty)`: minus the mean of 20 empty-scene frames, then L2 again (the kiosk records its
  scene when nothing is in front of it);
- `centre(stream)`: minus the mean of every untaught frame of the scene (what a running kiosk sees
  without labels: objects and empty scene mixed), then L2 again;
- `+empty class`: `plain` with a seventh class taught from 5 empty-scene frames (the "teach the
  empty scene" workflow); an answer of that class for an object counts as a rejection;
- `centre(stream)+empty class`: both.

Given embeddings of target/graft-data/kiosk (mixed backgrounds, no empty frames), only `plain` and
`centre(stream)` run.

Empty frames are split: 20 for the statistics, 5 to teach the class, the rest to test.
"""
import json
import re
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

rows = [json.loads(line) for line in open(sys.argv[1])][1:]
X = np.array([r["embedding"] for r in rows], dtype=np.float64)
parts = [r["path"].split("/") for r in rows]
# scenes/<scene>/objects/<class>/<file>, scenes/<scene>/empty/<file>, or kiosk/<class>/<file>
# (target/graft-data/kiosk: one "scene" of mixed backgrounds)
scene = np.array([p[-4] if p[-3] == "objects" else p[-3] for p in parts])
lab = np.array([p[-2] for p in parts])
grp = np.array([p[-2] + "/" + re.sub(r"_\d+$", "", p[-1].rsplit(".", 1)[0]) for p in parts])
DRAWS = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def l2(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


F0 = l2(np.sign(X) * np.abs(X) ** 0.5)
res = {}
for sc in sorted(set(scene)):
    ins = np.where(scene == sc)[0]
    empties = [i for i in ins if lab[i] == "empty"]
    objects = sorted(set(lab[ins]) - {"empty"})
    for shots in (1, 5):
        for t in range(DRAWS):
            rng = np.random.default_rng(7000 + t)
            perm = rng.permutation(objects)
            known, novel = list(perm[:6]), list(perm[6:])
            e = rng.permutation(empties)
            e_stats, e_teach, e_test = e[:20], e[20:25], e[25:]
            tr = []
            for c in known:
                gs = rng.permutation(sorted({grp[i] for i in ins if lab[i] == c}))[:shots]
                for g in gs:  # one photo of each taught object
                    tr.append(rng.choice([i for i in ins if grp[i] == g]))
            used = {grp[i] for i in tr}
            te_known = [i for i in ins if lab[i] in known and grp[i] not in used]
            te_novel = [i for i in ins if lab[i] in novel]
            stream = [i for i in ins if i not in set(tr)]
            variants = ["plain", "centre(train)", "centre(stream)"]
            if empties:
                variants += ["centre(empty)", "+empty class", "centre(stream)+empty class"]
            for variant in variants:
                F = F0
                if variant == "centre(empty)":
                    F = l2(F0 - F0[e_stats].mean(0))
                elif variant == "centre(train)":
                    F = l2(F0 - F0[tr].mean(0))
                elif variant.startswith("centre(stream)"):
                    F = l2(F0 - F0[stream].mean(0))
                with_empty = variant.endswith("+empty class")
                names = known + (["empty"] if with_empty else [])
                idx = list(tr) + (list(e_teach) if with_empty else [])
                y = np.array([names.index(lab[i]) for i in idx])
                m = LogisticRegression(C=20, max_iter=1000).fit(F[idx], y)
                P = m.predict_proba(F)
                kn = [names.index(lab[i]) for i in te_known]
                pred = P[te_known].argmax(1)
                score = P.max(1)
                if with_empty:  # "empty" answered = not a known object
                    score = np.where(P.argmax(1) == len(known), 0.0, P[:, : len(known)].max(1))
                    acc = (P[te_known][:, : len(known)].argmax(1) == kn).mean()
                else:
                    acc = (pred == kn).mean()
                cents = l2(np.stack([F[[i for i, yy in zip(idx, y) if yy == c]].mean(0) for c in range(len(known))]))
                cos = (F @ cents.T).max(1)
                lbl = [1] * len(te_known) + [0] * len(te_novel)
                r = res.setdefault((variant, shots), {k: [] for k in ("acc", "auroc", "auroc_cos", "empty_auroc", "empty_ok")})
                r["acc"].append(acc)
                r["auroc"].append(roc_auc_score(lbl, np.r_[score[te_known], score[te_novel]]))
                r["auroc_cos"].append(roc_auc_score(lbl, np.r_[cos[te_known], cos[te_novel]]))
                r["empty_auroc"].append(roc_auc_score([1] * len(te_known) + [0] * len(e_test),
                                                      np.r_[score[te_known], score[e_test]]) if empties else np.nan)
                r["empty_ok"].append((P[e_test].argmax(1) == len(known)).mean() if with_empty else np.nan)

print(f"{len(set(scene))} scene(s) x {DRAWS} draws; mean ± standard deviation over scene x draw")
print("%-27s %5s %14s %16s %16s %16s %10s" % ("variant", "shots", "accuracy", "AUROC maxprob", "AUROC cos",
                                            "AUROC vs empty", "empty=empty"))
for (v, s), r in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    f = lambda k: "-" if np.isnan(r[k]).all() else "%6.3f ± %.3f" % (np.mean(r[k]), np.std(r[k]))
    eo = "-" if np.isnan(r["empty_ok"]).all() else "%.2f" % np.nanmean(r["empty_ok"])
    print("%-27s %5d %14s %16s %16s %16s %10s" % (v, s, f("acc"), f("auroc"), f("auroc_cos"), f("empty_auroc"), eo))

# Paired: the same scene x draw, each variant's AUROC minus plain's maximum probability.
base = {s: np.array(r["auroc"]) for (v, s), r in res.items() if v == "plain"}
print("\nAUROC minus plain's max-probability AUROC, paired (mean ± standard error)")
for (v, s), r in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    for k in ("auroc", "auroc_cos"):
        d = np.array(r[k]) - base[s]
        print("%-27s %5d %-10s %+.3f ± %.3f" % (v, s, k, d.mean(), d.std(ddof=1) / np.sqrt(len(d))))
