#!/usr/bin/env bash
# CI (as root): the amd64 package installed, used from its installed paths, upgraded over
# itself, removed and purged; /var/lib/graft (a head trained there, the kiosk secret) must
# survive each step and predict the same. Uses the test build's binary unless given one:
#   bash boards/deb/check.sh [BINARY]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$(dirname "$here")")"
bin=${1:-$root/target/debug/graft}
photos=${GRAFT_TEST_DATA:-$root/target/graft-data/kiosk}
[ "$(id -u)" = 0 ] || { echo "check.sh: run as root (it installs a package)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
old=$(bash "$here/build.sh" "$bin" amd64 0.0.1~ci1 "$out")
new=$(bash "$here/build.sh" "$bin" amd64 0.0.1~ci2 "$out")
as_graft() { runuser -u graft -- "$@"; }

apt-get install -y -qq "$old" >/dev/null
getent passwd graft >/dev/null
[ "$(stat -c %U:%a /var/lib/graft)" = graft:750 ]
as_graft /usr/bin/graft doctor --data /var/lib/graft
# A head trained and used from the installed paths, and a kiosk secret, as a kiosk has.
install -d -o graft -g graft /var/lib/graft/photos/birds /var/lib/graft/photos/fruit
for c in birds fruit; do
    ls "$photos/$c"/*_0.jpg | head -4 | xargs -I{} install -o graft -g graft -m 0644 {} /var/lib/graft/photos/$c/
done
as_graft /usr/bin/graft train --head centroid --out /var/lib/graft/demo.graft /var/lib/graft/photos
probe=$(ls /var/lib/graft/photos/fruit/*.jpg | head -1)
as_graft /usr/bin/graft predict --json --head /var/lib/graft/demo.graft "$probe" > "$out/before.json"
printf '%064d\n' 7 > /var/lib/graft/secret && chown graft:graft /var/lib/graft/secret && chmod 0600 /var/lib/graft/secret
echo "# GRAFT_ARGS=--camera 1   (edited by the owner)" >> /etc/default/graft
sums() { sha256sum /var/lib/graft/demo.graft /var/lib/graft/secret; }
sums > "$out/sums"

apt-get install -y -qq "$new" >/dev/null   # the upgrade
[ "$(dpkg-query -W -f='${Version}' graft)" = 0.0.1~ci2 ]
sums | cmp - "$out/sums"
grep -q "edited by the owner" /etc/default/graft
as_graft /usr/bin/graft doctor --data /var/lib/graft | grep -q "kiosk secret"
as_graft /usr/bin/graft predict --json --head /var/lib/graft/demo.graft "$probe" | cmp - "$out/before.json"

apt-get remove -y -qq graft >/dev/null
[ ! -e /usr/bin/graft ]
sums | cmp - "$out/sums"
apt-get purge -y -qq graft >/dev/null 2>&1
sums | cmp - "$out/sums"
echo "deb check: installed, used, upgraded, removed and purged; /var/lib/graft kept ($(du -sh /var/lib/graft | cut -f1))"
