#!/usr/bin/env bash
# The whole test suite, as README.md and .ci/run call it. Needs root (FUSE
# mounts, mlock, SoftHSM tokens, tmpfs for disk-full tests) and installs its
# own dependencies. Set KMFS_LONG_TESTS=1 for the long fault/stress variants.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests that need an outside component (PyKMIP, SoftHSM2, ...) fail instead
# of skipping when it is missing.
export KMFS_REQUIRE_ALL=1

scripts/install-deps.sh

echo "== build"
cargo build --release --locked
echo "== benches compile (run them with: cargo bench; benches/fs_bench.sh)"
cargo build --locked --benches

echo "== systemd units (systemd-analyze verify)"
unitdir=$(mktemp -d)
cp systemd/kmfs@.service "$unitdir/kmfs@ci.service"
cp systemd/srv-plain.mount systemd/kmfs-metrics.service systemd/kmfs-metrics.timer "$unitdir/"
install -m 0755 target/release/kmfs /usr/local/bin/kmfs
systemd-analyze verify "$unitdir/kmfs@ci.service" "$unitdir/srv-plain.mount" \
  "$unitdir/kmfs-metrics.service" "$unitdir/kmfs-metrics.timer"
rm -rf "$unitdir"

echo "== tests"
cargo test --locked --lib --bins --tests -- --test-threads=2

echo "== POSIX suite (pjdfstest, expected failures listed with reasons in the script)"
tests/pjdfstest.sh target/release/kmfs

echo "== quick start (scripts/demo.sh, the README's first command)"
demo=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KMFS_DEMO_DIR="$demo/demo" KMFS_DEMO_PORT="$port" scripts/demo.sh
KMFS_DEMO_DIR="$demo/demo" scripts/demo.sh clean
rm -rf "$demo"
echo "all tests passed"
