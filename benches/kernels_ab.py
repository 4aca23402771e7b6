"""Per-operator time of the forward pass with two kernel choices, A/B in one run: `graft bench
--profile --json --threads 1 --cpu-kernels A|B`, alternating, for ROUNDS rounds, medians per
operator (docs/performance.md, "Per operator, before and after"). A and B default to tract and
graft; `depthwise,graft` isolates graft's 1x1 kernel.

    cargo build --release
    python3 benches/kernels_ab.py efficientnet-lite0-fp32 5 [tract,graft]
"""
import json, subprocess, statistics, collections, sys
model = sys.argv[1] if len(sys.argv) > 1 else "efficientnet-lite0-fp32"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
A, B = (sys.argv[3] if len(sys.argv) > 3 else "tract,graft").split(",")
res={k:collections.defaultdict(list) for k in (A, B)}
tot={k:[] for k in res}; emb={k:[] for k in res}
for r in range(rounds):
    for k in (A, B):
        out=subprocess.check_output(["target/release/graft","--model",model,"--threads","1","--cpu-kernels",k,"--json","bench","--profile","--skip-heads","--max-batch","1","--runs","40"],stderr=subprocess.DEVNULL,text=True)
        d=json.loads(out.splitlines()[0]); p=d["profile"]
        tot[k].append(p["total_ms"]); emb[k].append(d["embed_batch1_ms"])
        seen=set()
        for o in p["by_op"]:
            res[k][o["op"]].append(o["ms"]); seen.add(o["op"])
ops=sorted(set(res[A])|set(res[B]), key=lambda o: -max(statistics.median(res[A].get(o,[0])), statistics.median(res[B].get(o,[0]))))
print(f"{'operator':<28} {A + ' ms':>9} {B + ' ms':>9}")
for o in ops:
    t=statistics.median(res[A][o]) if o in res[A] else None
    g=statistics.median(res[B][o]) if o in res[B] else None
    f=lambda v: f"{v:9.3f}" if v is not None else f"{'—':>9}"
    print(f"{o:<28} {f(t)} {f(g)}")
print(f"{'whole pass (profiled)':<28} {statistics.median(tot[A]):9.2f} {statistics.median(tot[B]):9.2f}")
print(f"{'embed b=1 (bench)':<28} {statistics.median(emb[A]):9.2f} {statistics.median(emb[B]):9.2f}")
