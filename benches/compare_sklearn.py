"""graft's logistic head (linfa-logistic) vs scikit-learn's LogisticRegression on the same
embeddings, same protocol: N examples per class, group-aware (two photos of one object never
straddle train and test), T random draws; mean accuracy and mean fit time, and their ratios.

    cargo build --release && bash tests/run.sh --no-run   # or make the photo set yourself
    .venv/bin/python benches/compare_sklearn.py [--data target/graft-data/kiosk] [--shots 5,10,20]

The draws differ between the two sides (different RNGs) but follow the same protocol; with
--trials 20 the means are comparable. scikit-learn is configured like graft's head: L2-normalised
embeddings, L2 penalty with C = 1 / alpha (alpha = 0.05), multinomial, L-BFGS.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 0.05  # graft's HeadParams::default().logistic_alpha


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--graft", default=str(ROOT / "target/release/graft"))
    ap.add_argument("--data", default=str(ROOT / "target/graft-data/kiosk"))
    ap.add_argument("--classes", default="birds,mammals,fruit,vegetables,flowers")
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    classes = args.classes.split(",")
    with tempfile.TemporaryDirectory() as d:
        ds = Path(d) / "ds"
        ds.mkdir()
        for c in classes:
            os.symlink(Path(args.data) / c, ds / c)
        emb = Path(d) / "e.jsonl"
        subprocess.check_call([args.graft, "embed", str(ds), "--out", str(emb)], stderr=subprocess.DEVNULL)
        recs = [json.loads(l) for l in emb.read_text().splitlines()[1:]]
        graft_rows = {}
        for shots in [int(s) for s in args.shots.split(",")]:
            r = json.loads(subprocess.check_output(
                [args.graft, "eval", str(ds), "--head", "logistic", "--shots", str(shots),
                 "--trials", str(args.trials), "--json"]))
            graft_rows[shots] = (r["accuracy"], r["accuracy_std"], r["fit_seconds_mean"])
    x = np.array([r["embedding"] for r in recs], dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    label = [Path(r["path"]).parent.name for r in recs]
    y = np.array([classes.index(l) for l in label])
    group = np.array([f"{l}/{Path(r['path']).stem.rsplit('_', 1)[0]}" for l, r in zip(label, recs)])
    print(f"{'shots':>5} {'graft acc':>12} {'sklearn acc':>12} {'graft fit ms':>13} {'sklearn fit ms':>15} {'time ratio':>10}")
    for shots, (g_acc, g_std, g_fit) in graft_rows.items():
        accs, fits = [], []
        for t in range(args.trials):
            rng = np.random.default_rng(t)
            train = []
            for c in range(len(classes)):
                idx = np.flatnonzero(y == c)
                train += list(rng.permutation(idx)[:shots])
            used = set(group[train])
            test = [i for i in range(len(y)) if i not in train and group[i] not in used]
            m = LogisticRegression(C=1 / ALPHA, max_iter=200)
            s = time.perf_counter()
            m.fit(x[train], y[train])
            fits.append(time.perf_counter() - s)
            accs.append((m.predict(x[test]) == y[test]).mean())
        s_acc, s_std, s_fit = np.mean(accs), np.std(accs), np.mean(fits)
        print(f"{shots:>5} {g_acc:>6.3f}±{g_std:.3f} {s_acc:>6.3f}±{s_std:.3f} {g_fit * 1e3:>13.1f} {s_fit * 1e3:>15.1f} {g_fit / s_fit:>9.2f}x")


if __name__ == "__main__":
    main()
