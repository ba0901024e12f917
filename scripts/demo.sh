#!/usr/bin/env bash
# A full local demo with a real key manager, in one command (run as root):
#
#   scripts/demo.sh          the tour: build kmfs, start a local PyKMIP key
#                            manager with a fresh test PKI (mutual TLS on
#                            127.0.0.1), create a volume whose KEK lives on it,
#                            mount it with mount -t fuse.kmfs, write and read a
#                            file, show the ciphertext, rotate the KEK online,
#                            unmount and stop the key manager
#   scripts/demo.sh up       the same, but leave it mounted to explore
#   scripts/demo.sh stop     unmount, stop the key manager, keep the files
#   scripts/demo.sh clean    stop and delete everything
#
# Everything lives in $KMFS_DEMO_DIR (default /tmp/kmfs-demo). Nothing here is
# fit for production: the PKI is throw-away and the key manager is a test server.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
D=${KMFS_DEMO_DIR:-/tmp/kmfs-demo}
PORT=${KMFS_DEMO_PORT:-5696}
KMFS="$ROOT/target/release/kmfs"

stop() {
  if mountpoint -q "$D/plain" 2>/dev/null; then
    umount "$D/plain" || fusermount3 -u "$D/plain" || true
  fi
  if [ -f "$D/pykmip.pid" ]; then
    local pg; pg=$(cat "$D/pykmip.pid")
    # SIGINT stops PyKMIP in about 2 s (SIGTERM takes about 10 s).
    kill -INT -- "-$pg" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 -- "-$pg" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pg" 2>/dev/null || true
    rm -f "$D/pykmip.pid"
  fi
}

MODE=${1:-tour}
case "$MODE" in
  stop) stop; echo "demo stopped (files kept in $D)"; exit 0 ;;
  clean) stop; rm -rf "$D"; echo "demo removed"; exit 0 ;;
  tour|up) ;;
  *) echo "usage: $0 [tour|up|stop|clean]" >&2; exit 2 ;;
esac
# A failed tour must not leave a key manager or a mount behind.
if [ "$MODE" = tour ]; then trap 'rc=$?; [ $rc -ne 0 ] && stop; exit $rc' EXIT; fi
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "run the demo as root (FUSE mount, /run/kmfs)" >&2; exit 1; }
"$ROOT/scripts/install-deps.sh"
cargo build --release --locked
stop
mkdir -p "$D"/{pki,etc,cipher,plain,pykmip/policies}
chmod 700 "$D/etc" "$D/pki"

# 1. A throw-away PKI: EC P-256 everywhere (PyKMIP only offers ECDSA-GCM suites).
cd "$D/pki"
if [ ! -f client.pem ]; then
  cat > ext.cnf <<'EOF'
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
EOF
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=kmfs demo CA" -keyout ca.key -out ca.pem 2>/dev/null
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=kmfs-demo-$who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
      -extfile ext.cnf -extensions "$who" -out "$who.pem" 2>/dev/null
  done
  chmod 600 ./*.key
fi

# 2. The key manager: PyKMIP on 127.0.0.1 with mutual TLS.
cat > "$D/pykmip/server.conf" <<EOF
[server]
hostname=127.0.0.1
port=$PORT
certificate_path=$D/pki/server.pem
key_path=$D/pki/server.key
ca_path=$D/pki/ca.pem
auth_suite=TLS1.2
enable_tls_client_auth=True
database_path=$D/pykmip/keys.db
policy_path=$D/pykmip/policies
logging_level=INFO
EOF
: > "$D/pykmip/server.log"
setsid /usr/bin/python3 /usr/bin/pykmip-server -f "$D/pykmip/server.conf" -l "$D/pykmip/server.log" \
  >/dev/null 2>&1 < /dev/null &
echo $! > "$D/pykmip.pid"
for _ in $(seq 100); do
  grep -q "Starting connection service" "$D/pykmip/server.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "Starting connection service" "$D/pykmip/server.log" || {
  echo "the key manager did not start; see $D/pykmip/server.log" >&2; exit 1; }

# 3. The volume config (mode 0600, root's) and the volume.
cat > "$D/etc/demo.toml" <<EOF
provider = "kmip"
[volume]
name = "demo"
[kmip]
key_name = "demo-kek"
[[kmip.server]]
name = "local-pykmip"
host = "127.0.0.1"
port = $PORT
ca = "$D/pki/ca.pem"
client_cert = "$D/pki/client.pem"
client_key = "$D/pki/client.key"
[log]
syslog = false
file = "$D/demo.log"
audit_file = "$D/audit.csv"
EOF
chmod 600 "$D/etc/demo.toml"
if [ ! -f "$D/cipher/kmfs.volume" ]; then
  "$KMFS" init --create-kek --config "$D/etc/demo.toml" "$D/cipher"
fi
"$KMFS" keyserver check --config "$D/etc/demo.toml"

# 4. Mount it the way fstab does: mount -t fuse.kmfs ... -o config=...
step "install and mount: mount -t fuse.kmfs $D/cipher $D/plain -o config=$D/etc/demo.toml"
DESTDIR= "$ROOT/scripts/install.sh" >/dev/null
mount -t fuse.kmfs "$D/cipher" "$D/plain" -o "config=$D/etc/demo.toml"
grep " $D/plain " /proc/self/mounts

step "write and read a file through the mount"
echo "Hello from kmfs, $(date -u)" > "$D/plain/hello.txt"
mkdir -p "$D/plain/reports"
head -c 100000 /dev/urandom > "$D/plain/reports/q3.bin"
cat "$D/plain/hello.txt"
ls -la "$D/plain" "$D/plain/reports"

step "the backing directory holds only ciphertext (names and contents)"
ls -la "$D/cipher"
if grep -rq "Hello from kmfs" "$D/cipher"; then
  echo "PLAINTEXT FOUND IN THE BACKING DIRECTORY" >&2; exit 1
fi
echo "no plaintext found under $D/cipher (grep -r 'Hello from kmfs' finds nothing)"
xxd "$(find "$D/cipher" -type f -size -200c ! -name 'kmfs.*' | head -n1)" | head -n 3

step "status of the mounted volume"
kmfs status "$D/plain"

step "rotate the key-encryption key online (a new KEK version on the key manager)"
sum_before=$(sha256sum < "$D/plain/reports/q3.bin")
kmfs rotate-kek "$D/plain"
[ "$(sha256sum < "$D/plain/reports/q3.bin")" = "$sum_before" ] && echo "data unchanged after rotation"
kmfs header dump "$D/cipher" | grep -E "KEK|rotation"

step "re-encrypt the data with a new DEK generation, online (kmfs rekey)"
kmfs rekey "$D/plain"
kmfs rekey --status --wait "$D/plain"
[ "$(sha256sum < "$D/plain/reports/q3.bin")" = "$sum_before" ] && echo "data unchanged after the rekey"
kmfs header dump "$D/cipher" | grep -E "generation"

step "audit trail of every key-manager operation ($D/audit.csv)"
tail -n 5 "$D/audit.csv"
kmfs log verify "$D/demo.log"

if [ "$MODE" = up ]; then
  cat <<EOF

kmfs demo is running.
  plaintext view:   $D/plain
  ciphertext:       $D/cipher
  status:           kmfs status $D/plain
  rotate the KEK:   kmfs rotate-kek $D/plain
  re-encrypt data:  kmfs rekey $D/plain; kmfs rekey --status $D/plain
  stop / clean up:  scripts/demo.sh stop | scripts/demo.sh clean
EOF
  exit 0
fi

step "unmount and stop the key manager"
umount "$D/plain"
stop
cat <<EOF

Demo complete. Everything is in $D.
Next steps:
  scripts/demo.sh up        run it again and leave the volume mounted to explore
  scripts/demo.sh clean     remove the demo
  README.md                 configuration reference, fstab and systemd set-up,
                            rotation, header backup and recovery
EOF
