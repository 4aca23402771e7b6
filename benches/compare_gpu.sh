#!/usr/bin/env bash
# GPU against CPU on this machine, side by side in one run: `graft bench` on the same photo and
# model with --device cpu and --device gpu, batch 1 latency and the best per-image time up to
# batch 64, then the ratios. Needs a release build with the gpu feature:
#   cargo build --release --features gpu && bash benches/compare_gpu.sh [MODEL] [MAX_BATCH]
# GRAFT_GPU_ADAPTER=name picks the adapter; GRAFT_THREADS sets the CPU's threads (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-efficientnet-lite0-fp32}
max_batch=${2:-64}
bin=${GRAFT_BIN:-target/release/graft}
threads=${GRAFT_THREADS:-$(nproc)}
export NODEVICE_SELECT=1
run() {
    "$bin" --json --model "$model" --threads "$threads" --device "$1" bench \
        --skip-heads --runs 5 --max-batch "$max_batch" ${2:+--profile}
}
cpu=$(run cpu)
gpu=$(run gpu profile)
python3 - "$cpu" "$gpu" "$(uname -n)" <<'PY'
import json, sys
cpu, gpu, host = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {host}, CPU {cpu_name}, {cpu['threads']} thread(s); GPU {gpu['device']}")
print(f"model {cpu['model']}, image {cpu['image']}")
def per(r, b):
    return next((x["ms_per_image"] for x in r["batches"] if x["batch"] == b), None)
print(f"{'batch':>6} {'cpu ms/img':>11} {'gpu ms/img':>11} {'gpu/cpu speed':>14} {'gpu img/s':>10}")
for b in [x["batch"] for x in cpu["batches"]]:
    c, g = per(cpu, b), per(gpu, b)
    if c is None or g is None:
        continue
    print(f"{b:>6} {c:>11.2f} {g:>11.2f} {c / g:>13.2f}x {1000 / g:>10.1f}")
print(f"best: cpu {cpu['best_batch_ms_per_image']:.2f} ms/img (batch {cpu['best_batch']}), "
      f"gpu {gpu['best_batch_ms_per_image']:.2f} ms/img (batch {gpu['best_batch']}): "
      f"{cpu['best_batch_ms_per_image'] / gpu['best_batch_ms_per_image']:.2f}x")
p = gpu.get("gpu_profile")
if p:
    total = sum(k["ms"] for k in p["kernels"])
    print(f"gpu kernels, batch {p['batch']}, each alone ({total:.1f} ms per batch):")
    for k in p["kernels"]:
        print(f"  {k['kernel']:<20} {k['steps']:>3} steps {k['ms']:>9.2f} ms {k['ms'] / total * 100:>5.1f}% {k['gmac_per_s']:>8.1f} GMAC/s")
PY
