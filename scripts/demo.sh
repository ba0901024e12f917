#!/usr/bin/env bash
# A full local demo with a real key manager, in one command (run as root):
#
#   scripts/demo.sh          build kmfs, start a local PyKMIP key manager with a
#                            fresh test PKI (mutual TLS on 127.0.0.1), create a
#                            volume whose KEK lives on it, and mount it
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
    kill -TERM -- "-$(cat "$D/pykmip.pid")" 2>/dev/null || true
    rm -f "$D/pykmip.pid"
  fi
}

case "${1:-start}" in
  stop) stop; echo "demo stopped (files kept in $D)"; exit 0 ;;
  clean) stop; rm -rf "$D"; echo "demo removed"; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop|clean]" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || { echo "run the demo as root (FUSE mount, /run/kmfs)" >&2; exit 1; }
scripts/install-deps.sh
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
install -m 0755 "$KMFS" /usr/local/bin/kmfs
mount -t fuse.kmfs "$D/cipher" "$D/plain" -o "config=$D/etc/demo.toml"
echo "Hello from kmfs" > "$D/plain/hello.txt"
mkdir -p "$D/plain/reports"
cat <<EOF

kmfs demo is running.
  plaintext view:   $D/plain      (try: ls -la $D/plain; cat $D/plain/hello.txt)
  ciphertext:       $D/cipher     (try: ls -la $D/cipher)
  status:           kmfs status $D/plain
  rotate the KEK:   kmfs rotate-kek $D/plain
  audit trail:      $D/audit.csv
  verify the log:   kmfs log verify $D/demo.log
  stop / clean up:  scripts/demo.sh stop | scripts/demo.sh clean
EOF
