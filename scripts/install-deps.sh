#!/usr/bin/env bash
# Installs what kmfs needs to build and to run its whole test suite on a fresh
# Debian machine. Idempotent: packages already present are skipped quickly.
set -euo pipefail

PKGS=(
  fuse3 libfuse3-dev pkg-config     # FUSE runtime, mount.fuse3, fusermount3
  openssl python3-cryptography      # openssl speed baseline; OpenSSL XTS cross-check
  python3-pykmip                    # real KMIP server for the key-manager tests
  softhsm2 opensc                   # real PKCS#11 token + pkcs11-tool
  gocryptfs bindfs fio              # benchmark baselines
  attr acl rsync                    # xattr/ACL tools used by filesystem tests
  systemd xxd python3               # systemd-analyze verify; demo output; helpers
  libacl1-dev                       # building the POSIX suite pjdfstest
  stress-ng                         # file stressors in tests/it/stress.rs
  man-db                            # `man kmfs` in the package test (tests/it/ops_package.rs)
  iproute2 util-linux nftables      # ip netns, nsenter/unshare, nft: the HA tests (tests/it/ha*.rs)
  samba smbclient samba-testsuite   # smbd, smbclient, smbtorture: tests/it/samba.rs
  nfs-ganesha nfs-ganesha-vfs       # userspace NFS server (VFS FSAL): tests/it/nfs_ganesha.rs
  libnfs-utils                      # nfs-cp, nfs-cat, nfs-ls: userspace NFS client, same test
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install the Rust toolchain (rustup) first" >&2
  exit 1
fi

# The Debian package (scripts/build-deb.sh, tests/it/ops_package.rs) is built
# with cargo-deb.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb"
  cargo install cargo-deb --locked
fi
