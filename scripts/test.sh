#!/usr/bin/env bash
# The whole test suite, as README.md and .ci/run call it. Needs root (FUSE
# mounts, mlock, SoftHSM tokens) and installs its own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== build"
cargo build --release --locked
echo "== benches compile (run them with: cargo bench)"
cargo build --locked --benches
echo "== tests"
cargo test --locked --lib --bins --tests -- --test-threads=2
