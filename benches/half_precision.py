"""Few-shot accuracy of two embedding files of the same photos, on the same draws: the check that
the f16 variant (`efficientnet-lite0-f16-gem`) keeps fp32's few-shot accuracy (issue 17).

Real f16 arithmetic needs an ARMv8.2 CPU; without a board, qemu-user emulates a Cortex-A76 bit
for bit. tract finds FP16 in /proc/cpuinfo, which qemu-user 7.2 does not emulate, so that build
forces tract's own `feature_cpu = "fp16"` cfg (what a Pi 5's "asimdhp" gives it):

    RUSTFLAGS='--cfg feature_cpu="fp16"' cargo build --release --target aarch64-unknown-linux-gnu \\
        --target-dir target/a76 -p graft-cli
    qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu \\
        target/a76/aarch64-unknown-linux-gnu/release/graft --threads 2 \\
        embed --model efficientnet-lite0-f16-gem PHOTOS --out f16.jsonl
    target/release/graft embed --model efficientnet-lite0-fp32-gem PHOTOS --out fp32.jsonl
    target/pyenv/bin/python benches/half_precision.py fp32.jsonl f16.jsonl

Prints the cosine of each photo's two embeddings and, per shots, the accuracy of a logistic
regression (graft's default transform: power 0.75, L2; C = 20) on both files over 30 seeded
draws of `shots` training photos per class (the rest tested), with the paired difference.
"""
import json
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression


def load(path):
    rows = [json.loads(line) for line in open(path)][1:]
    rows.sort(key=lambda r: r["path"])
    return np.array([r["embedding"] for r in rows]), [r["path"] for r in rows]


def features(x):
    f = np.sign(x) * np.abs(x) ** 0.75
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def main():
    xa, pa = load(sys.argv[1])
    xb, pb = load(sys.argv[2])
    assert [p.split("/")[-2:] for p in pa] == [p.split("/")[-2:] for p in pb], "not the same photos"
    cos = np.sum(xa * xb, axis=1) / (np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1))
    print(f"{len(cos)} photos: embedding cosine min {cos.min():.6f}, median {np.median(cos):.6f}")
    labels = [p.split("/")[-2] for p in pa]
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    fa, fb = features(xa), features(xb)
    rng = np.random.default_rng(0)
    for shots in (1, 2, 5):
        acc = ([], [])
        for _ in range(30):
            train = np.concatenate([rng.choice(np.where(y == c)[0], shots, replace=False)
                                    for c in range(len(classes))])
            test = np.setdiff1d(np.arange(len(y)), train)
            for i, f in enumerate((fa, fb)):
                m = LogisticRegression(C=20, max_iter=2000).fit(f[train], y[train])
                acc[i].append((m.predict(f[test]) == y[test]).mean())
        a, b = np.array(acc[0]), np.array(acc[1])
        d = b - a
        print(f"{shots}-shot: first {a.mean() * 100:.1f}%, second {b.mean() * 100:.1f}%, paired difference "
              f"{d.mean() * 100:+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)) * 100:.2f} points; "
              f"equal accuracy in {np.mean(d == 0) * 100:.0f}% of draws")


if __name__ == "__main__":
    main()
