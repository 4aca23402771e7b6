#!/usr/bin/env bash
# Builds a Debian package of graft from a binary, with dpkg-deb (Debian's own tool, always
# installed on Debian and Raspberry Pi OS):
#   bash boards/deb/build.sh BINARY ARCH [VERSION] [OUTDIR]
#   bash boards/deb/build.sh target/aarch64-unknown-linux-gnu/release/graft arm64
# ARCH is Debian's name: arm64 (aarch64 Pi), armhf (32-bit Pi OS), amd64. VERSION defaults to
# the workspace's. The package installs /usr/bin/graft, the systemd unit, the udev rule, the
# `graft` system user and /var/lib/graft; upgrades and removal never touch /var/lib/graft.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
boards="$(dirname "$here")"
root="$(dirname "$boards")"
bin=${1:?usage: build.sh BINARY ARCH [VERSION] [OUTDIR]}
arch=${2:?usage: build.sh BINARY ARCH [VERSION] [OUTDIR]}
version=${3:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)}
out=${4:-$root/target/deb}
case "$arch" in arm64|armhf|amd64) ;; *) echo "build.sh: ARCH must be arm64, armhf or amd64" >&2; exit 1;; esac
[ -x "$bin" ] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/graft"
install -D -m 0755 "$bin" "$pkg/usr/bin/graft"
# The unit and rule of boards/, with the packaged paths.
install -d "$pkg/lib/systemd/system" "$pkg/lib/udev/rules.d" "$pkg/usr/share/doc/graft" "$pkg/etc/default"
sed -e 's#/usr/local/bin/graft#/usr/bin/graft#g' -e 's#/usr/local/share/doc#/usr/share/doc#g' \
    "$boards/systemd/graft.service" > "$pkg/lib/systemd/system/graft.service"
install -m 0644 "$boards/udev/99-graft-serial.rules" "$pkg/lib/udev/rules.d/99-graft-serial.rules"
install -m 0644 "$root/docs/PROTOCOL.md" "$pkg/usr/share/doc/graft/PROTOCOL.md"
install -m 0644 "$root/README.md" "$pkg/usr/share/doc/graft/README.md"
printf '# Settings of graft.service (kept across upgrades).\n# GRAFT_SERIAL=/dev/serial0\n# GRAFT_ARGS=--camera 0 --baud 115200\n' \
    > "$pkg/etc/default/graft"
chmod 0644 "$pkg/etc/default/graft"

install -d "$pkg/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: graft
Version: $version
Architecture: $arch
Maintainer: graft developers <graft@localhost>
Installed-Size: $size
Depends: adduser, libc6
Section: science
Priority: optional
Description: few-shot image classifiers on the edge
 graft runs a frozen, int8-quantized ONNX backbone and trains small classifiers on
 the device from a handful of camera-captured examples; a kiosk service answers a
 line protocol over a serial port or TCP.
CONTROL
echo /etc/default/graft > "$pkg/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$pkg/DEBIAN/"

mkdir -p "$out"
deb="$out/graft_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
echo "$deb"
