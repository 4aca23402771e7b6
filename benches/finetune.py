#!/usr/bin/env python3
"""Fine-tuned vs fixed features, paired: `graft eval --json` of the logistic head and of the
finetune head on the same few-shot draws (same --seed, same splits), at each number of shots;
prints each head's accuracy and the paired difference with its standard error.

    python3 benches/finetune.py DATASET [--shots 5,10,20] [--trials 10] [--graft target/release/graft]
        [--model efficientnet-lite0:top] [-- EXTRA graft eval ARGS...]

Standard library only. Release build: `cargo build --release`. The fixed-feature head runs on
the same `NAME:top` examples (behind the pretrained block), so both see identical pictures.
"""
import argparse
import json
import math
import subprocess
import sys


def evaluate(a, head, shots, extra):
    cmd = [a.graft, "--json", "--model", a.model, "eval", a.dataset, "--head", head,
           "--shots", str(shots), "--trials", str(a.trials), "--seed", str(a.seed)] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--shots", default="5,10,20")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graft", default="target/release/graft")
    ap.add_argument("--model", default="efficientnet-lite0:top")
    ap.add_argument("--heads", default="logistic,finetune", help="baseline,candidate")
    a, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    base, cand = a.heads.split(",")
    print(f"{a.dataset}: {cand} vs {base}, {a.trials} draws, model {a.model}")
    print("| shots | " + base + " | " + cand + " | paired difference (points ± s.e.) | fit s (" + cand + ") |")
    print("|---|---|---|---|---|")
    for shots in [int(s) for s in a.shots.split(",")]:
        try:
            b = evaluate(a, base, shots, extra)
            c = evaluate(a, cand, shots, extra)
        except subprocess.CalledProcessError as e:
            print(f"| {shots} | (not enough pictures: {e.stderr.strip().splitlines()[-1]}) |", file=sys.stderr)
            continue
        d = [y - x for x, y in zip(b["split_accuracies"], c["split_accuracies"])]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1) / len(d))
        print(f"| {shots} | {b['accuracy'] * 100:.1f}% | {c['accuracy'] * 100:.1f}% | "
              f"{mean * 100:+.1f} ± {se * 100:.1f} | {c['fit_seconds_mean']:.2f} |")


if __name__ == "__main__":
    main()
