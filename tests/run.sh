#!/usr/bin/env bash
# graft's test command (the README's and CI's): makes the composited test photo set once
# (cached under target/ and ~/.cache/graft), then runs every test. Extra arguments go to
# `cargo test`.
#
# The tests build the `camera` feature too (its V4L2 bindings need libclang at build time; the
# tests exercise the camera path's errors, no camera needed). Without libclang it is installed
# when this runs as root, else the tests run without `camera` and say so.
set -euo pipefail
cd "$(dirname "$0")/.."

source tests/data/photoset.sh

have_libclang() {
    ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang.so* /usr/lib/*/libclang-*.so* 2>/dev/null | grep -q .
}
features=(--features camera)
if ! have_libclang; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq libclang-dev >/dev/null
    else
        echo "tests/run.sh: libclang not found (apt-get install libclang-dev): testing without the camera feature" >&2
        features=()
    fi
fi

cargo test "${features[@]}" "$@"
