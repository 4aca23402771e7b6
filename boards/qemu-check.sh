#!/usr/bin/env bash
# Runs a cross-built graft under qemu-user and checks it against the host build (CI, issue 6):
#   bash boards/qemu-check.sh aarch64-unknown-linux-gnu [full]
# - `graft info` runs and names the target architecture;
# - `graft classify` on a fixture photo: same top-1 as the host binary, for fp32, int8 and w8;
# - `graft bench --profile`: runs, and the plan uses the target's NEON kernels (kernel names in the
#   profile), the int8 graph still pays for activation quantise/dequantise and w8 does not;
# - `graft embed`: embedding cosine >= 0.999 to the host's, same model file;
# - `graft doctor`'s CPU kernel check: graft's depthwise, stem and 1x1 kernels (NEON; armv7's
#   through inline assembly) equal tract's, and the embedding equals tract's plan's;
# - with `full`: a train + predict round trip (few-shot head on fixture photos) under qemu, and
#   the same with a fine-tuned head on the default model cut before its top block (`:top`).
# Timing under emulation means nothing and is not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: boards/qemu-check.sh TARGET [full]}
mode=${2:-}
case "$target" in
    # The Pi 4's core (NEON, no SVE): what tract would run on the board, and ~9x faster to
    # emulate than qemu's default CPU with SVE2. armv7: the Pi 2/3's 32-bit mode, NEON + VFPv4.
    aarch64-unknown-linux-gnu) qemu="qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu"; arch=aarch64 ;;
    armv7-unknown-linux-gnueabihf) qemu="qemu-arm -cpu cortex-a15 -L /usr/arm-linux-gnueabihf"; arch=arm ;;
    *) echo "unsupported target $target" >&2; exit 2 ;;
esac
arm="$qemu target/$target/release/graft"
host=${GRAFT_HOST_BIN:-target/debug/graft}
[ -x "$host" ] || { echo "qemu-check: host binary $host missing (cargo build first)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GRAFT_CACHE=$work/cache GRAFT_THREADS=1

$arm --json info > "$work/info.json"
python3 - "$work/info.json" "$arch" <<'PY'
import json, sys
info = json.loads(open(sys.argv[1]).readline())
assert info["target_arch"] == sys.argv[2], info["target_arch"]
assert info["model"] == "efficientnet-lite0-w8-gem", "ARM builds default to w8-gem: " + info["model"]
# graft's NEON kernels take every convolution of Lite0: 16 depthwise and 32 1x1 (on aarch64
# tract's declutter would move them channel-last, where graft took 1 and 2 of them; armv7 had
# no graft kernel until they were written in inline assembly, and kept tract's plan).
k = info["cpu_kernels"]
assert "graft depthwise (neon): 16 convolutions and 1 dense" in k and "graft 1x1: 32 convolutions" in k, k
print("qemu-check: info ok: %s, %s, cpu features %s" % (info["target_arch"], info["model"], ",".join(info["cpu_features"]) or "-"))
PY

# graft's depthwise, stem and 1x1 kernels on this architecture (NEON on both) against tract's
# own operators: `graft doctor`'s kernel check, 47 + 55 convolutions value by value.
$arm --json doctor > "$work/doctor.json" 2>/dev/null || true
python3 - "$work/doctor.json" "$arch" <<'PY'
import json, sys
checks = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
k = [c for c in checks if c["check"] == "cpu kernels"]
assert k and k[0]["status"] == "ok", f"cpu kernel check: {k or checks}"
assert "(neon)" in k[0]["detail"], k[0]["detail"]
print("qemu-check: " + k[0]["detail"])
PY

# graft's kernels against tract's whole plan on this target (on armv7, where tract's plan has its
# own NEON products, when it finds NEON in /proc/cpuinfo, and a scalar depthwise): the same
# embedding, cosine >= 0.99999, for the board default (w8-gem) and fp32.
for model in efficientnet-lite0-w8-gem efficientnet-lite0-fp32; do
    $arm embed --model $model --out "$work/graft.jsonl" tests/fixtures/images/dog.jpg 2>/dev/null
    $arm embed --model $model --cpu-kernels tract --out "$work/tract.jsonl" tests/fixtures/images/dog.jpg 2>/dev/null
    python3 - "$work/graft.jsonl" "$work/tract.jsonl" "$model" <<'PY'
import json, math, sys
vec = lambda p: json.loads(open(p).read().splitlines()[1])["embedding"]
a, b = vec(sys.argv[1]), vec(sys.argv[2])
cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
assert cos >= 0.99999, f"{sys.argv[3]}: graft's kernels vs tract's plan: cosine {cos}"
print(f"qemu-check: {sys.argv[3]}: graft's kernels vs tract's plan on this target: cosine {cos:.7f}")
PY
done

# The int8 1x1 kernel on Armv8.2's dot product (sdot), as a Cortex-A76 (the Pi 5's core; the
# A72 above has none): checked against tract's operators, taken by all 32 1x1 convolutions of
# the int8 graph, and its embedding the host's (the same integers: measured bit-identical).
if [ "$arch" = aarch64 ]; then
    a76="qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu target/$target/release/graft"
    $a76 --json doctor > "$work/doctor76.json" 2>/dev/null || true
    $a76 --json info --model efficientnet-lite0-int8 > "$work/info76.json"
    $a76 embed --model efficientnet-lite0-int8 --out "$work/a76.jsonl" tests/fixtures/images/dog.jpg 2>/dev/null
    $host embed --model efficientnet-lite0-int8 --out "$work/host76.jsonl" tests/fixtures/images/dog.jpg 2>/dev/null
    python3 - "$work/doctor76.json" "$work/info76.json" "$work/a76.jsonl" "$work/host76.jsonl" <<'PY'
import json, math, sys
checks = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
k = [c for c in checks if c["check"] == "cpu kernels"]
assert k and k[0]["status"] == "ok" and "(neon-sdot)" in k[0]["detail"], f"cpu kernel check: {k or checks}"
info = json.loads(open(sys.argv[2]).readline())
assert "32 convolutions (32 in int8, neon-sdot)" in info["cpu_kernels"], info["cpu_kernels"]
vec = lambda p: json.loads(open(p).read().splitlines()[1])["embedding"]
a, b = vec(sys.argv[3]), vec(sys.argv[4])
cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
assert cos >= 0.99999, f"int8 embedding on sdot: cosine {cos} to the host's"
print(f"qemu-check: as a Cortex-A76: {k[0]['detail']}; int8 embedding cosine {cos:.7f} to the host's "
      f"(largest difference {max(abs(x - y) for x, y in zip(a, b)):.1e})")
PY
fi

# Fleets on this target (a build with --features fleet, as CI's board builds): the wire codec,
# the HMAC tags and the merge, through a Mosquitto started here: 2 simulated kiosks x 20
# examples each until both hold all 40.
if command -v mosquitto >/dev/null; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
    mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
    broker=$!
    sleep 0.5
    if out=$(GRAFT_FLEET_KEY=qemu-check-fleet-key-0123456789 $arm fleet simulate \
        --fleet "mqtt://127.0.0.1:$port" --fleet-name qemu --kiosks 2 --examples 20 --dim 1280 --timeout 120 2>&1); then
        echo "qemu-check: fleet: $out"
    elif grep -q "built without fleets" <<<"$out"; then
        echo "qemu-check: fleet: not in this build (--features fleet), skipped"
    else
        kill "$broker"
        echo "qemu-check $target: fleet simulation failed: $out" >&2
        exit 1
    fi
    kill "$broker"
else
    echo "qemu-check: fleet: mosquitto not installed, skipped"
fi

photo=tests/fixtures/images/dog.jpg
for model in efficientnet-lite0-fp32 efficientnet-lite0-int8 efficientnet-lite0-w8 efficientnet-lite0-w8-gem; do
    a=$($arm --json classify --model $model --top 1 "$photo" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["top"][0]["label"])')
    h=$($host --json classify --model $model --top 1 "$photo" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["top"][0]["label"])')
    [ "$a" = "$h" ] || { echo "qemu-check $target: $model top-1 $a, host says $h" >&2; exit 1; }
    $arm embed --model $model --out "$work/arm.jsonl" "$photo" 2>/dev/null
    $host embed --model $model --out "$work/host.jsonl" "$photo" 2>/dev/null
    cos=$(python3 - "$work/arm.jsonl" "$work/host.jsonl" <<'PY'
import json, math, sys
def vec(p):
    lines = open(p).read().splitlines()
    return json.loads(lines[1])["embedding"]
a, b = vec(sys.argv[1]), vec(sys.argv[2])
dot = sum(x * y for x, y in zip(a, b))
print("%.6f" % (dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))))
PY
)
    python3 -c "import sys; sys.exit(0 if float('$cos') >= 0.999 else 1)" || { echo "qemu-check $target: $model embedding cosine $cos < 0.999" >&2; exit 1; }
    echo "qemu-check $target: $model top-1 '$a' = host, embedding cosine $cos"
done

# Which kernels run here, per model and per `--cpu-kernels` (timings under emulation mean
# nothing: not checked). With graft's kernels (the default) every convolution is graft's; with
# tract's plan, its products run tract's NEON kernels. aarch64 always has NEON; on armv7 tract
# asks the kernel's hwcaps, which qemu-user may not report as a board would, so there the
# kernel names are printed, not required.
case "$arch" in aarch64) simd=arm64simd ;; arm) simd=armv7neon? ;; esac
for kernels in graft tract; do
for model in efficientnet-lite0-int8 efficientnet-lite0-w8; do
    $arm --json bench --model $model --cpu-kernels $kernels --runs 1 --max-batch 1 --profile --skip-heads > "$work/bench.json"
    python3 - "$work/bench.json" "$model" "$simd" "$kernels" "$arch" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).readline())
model, simd, which, arch = sys.argv[2:6]
p = r["profile"]
ops = {o["op"]: o["share"] for o in p["by_op"]}
kernels = sorted({w.strip("[],;") for n in p["nodes"] for w in n["info"].split() if "mmm" in w})
if which == "graft":
    # Every convolution graft's: no tract product left in the embedding's plan.
    assert "GraftPointwise" in ops and "GraftDepthWise" in ops and not kernels, f"{model}: {ops} {kernels}"
elif simd.endswith("?"):
    if not any(simd[:-1] in k for k in kernels):
        print(f"qemu-check: note: {model}: no {simd[:-1]} kernel under emulation: {kernels}")
elif which == "tract":
    assert any(simd in k for k in kernels), f"{model}: no {simd} kernel among {kernels}"
qdq = sum(s for op, s in ops.items() if "uantizeLinear" in op)
if model.endswith("w8"):
    assert qdq == 0, f"w8 still has quantise ops: {ops}"
print(f"qemu-check: bench {model} --cpu-kernels {which}: ops {', '.join(sorted(ops))}; tract kernels "
      f"{', '.join(kernels) or '-'}; quantise/dequantise share {qdq:.0%}; peak {r['peak_rss_mib']:.0f} MiB")
PY
done
done

if [ "$mode" = full ]; then
    for c in cats dogs; do mkdir -p "$work/ds/$c"; done
    cp tests/fixtures/images/chelsea.jpg tests/fixtures/decoded/chelsea.png "$work/ds/cats/"
    cp tests/fixtures/images/chelsea_exif6.jpg "$work/ds/cats/"
    cp tests/fixtures/images/dog.jpg tests/fixtures/decoded/dog.png "$work/ds/dogs/"
    cp tests/fixtures/images/camera_gray.png "$work/ds/dogs/"
    $arm train "$work/ds" --head centroid --out "$work/pets.graft" > /dev/null
    got=$($arm --json predict --head "$work/pets.graft" tests/fixtures/images/dog.jpg | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["best"])')
    [ "$got" = dogs ] || { echo "qemu-check $target: train+predict says $got for dog.jpg" >&2; exit 1; }
    echo "qemu-check $target: train + predict round trip ok (dog.jpg -> $got)"
    # Fine-tuning on the board's default model cut before its top block: the cut, the block read
    # from the (w8) graph, the training and the tuned block's prediction, all on this target.
    $arm --model efficientnet-lite0:top train "$work/ds" --head finetune --finetune-epochs 5 \
        --out "$work/tuned.graft" > /dev/null
    got=$($arm --json predict --head "$work/tuned.graft" tests/fixtures/images/dog.jpg | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["best"])')
    [ "$got" = dogs ] || { echo "qemu-check $target: finetune train+predict says $got for dog.jpg" >&2; exit 1; }
    echo "qemu-check $target: fine-tuning round trip ok (dog.jpg -> $got)"
fi
