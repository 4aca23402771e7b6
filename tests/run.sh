#!/usr/bin/env bash
# graft's test command (the README's and CI's): makes the composited test photo set once
# (cached under target/ and ~/.cache/graft), then runs every test. Extra arguments go to
# `cargo test`.
#
# The tests build the `camera` and `gpu` features too (and the default `serial` and `web`). `camera`'s V4L2 bindings need libclang at
# build time (the tests exercise the camera path's errors, no camera needed). `gpu`'s tests run
# the GPU executor against tract on a Vulkan adapter: Mesa's software one, lavapipe, is enough.
# A missing package is installed when this runs as root, else the tests run without that
# feature and say so.
set -euo pipefail
cd "$(dirname "$0")/.."

source tests/data/photoset.sh

install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    apt-get install -y -qq "$@" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}
have_libclang() {
    ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang.so* /usr/lib/*/libclang-*.so* 2>/dev/null | grep -q .
}
have_vulkan() {
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | grep -q . &&
        ls /usr/lib/*/libvulkan.so.1 /usr/lib/libvulkan.so.1 /lib/*/libvulkan.so.1 2>/dev/null | grep -q .
}
features=()
if have_libclang || install libclang-dev; then
    features+=(camera)
else
    echo "tests/run.sh: libclang not found (apt-get install libclang-dev): testing without the camera feature" >&2
fi
if have_vulkan || install mesa-vulkan-drivers libvulkan1; then
    features+=(gpu)
else
    echo "tests/run.sh: no Vulkan driver (apt-get install mesa-vulkan-drivers): testing without the gpu feature" >&2
fi
# The web page's browser test drives Debian's Chromium through its ChromeDriver (Selenium, from
# the tests' venv).
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } &&
    ! install chromium chromium-driver; then
    echo "tests/run.sh: chromium / chromedriver not found (apt-get install chromium chromium-driver): the browser test is skipped" >&2
    export GRAFT_SKIP_BROWSER=1
fi
# Mesa's device-select layer probes for a Wayland display and prints an error without one.
if ! { command -v mosquitto >/dev/null && command -v mosquitto_sub >/dev/null && command -v openssl >/dev/null; } &&
    ! install mosquitto mosquitto-clients openssl; then
    echo "tests/run.sh: mosquitto not found (apt-get install mosquitto mosquitto-clients): the fleet tests are skipped" >&2
    export GRAFT_SKIP_MQTT=1
fi
# Fleets need no system package to build.
features+=(fleet)
export NODEVICE_SELECT=1

features+=(fault-injection)   # test-only: the kill-mid-write tests pause writes half-way
cargo test --features "$(IFS=,; echo "${features[*]}")" "$@"
