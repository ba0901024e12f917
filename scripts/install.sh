#!/usr/bin/env bash
# Installs kmfs on this machine (idempotent; run as root):
#   /usr/local/bin/kmfs                       the binary (mount.fuse3 finds it for
#                                             mount -t fuse.kmfs and fstab lines)
#   /etc/systemd/system/kmfs@.service         unit template (instance = volume)
#   /etc/kmfs/                                0700; kmfs.toml.example (0600)
#   /etc/logrotate.d/kmfs                     log and audit-trail rotation
#   /var/log/kmfs/                            0750, for logs and the audit trail
#   /usr/local/share/doc/kmfs/                README, docs, example .mount unit
# DESTDIR=/some/root installs under that root instead (packaging, tests).
# Existing configs in /etc/kmfs are never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DESTDIR:-}

if [ -z "$D" ] && [ "$(id -u)" -ne 0 ]; then
  echo "run as root (or set DESTDIR)" >&2
  exit 1
fi
if [ ! -x target/release/kmfs ] || [ -n "$(find src Cargo.toml -newer target/release/kmfs -print -quit)" ]; then
  cargo build --release --locked
fi

install -d -m 0755 "$D/usr/local/bin" "$D/etc/systemd/system" "$D/etc/logrotate.d" \
  "$D/usr/local/share/doc/kmfs"
install -d -m 0700 "$D/etc/kmfs"
install -d -m 0750 "$D/var/log/kmfs"
install -m 0755 target/release/kmfs "$D/usr/local/bin/kmfs"
install -m 0644 systemd/kmfs@.service "$D/etc/systemd/system/kmfs@.service"
install -m 0644 config/logrotate.d/kmfs "$D/etc/logrotate.d/kmfs"
install -m 0600 config/kmfs.toml "$D/etc/kmfs/kmfs.toml.example"
install -m 0644 README.md docs/FORMAT.md docs/ARCHITECTURE.md systemd/srv-plain.mount \
  "$D/usr/local/share/doc/kmfs/"

if [ -z "$D" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "installed kmfs $("$D/usr/local/bin/kmfs" --version | awk '{print $2}') under ${D:-/}"
echo "next: write /etc/kmfs/<volume>.toml (see /etc/kmfs/kmfs.toml.example), kmfs init, then"
echo "      an fstab line:  /srv/cipher /srv/plain fuse.kmfs config=/etc/kmfs/<volume>.toml,_netdev 0 0"
echo "      or:             systemctl enable --now kmfs@<volume>.service"
