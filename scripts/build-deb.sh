#!/usr/bin/env bash
# Builds the Debian package target/debian/kmfs_<version>-1_<arch>.deb with
# cargo-deb: the release binary, man pages and shell completions generated
# from the command line (kmfs-gen), the systemd units, the example config and
# the logrotate file (assets listed in Cargo.toml [package.metadata.deb]).
# Extra arguments go to cargo deb (e.g. --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release --locked --bins
scripts/stage-deb-assets.sh target/release/kmfs target/release/kmfs-gen
cargo deb --no-build "$@"
