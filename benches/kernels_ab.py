"""Per-operator time of the forward pass with tract's plan and with graft's depthwise, A/B in one
run: `graft bench --profile --json --threads 1 --cpu-kernels tract|graft`, alternating, for
ROUNDS rounds, medians per operator (docs/performance.md, "Per operator, before and after").

    cargo build --release
    python3 benches/kernels_ab.py efficientnet-lite0-fp32 5
"""
import json, subprocess, statistics, collections, sys
model = sys.argv[1] if len(sys.argv) > 1 else "efficientnet-lite0-fp32"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
res={k:collections.defaultdict(list) for k in ("tract","graft")}
tot={k:[] for k in res}; emb={k:[] for k in res}
for r in range(rounds):
    for k in ("tract","graft"):
        out=subprocess.check_output(["target/release/graft","--model",model,"--threads","1","--cpu-kernels",k,"--json","bench","--profile","--skip-heads","--max-batch","1","--runs","40"],stderr=subprocess.DEVNULL,text=True)
        d=json.loads(out.splitlines()[0]); p=d["profile"]
        tot[k].append(p["total_ms"]); emb[k].append(d["embed_batch1_ms"])
        seen=set()
        for o in p["by_op"]:
            res[k][o["op"]].append(o["ms"]); seen.add(o["op"])
ops=sorted(set(res["tract"])|set(res["graft"]), key=lambda o: -max(statistics.median(res["tract"].get(o,[0])), statistics.median(res["graft"].get(o,[0]))))
print(f"{'operator':<28} {'tract ms':>9} {'graft ms':>9}")
for o in ops:
    t=statistics.median(res["tract"][o]) if o in res["tract"] else None
    g=statistics.median(res["graft"][o]) if o in res["graft"] else None
    f=lambda v: f"{v:9.3f}" if v is not None else f"{'—':>9}"
    print(f"{o:<28} {f(t)} {f(g)}")
print(f"{'whole pass (profiled)':<28} {statistics.median(tot['tract']):9.2f} {statistics.median(tot['graft']):9.2f}")
print(f"{'embed b=1 (bench)':<28} {statistics.median(emb['tract']):9.2f} {statistics.median(emb['graft']):9.2f}")
