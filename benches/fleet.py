#!/usr/bin/env python3
"""Fleets, measured on this machine with a real Mosquitto started here (docs/FLEET.md).

1. Latency: three `graft serve --fleet` kiosks on one broker; kiosk a LEARNs two classes (3
   photos each); the time from a's reply until kiosks b and c CLASSIFY a bird photo as `birds`
   (examples received, merged, committed, head refitted). Fresh kiosks and broker each round.
2. Scale: `graft fleet simulate`, KIOSKS in-process clients × EXAMPLES each through one broker:
   time until every client holds every example, bytes per example, broker and client memory.

Needs graft built with the fleet feature and the photo set (tests/data/photoset.sh):
    cargo build --release --features fleet
    python3 benches/fleet.py [--rounds 5] [--kiosks 100] [--examples 1000]
GRAFT_BIN picks the binary [default: target/release/graft].
"""

import argparse
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = os.environ.get("GRAFT_BIN", str(ROOT / "target/release/graft"))
PHOTOS = ROOT / "target/graft-data/kiosk"
KEY = "benchmark fleet key, 32 bytes.."


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker(tmp, extra=""):
    port = free_port()
    conf = pathlib.Path(tmp) / f"mosquitto-{port}.conf"
    conf.write_text(
        f"user root\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n"
        f"max_connections -1\nlistener {port} 127.0.0.1\nallow_anonymous true\n{extra}"
    )
    p = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def serve(tmp, kid, port, source, repeat=False):
    env = dict(os.environ, GRAFT_FLEET_KEY=KEY)
    args = [BIN, "serve", "--tcp", "127.0.0.1:0", "--data", f"{tmp}/{kid}", "--source", source,
            "--fleet", f"mqtt://127.0.0.1:{port}", "--fleet-name", "bench", "--kiosk-id", kid]
    if repeat:
        args.append("--repeat")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                         text=True)
    first = p.stdout.readline()
    host, port_s = first.split()[-1].rsplit(":", 1)
    f = socket.create_connection((host, int(port_s))).makefile("rw")
    return p, f


def ask(f, line):
    f.write(line + "\n")
    f.flush()
    return f.readline().strip()


def photos(cls, n):
    return sorted((PHOTOS / cls).iterdir())[:n]


def latency_round():
    with tempfile.TemporaryDirectory() as tmp:
        b_proc, port = broker(tmp)
        a_src = pathlib.Path(tmp) / "a-src"
        a_src.mkdir()
        for i, p in enumerate(photos("birds", 3) + photos("fruit", 3)):
            (a_src / f"{i:02}.jpg").symlink_to(p)
        bird = str(photos("birds", 8)[7])
        procs = []
        a, fa = serve(tmp, "a", port, str(a_src))
        procs.append(a)
        others = []
        for kid in ("b", "c"):
            p, f = serve(tmp, kid, port, bird, repeat=True)
            procs.append(p)
            others.append(f)
        time.sleep(1.0)  # connected and subscribed
        ask(fa, "LEARN birds 3")
        ask(fa, "LEARN fruit 3")
        t0 = time.monotonic()
        out = []
        for f in others:
            while True:
                r = ask(f, "CLASSIFY")
                if r.startswith("OK ") and " label=birds " in r:
                    out.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > 60:
                    raise SystemExit(f"no answer after 60 s: {r}")
                time.sleep(0.01)
        for p in procs:
            p.terminate()
            p.wait()
        b_proc.terminate()
        b_proc.wait()
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kiosks", type=int, default=100)
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--skip-scale", action="store_true")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "?")
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"machine: {platform.node()}, {cpu}, {os.cpu_count()} cores; {mosq}; graft {BIN}")
    times = []
    for _ in range(a.rounds):
        times += latency_round()
    print(f"LEARN on one kiosk answered by the other two: median {statistics.median(times):.2f} s, "
          f"max {max(times):.2f} s over {len(times)} answers")
    if a.skip_scale:
        return
    with tempfile.TemporaryDirectory() as tmp:
        b_proc, port = broker(tmp)
        env = dict(os.environ, GRAFT_FLEET_KEY=KEY)
        r = subprocess.run([BIN, "fleet", "simulate", "--fleet", f"mqtt://127.0.0.1:{port}",
                            "--fleet-name", "scale", "--kiosks", str(a.kiosks), "--examples",
                            str(a.examples), "--broker-pid", str(b_proc.pid)],
                           env=env, capture_output=True, text=True)
        b_proc.terminate()
        b_proc.wait()
        print(r.stdout.strip() or r.stderr.strip())
        sys.exit(r.returncode)


if __name__ == "__main__":
    main()
