#!/usr/bin/env bash
# The whole test suite, as README.md and .ci/run call it. Needs root (FUSE
# mounts, mlock, SoftHSM tokens) and installs its own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== build"
cargo build --release --locked
echo "== tests"
cargo test --locked --all-targets -- --test-threads=2
