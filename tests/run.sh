#!/usr/bin/env bash
# graft's test command (the README's and CI's): makes the composited test photo set once
# (cached under target/ and ~/.cache/graft), then runs every test. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

py=target/pyenv/bin/python
if [ ! -x "$py" ]; then
    mkdir -p target
    python3 -m venv target/pyenv
fi
"$py" -m pip install --quiet --disable-pip-version-check -r tests/data/requirements.txt
"$py" tests/data/make_dataset.py --out target/graft-data/kiosk

cargo test "$@"
