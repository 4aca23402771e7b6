"""The web page's live view against the kiosk's classification rate (issue 19's goal: preview
>= 10 fps at 640x480 while classification loses < 10% of its frame rate), side by side in one
run: an event-stream watcher (the page with its preview paused) and a TCP controller asking
CLASSIFY in a loop, first without, then with an MJPEG viewer, alternating for ROUNDS rounds of
SECONDS each. Two classification rates are reported: the feed's (labels the page sees, capped
at --fps) and the controller's (CLASSIFY replies a second).

    cargo build --release
    target/pyenv/bin/python benches/web_preview.py [--fps 15] [--rounds 5] [--seconds 8]
    # a slow board: the aarch64 build under qemu-user (boards/build.sh aarch64-unknown-linux-gnu)
    target/pyenv/bin/python benches/web_preview.py --binary target/aarch64-unknown-linux-gnu/release/graft \
        --wrapper "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu"

The camera is `--source` over 640x480 JPEGs made from the test photo set (Pillow), replayed
with `--repeat`; the kiosk first learns two classes from uploads so that every frame is
classified. Counts come from the event stream's label events (one per classified frame) and
the MJPEG parts the viewer received.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from compare_onnxruntime import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--fps", type=float, default=15.0, help="--preview-fps of the kiosk")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--seconds", type=float, default=8.0)
ap.add_argument("--threads", type=int, default=1, help="GRAFT_THREADS of the kiosk")
ap.add_argument("--model", default=None)
ap.add_argument("--binary", default=str(ROOT / "target/release/graft"))
ap.add_argument("--wrapper", default="", help='e.g. "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu"')
a = ap.parse_args()

data = ROOT / "target/graft-data/kiosk"
work = Path(tempfile.mkdtemp(prefix="graft-web-bench-"))
src = work / "camera"
src.mkdir()
pics = {c: sorted((data / c).glob("*_0.jpg"))[:6] for c in ("birds", "fruit")}
for i, p in enumerate(pics["birds"] + pics["fruit"]):
    im = Image.open(p).convert("RGB")
    # Cover 640x480, centre crop.
    s = max(640 / im.width, 480 / im.height)
    im = im.resize((round(im.width * s) + 1, round(im.height * s) + 1))
    l, t = (im.width - 640) // 2, (im.height - 480) // 2
    im.crop((l, t, l + 640, t + 480)).save(src / f"{i:02}.jpg", quality=90)

cmd = a.wrapper.split() + [a.binary]
if a.model:
    cmd += ["--model", a.model]
cmd += ["serve", "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--data", str(work / "kiosk"),
        "--source", str(src), "--repeat", "--preview-fps", str(a.fps)]
env = dict(os.environ, GRAFT_THREADS=str(a.threads))
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
fronts = dict(proc.stdout.readline().split()[2:4] for _ in range(2))
addr = fronts["http"].rstrip("/")
tcp_host, tcp_port = fronts["tcp"].rsplit(":", 1)
secret = (work / "kiosk/secret").read_text().strip()
auth = {"Authorization": f"Bearer {secret}"}


def call(method, path, body=b"", kind="application/json"):
    req = urllib.request.Request(addr + path, data=body if method == "POST" else None,
                                 method=method, headers={**auth, "Content-Type": kind})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


try:
    for label, files in pics.items():
        for p in files[:3]:
            call("POST", f"/api/upload?label={label}", p.read_bytes(), "image/jpeg")

    def count_events(stop, out):
        try:
            events(stop, out)
        except Exception as e:  # noqa: BLE001 - reported, the round then counts nothing
            print(f"event stream: {e}", file=sys.stderr)

    def count_frames(stop, out):
        try:
            frames(stop, out)
        except Exception as e:  # noqa: BLE001
            print(f"preview: {e}", file=sys.stderr)

    def events(stop, out):
        req = urllib.request.Request(addr + "/api/events", headers=auth)
        with urllib.request.urlopen(req, timeout=30) as r:
            while not stop.is_set():
                line = r.readline()
                if line.startswith(b"data: ") and b'"type":"label"' in line:
                    out["labels"] += 1

    def frames(stop, out):
        req = urllib.request.Request(addr + "/api/preview.mjpg", headers=auth)
        with urllib.request.urlopen(req, timeout=30) as r:
            while not stop.is_set():
                line = r.readline()
                if line.startswith(b"Content-Length:"):
                    n = int(line.split(b":")[1])
                    r.readline()
                    r.read(n)
                    out["frames"] += 1
                    out["bytes"] += n

    def classify_loop(stop, out):
        """A controller on TCP asking CLASSIFY as fast as the kiosk answers."""
        import socket
        with socket.create_connection((tcp_host, int(tcp_port))) as c:
            f = c.makefile("rwb")
            while not stop.is_set():
                f.write(b"CLASSIFY\n")
                f.flush()
                if f.readline().startswith(b"OK "):
                    out["tcp"] += 1

    def phase(viewer):
        """The feed's label events (an event watcher), a TCP controller's CLASSIFY loop, and
        with `viewer` the MJPEG preview too."""
        out = {"labels": 0, "frames": 0, "bytes": 0, "tcp": 0}
        stop = threading.Event()
        ts = [threading.Thread(target=count_events, args=(stop, out), daemon=True),
              threading.Thread(target=classify_loop, args=(stop, out), daemon=True)]
        if viewer:
            ts.append(threading.Thread(target=count_frames, args=(stop, out), daemon=True))
        for t in ts:
            t.start()
        time.sleep(1.0)  # warm-up: the kiosk starts capturing for its first watcher
        start = dict(out)
        time.sleep(a.seconds)
        end = dict(out)
        stop.set()
        for t in ts:
            t.join(timeout=5)
        time.sleep(0.5)
        return {k: (end[k] - start[k]) / a.seconds for k in out}

    rows = []
    for r in range(a.rounds):
        alone = phase(False)
        viewed = phase(True)
        rows.append((alone, viewed))
        print(f"round {r + 1}: feed {alone['labels']:.1f} → {viewed['labels']:.1f} labels/s, "
              f"TCP CLASSIFY {alone['tcp']:.1f} → {viewed['tcp']:.1f}/s with a viewer; "
              f"preview {viewed['frames']:.1f} fps "
              f"({viewed['bytes'] / max(viewed['frames'], 1) / 1024:.0f} KiB a frame)")
    loss = [1 - v["labels"] / s["labels"] for s, v in rows if s["labels"] > 0]
    tcp_loss = [1 - v["tcp"] / s["tcp"] for s, v in rows if s["tcp"] > 0]
    fps = [v["frames"] for _, v in rows]
    print(json.dumps({
        "machine": cpu_name(), "cores": os.cpu_count(), "preview_fps_setting": a.fps,
        "graft_threads": a.threads, "rounds": a.rounds, "seconds": a.seconds,
        "binary": a.binary, "wrapper": a.wrapper,
        "classified_alone_per_s": round(statistics.median(s["labels"] for s, _ in rows), 2),
        "classified_viewed_per_s": round(statistics.median(v["labels"] for _, v in rows), 2),
        "classification_loss_median": round(statistics.median(loss), 4),
        "classification_loss_range": [round(min(loss), 4), round(max(loss), 4)],
        "tcp_classify_alone_per_s": round(statistics.median(s["tcp"] for s, _ in rows), 2),
        "tcp_classify_viewed_per_s": round(statistics.median(v["tcp"] for _, v in rows), 2),
        "tcp_classify_loss_median": round(statistics.median(tcp_loss), 4),
        "tcp_classify_loss_range": [round(min(tcp_loss), 4), round(max(tcp_loss), 4)],
        "preview_fps_median": round(statistics.median(fps), 2),
    }))
finally:
    proc.terminate()
    proc.wait(timeout=30)
