#!/usr/bin/env bash
# Millions of files (issue 21): kmfs next to gocryptfs and libfuse's C
# passthrough_ll, in one run, on a tmpfs backing directory.
#
#   sudo benches/many_files.sh               # 1,000,000 files (~15 min on 2 cores)
#   FILES=200000 FSES="passthrough_ll kmfs" sudo -E benches/many_files.sh
#
# For each filesystem: FILES empty files are created through the mount, in
# (FILES - BIG) / 1000 directories of 1,000 plus one directory of BIG
# entries (2 creating processes); then, each with the page, dentry and inode
# caches dropped first:
#   create          the whole tree                                   (s)
#   find -stat      `find -printf` of size and inode: a lookup and a stat
#                   of every file                                    (s)
#   ls -l big       `ls -l` of the BIG-entry directory               (s)
#   rm -rf          the whole tree                                   (s)
# and the daemon's resident memory: VmRSS after the mount, after the create
# (every inode cached by the kernel), after the cold find, and from those
# the bytes per cached inode ((after find - after mount) / files), plus the
# daemon's open descriptors after the find.
#
# Environment: FILES=1000000 BIG=100000 FSES="passthrough_ll gocryptfs kmfs"
#   KMFS, KMFS_OPTS, TMPFS_DIR, DISK_DIR, PASSTHROUGH_LL_SRC as fs_bench.sh.
# Benchmarks report; they are not timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
FILES=${FILES:-1000000}
BIG=${BIG:-100000}
FSES=${FSES:-passthrough_ll gocryptfs kmfs}
DISK_DIR=${DISK_DIR:-/var/tmp/kmfs-bench}
TMPFS_DIR=${TMPFS_DIR:-/run/kmfs-bench-tmpfs}

. benches/common.sh

# make_tree DIR: the tree, made by two processes (one per core).
make_tree() {
  python3 - "$1" "$FILES" "$BIG" <<'PY'
import os, sys
from multiprocessing import Process
root, files, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dirs = (files - big) // 1000
def work(part):
    for d in range(part, dirs + 1, 2):
        p = os.path.join(root, "big" if d == dirs else f"d{d:04d}")
        os.mkdir(p)
        for f in range(big if d == dirs else 1000):
            try:
                os.close(os.open(os.path.join(p, f"f{f:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
            except OSError as e:
                sys.exit(f"{p}/f{f:06d}: {e}")
ps = [Process(target=work, args=(i,)) for i in range(2)]
for p in ps: p.start()
for p in ps:
    p.join()
    if p.exitcode: sys.exit(f"create failed ({p.exitcode})")
PY
}

declare -A V
echo "kmfs many_files: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, kernel $(uname -r)"
echo "$FILES empty files: $(( (FILES - BIG) / 1000 )) directories of 1000 and one of $BIG; tmpfs backing"
start=$(now)
base=$TMPFS_DIR; mkdir -p "$base"; mount -t tmpfs -o size=8g,nr_inodes=0 kmfs-bench "$base"
mkdir -p "$base/keys"; chmod 700 "$base/keys"
head -c 32 /dev/urandom >"$base/keys/k"; chmod 600 "$base/keys/k"
echo benchpass >"$base/keys/pass"
for fs in $FSES; do
  d=$(mount_fs "$fs" "$base")
  p=$(daemon_pid "$base/mnt-$fs")
  drop; V[$fs,rss0]=$(rss_kib "$base/mnt-$fs")
  t0=$(now)
  if ! make_tree "$d"; then
    # passthrough_ll holds a descriptor per inode: it fails at the limit.
    echo "  [$fs] create failed after $(find "$d" -type f 2>/dev/null | wc -l) files (descriptor limit $(ulimit -n))" >&2
    for k in create find ls rm rss1 rss2 per fds; do V[$fs,$k]=fail; done
    fusermount3 -u "$base/mnt-$fs" || umount -l "$base/mnt-$fs"
    rm -rf "${base:?}/back-$fs"
    continue
  fi
  sync; t1=$(now); V[$fs,create]=$(secs "$t0" "$t1")
  V[$fs,rss1]=$(rss_kib "$base/mnt-$fs")
  drop; t0=$(now); find "$d" -printf '%s %i\n' >/dev/null; t1=$(now); V[$fs,find]=$(secs "$t0" "$t1")
  V[$fs,rss2]=$(rss_kib "$base/mnt-$fs")
  V[$fs,fds]=$(ls "/proc/$p/fd" | wc -l)
  drop; t0=$(now); ls -l "$d/big" >/dev/null; t1=$(now); V[$fs,ls]=$(secs "$t0" "$t1")
  drop; t0=$(now); rm -rf "${d:?}"/*; sync; t1=$(now); V[$fs,rm]=$(secs "$t0" "$t1")
  V[$fs,per]=$(awk -v a="${V[$fs,rss0]}" -v b="${V[$fs,rss2]}" -v n="$FILES" 'BEGIN{printf "%.0f", (b-a)*1024/n}')
  echo "  [$fs] create ${V[$fs,create]} find ${V[$fs,find]} ls ${V[$fs,ls]} rm ${V[$fs,rm]} rss KiB ${V[$fs,rss0]}/${V[$fs,rss1]}/${V[$fs,rss2]} fds ${V[$fs,fds]}" >&2
  fusermount3 -u "$base/mnt-$fs"
  while [ -n "$p" ] && kill -0 "$p" 2>/dev/null; do sleep 0.1; done
  rm -rf "${base:?}/back-$fs"
done
umount "$base"

has() { [[ " $FSES " == *" $1 "* ]]; }
echo
echo "Ratios are kmfs relative to the peer, >1 = kmfs better (peer time / kmfs time, peer bytes / kmfs bytes)."
hdr=$(printf "%-30s" workload)
for fs in $FSES; do hdr+=$(printf " %14s" "$fs"); done
has kmfs && has gocryptfs && hdr+=$(printf " %9s" "x gocrypt")
has kmfs && has passthrough_ll && hdr+=$(printf " %9s" "x pass_ll")
echo "$hdr"
for m in "create:create s" "find:find -stat, cold s" "ls:ls -l of $BIG entries, cold s" "rm:rm -rf s" \
         "rss1:VmRSS after create KiB" "rss2:VmRSS after find KiB" "per:bytes per cached inode" \
         "fds:open descriptors after find"; do
  IFS=: read -r key label <<<"$m"
  line=$(printf "%-30s" "$label")
  for fs in $FSES; do line+=$(printf " %14s" "${V[$fs,$key]}"); done
  has kmfs && has gocryptfs && line+=$(printf " %9s" "$(ratio "${V[kmfs,$key]}" "${V[gocryptfs,$key]}" 0)")
  has kmfs && has passthrough_ll && line+=$(printf " %9s" "$(ratio "${V[kmfs,$key]}" "${V[passthrough_ll,$key]}" 0)")
  echo "$line"
done
echo "total bench time: $(secs "$start" "$(now)") s"
