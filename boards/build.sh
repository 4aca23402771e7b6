#!/usr/bin/env bash
# Cross-builds a stripped release `graft` for a board:
#   bash boards/build.sh aarch64-unknown-linux-gnu            # Pi 3/4/5/Zero 2 W (64-bit), Jetson
#   bash boards/build.sh armv7-unknown-linux-gnueabihf        # Pi 2/3/Zero 2 W (32-bit OS)
#   bash boards/build.sh aarch64-unknown-linux-gnu --features camera
# Needs (Debian/Ubuntu): rustup target add TARGET; gcc-aarch64-linux-gnu or gcc-arm-linux-gnueabihf
# (the linkers named in .cargo/config.toml); for --features camera also libclang-dev (the V4L2
# bindings are generated for the target from the cross toolchain's kernel headers).
# The binary lands in target/TARGET/release/graft, stripped; its size is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: boards/build.sh TARGET [cargo build flags]}
shift
case "$target" in
    aarch64-unknown-linux-gnu) cross=aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) cross=arm-linux-gnueabihf ;;
    x86_64-unknown-linux-gnu) cross= ;;
    *) echo "boards/build.sh: unsupported target $target" >&2; exit 2 ;;
esac
rustup target add "$target" >/dev/null 2>&1 || true
if [ -n "$cross" ]; then
    command -v "$cross-gcc" >/dev/null || { echo "boards/build.sh: $cross-gcc missing: apt-get install gcc-${cross/-linux-/-linux-}" >&2; exit 1; }
    # bindgen (camera feature) must parse the target's headers, not the host's.
    export BINDGEN_EXTRA_CLANG_ARGS="--target=${cross} --sysroot=/usr/${cross} -I/usr/${cross}/include"
    strip=$cross-strip
else
    strip=strip
fi
cargo build --release --target "$target" "$@"
bin=target/$target/release/graft
"$strip" -o "$bin.stripped" "$bin"
mv "$bin.stripped" "$bin"
echo "$bin: $(stat -c %s "$bin") bytes stripped"
