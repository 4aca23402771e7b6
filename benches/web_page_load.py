"""How fast the kiosk's page is ready (issue 19's goal: < 1 s on a Pi-class CPU, assets < 200 KB
compressed): headless Chromium (Debian's, through Selenium) loads the page ROUNDS times with its
cache off and reports the navigation timing and the bytes it transferred. The server runs
natively, or as the aarch64 build under qemu-user (far slower than a Raspberry Pi 4: an upper
bound for the server's part).

    target/pyenv/bin/python benches/web_page_load.py [--rounds 20]
    target/pyenv/bin/python benches/web_page_load.py --binary target/aarch64-unknown-linux-gnu/release/graft \\
        --wrapper "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu"
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

sys.path.insert(0, str(Path(__file__).parent))
from compare_onnxruntime import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=20)
ap.add_argument("--binary", default=str(ROOT / "target/release/graft"))
ap.add_argument("--wrapper", default="")
a = ap.parse_args()

work = Path(tempfile.mkdtemp(prefix="graft-page-bench-"))
photo = sorted((ROOT / "target/graft-data/kiosk/birds").glob("*_0.jpg"))[0]
proc = subprocess.Popen(
    a.wrapper.split() + [a.binary, "serve", "--http", "127.0.0.1:0", "--data", str(work / "kiosk"),
                         "--source", str(photo), "--repeat"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
url = proc.stdout.readline().split()[3]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}"]:
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    rows = []
    for _ in range(a.rounds):
        driver.get("about:blank")
        driver.get(url)
        t = driver.execute_script("""
            const n = performance.getEntriesByType('navigation')[0];
            const r = performance.getEntriesByType('resource');
            return {ttfb: n.responseStart, dom: n.domContentLoadedEventEnd, load: n.loadEventEnd,
                    bytes: n.transferSize + r.reduce((s, e) => s + e.transferSize, 0),
                    body: n.decodedBodySize + r.reduce((s, e) => s + e.decodedBodySize, 0)};""")
        rows.append(t)
    med = lambda k: round(statistics.median(r[k] for r in rows), 1)
    print(json.dumps({
        "machine": cpu_name(), "server": " ".join(a.wrapper.split() + [a.binary]),
        "rounds": a.rounds, "first_byte_ms": med("ttfb"), "dom_ready_ms": med("dom"),
        "load_ms": med("load"), "load_ms_max": round(max(r["load"] for r in rows), 1),
        "transferred_bytes": rows[-1]["bytes"], "decoded_bytes": rows[-1]["body"],
    }))
finally:
    driver.quit()
    proc.terminate()
    proc.wait(timeout=30)
