#!/usr/bin/env bash
# Installs graft as a kiosk service on a Raspberry Pi (or any systemd Linux), as root:
#   sudo bash boards/install.sh path/to/graft        # a binary built on the Pi or by boards/build.sh
# Creates the `graft` system user (groups video, dialout), /var/lib/graft, the udev rule and the
# service; edit /etc/udev/rules.d/99-graft-serial.rules for your adapter (or set GRAFT_SERIAL in
# /etc/default/graft, e.g. /dev/serial0, and remove BindsTo/After from the unit).
set -euo pipefail
cd "$(dirname "$0")"
bin=${1:?usage: install.sh PATH/TO/graft}
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
install -m 0755 "$bin" /usr/local/bin/graft
id graft >/dev/null 2>&1 || useradd --system --home-dir /var/lib/graft --shell /usr/sbin/nologin graft
usermod -aG video,dialout graft
install -d -o graft -g graft -m 0750 /var/lib/graft
install -m 0644 udev/99-graft-serial.rules /etc/udev/rules.d/99-graft-serial.rules
install -d /usr/local/share/doc/graft
install -m 0644 ../docs/PROTOCOL.md /usr/local/share/doc/graft/PROTOCOL.md
[ -f /etc/default/graft ] || printf '# GRAFT_SERIAL=/dev/serial0\n# GRAFT_ARGS=--camera 0 --baud 115200\n' > /etc/default/graft
install -m 0644 systemd/graft.service /etc/systemd/system/graft.service
udevadm control --reload-rules && udevadm trigger --subsystem-match=tty
systemctl daemon-reload
systemctl enable graft.service
sudo -u graft /usr/local/bin/graft doctor --data /var/lib/graft || true
echo "installed: plug in the adapter (or edit /etc/default/graft), then: systemctl start graft; journalctl -u graft -f"
