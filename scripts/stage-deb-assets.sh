#!/usr/bin/env bash
# Stages what the Debian package ships from outside the source tree in
# target/assets: the kmfs binary ($1), the man pages and completions that
# kmfs-gen ($2) writes, and the systemd unit with the package's binary path.
set -euo pipefail
cd "$(dirname "$0")/.."
kmfs=${1:?kmfs binary}
gen=${2:?kmfs-gen binary}
rm -rf target/assets
mkdir -p target/assets
install -m 0755 "$kmfs" target/assets/kmfs
"$gen" target/assets >/dev/null
sed -e 's#/usr/local/bin/kmfs#/usr/bin/kmfs#g' \
    -e 's#file:/usr/local/share/doc/kmfs/README.md#man:kmfs(8) man:kmfs.toml(5)#' \
    systemd/kmfs@.service > target/assets/kmfs@.service
