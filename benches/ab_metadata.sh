#!/usr/bin/env bash
# A/B of two kmfs binaries on the metadata path, interleaved in one run:
# cold `ls -lR`, cold cat of every file and cold `rm -rf` (then a fresh untar)
# of fs_bench.sh's 12,600-file tree,
# both volumes on one tmpfs, alternating A and B for ROUNDS rounds.
#
#   sudo benches/ab_metadata.sh OLD_KMFS NEW_KMFS [ROUNDS=6]
#
# Needs the tree tar fs_bench.sh builds (run fs_bench.sh once first).
set -euo pipefail
A=$(readlink -f "$1"); B=$(readlink -f "$2"); ROUNDS=${3:-6}
TAR=${DISK_DIR:-/var/tmp/kmfs-bench}/cache/tree-v1.tar
[ -f "$TAR" ] || { echo "no $TAR: run benches/fs_bench.sh once first" >&2; exit 1; }
W=$(mktemp -d /run/kmfs-ab.XXXX)
mount -t tmpfs -o size=2g kmfs-ab "$W"
cleanup() {
  for x in A B; do fusermount3 -u "$W/m$x" 2>/dev/null || true; done
  # The daemons close their backing descriptors just after the unmount.
  for _ in $(seq 25); do umount "$W" 2>/dev/null && break; sleep 0.2; done
  mountpoint -q "$W" && umount -l "$W"; rmdir "$W"
}
trap cleanup EXIT
mkdir -m 700 "$W/keys"; head -c 32 /dev/urandom >"$W/keys/k"; chmod 600 "$W/keys/k"
for x in A B; do
  k=$([ "$x" = A ] && echo "$A" || echo "$B"); mkdir "$W/b$x" "$W/m$x"
  "$k" init --keyfile "$W/keys/k" "$W/b$x" >/dev/null 2>&1
  "$k" mount --keyfile "$W/keys/k" "$W/b$x" "$W/m$x" 2>/dev/null
  tar -xf "$TAR" -C "$W/m$x"
done
sync
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); awk -v a="$s" -v b="$e" 'BEGIN{printf "%.3f", b-a}'; }
declare -A LS CAT RM
for r in $(seq "$ROUNDS"); do
  for x in A B; do
    echo 3 >/proc/sys/vm/drop_caches; LS[$x]+="$(t ls -lR "$W/m$x/t") "
    echo 3 >/proc/sys/vm/drop_caches
    CAT[$x]+="$(t sh -c "find '$W/m$x/t' -type f -print0 | xargs -0 cat") "
    echo 3 >/proc/sys/vm/drop_caches; RM[$x]+="$(t rm -rf "$W/m$x/t") "
    tar -xf "$TAR" -C "$W/m$x"; sync
  done
done
med() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo "A=$A"; echo "B=$B"; echo "cold, $ROUNDS rounds interleaved; seconds: median (all)"
for x in A B; do
  echo "$x ls -lR $(echo "${LS[$x]}" | med) (${LS[$x]% })   cat $(echo "${CAT[$x]}" | med) (${CAT[$x]% })   rm -rf $(echo "${RM[$x]}" | med) (${RM[$x]% })"
done
