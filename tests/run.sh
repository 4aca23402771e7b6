#!/usr/bin/env bash
# graft's test command (the README's and CI's): makes the composited test photo set once
# (cached under target/ and ~/.cache/graft), then runs every test. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

source tests/data/photoset.sh

cargo test "$@"
