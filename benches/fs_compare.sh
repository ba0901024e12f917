#!/usr/bin/env bash
# End-to-end filesystem benchmark: kmfs next to gocryptfs and a plain FUSE
# passthrough (bindfs) on the same machine, in one run, on the same backing
# filesystem. Reports MB/s and files/s and the ratios kmfs/gocryptfs and
# kmfs/passthrough. Run as root:   benches/fs_compare.sh [SIZE_MB] [FILES]
#
# Workloads (fio, direct=0, one job, page cache dropped between phases):
#   seq-write  SIZE_MB sequential 1 MiB writes + fsync at the end
#   seq-read   the same file read back sequentially (after drop_caches)
#   small      FILES files of 4 KiB created (write+close), then read back
# Benchmarks report; they are not timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-1024}
FILES=${2:-2000}
WORK=${KMFS_BENCH_DIR:-/var/tmp/kmfs-bench}
KMFS=$(pwd)/target/release/kmfs

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
scripts/install-deps.sh
cargo build --release --locked >/dev/null

cleanup() {
  for m in "$WORK"/mnt-*; do
    mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }
  done
  return 0
}
trap cleanup EXIT
cleanup
rm -rf "$WORK"
mkdir -p "$WORK"/{keys,back-kmfs,back-gocryptfs,back-bindfs,mnt-kmfs,mnt-gocryptfs,mnt-bindfs}
chmod 700 "$WORK/keys"

# kmfs with the development key provider (key handling does not affect I/O).
head -c 32 /dev/urandom > "$WORK/keys/k" && chmod 600 "$WORK/keys/k"
"$KMFS" init --keyfile "$WORK/keys/k" "$WORK/back-kmfs" >/dev/null 2>&1
"$KMFS" mount --keyfile "$WORK/keys/k" "$WORK/back-kmfs" "$WORK/mnt-kmfs" 2>/dev/null

# gocryptfs with its defaults (AES-256-GCM, encrypted names).
echo benchpass > "$WORK/keys/pass"
gocryptfs -q -init -passfile "$WORK/keys/pass" "$WORK/back-gocryptfs" >/dev/null
gocryptfs -q -passfile "$WORK/keys/pass" "$WORK/back-gocryptfs" "$WORK/mnt-gocryptfs"

# Plain FUSE passthrough.
bindfs "$WORK/back-bindfs" "$WORK/mnt-bindfs"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

fio_bw() { # dir rw -> MB/s
  local out
  out=$(fio --name=b --directory="$1" --rw="$2" --bs=1M --size="${SIZE_MB}M" \
    --ioengine=psync --end_fsync=1 --filename=big --output-format=terse --terse-version=3 2>/dev/null)
  if [ "$2" = write ]; then echo "$out" | awk -F';' '{printf "%.0f", $48/1024}'
  else echo "$out" | awk -F';' '{printf "%.0f", $7/1024}'; fi
}

small_files() { # dir -> "create/s read/s" (one process, no fork per file)
  /usr/bin/python3 - "$1/small" "$FILES" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
blk = os.urandom(4096)
t0 = time.monotonic()
for i in range(n):
    with open(f"{d}/f{i}", "wb") as f:
        f.write(blk)
os.sync()
t1 = time.monotonic()
with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("3")
t2 = time.monotonic()
for i in range(n):
    with open(f"{d}/f{i}", "rb") as f:
        assert f.read() == blk
t3 = time.monotonic()
print(f"{n/(t1-t0):.0f} {n/(t3-t2):.0f}")
PY
}

declare -A W R C S
for fs in bindfs gocryptfs kmfs; do
  m="$WORK/mnt-$fs"
  W[$fs]=$(fio_bw "$m" write)
  drop
  R[$fs]=$(fio_bw "$m" read)
  rm -f "$m/big"
  read -r C[$fs] S[$fs] < <(small_files "$m")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-"}'; }
echo
echo "== kmfs vs gocryptfs vs FUSE passthrough (bindfs), same machine, same run"
echo "   seq ${SIZE_MB} MiB (1 MiB I/O), ${FILES} x 4 KiB small files; $(nproc) cores"
printf "%-22s %12s %12s %12s %14s %14s\n" workload passthrough gocryptfs kmfs kmfs/gocryptfs kmfs/passthru
printf "%-22s %12s %12s %12s %14s %14s\n" "seq write MB/s" "${W[bindfs]}" "${W[gocryptfs]}" "${W[kmfs]}" "$(ratio "${W[kmfs]}" "${W[gocryptfs]}")" "$(ratio "${W[kmfs]}" "${W[bindfs]}")"
printf "%-22s %12s %12s %12s %14s %14s\n" "seq read MB/s" "${R[bindfs]}" "${R[gocryptfs]}" "${R[kmfs]}" "$(ratio "${R[kmfs]}" "${R[gocryptfs]}")" "$(ratio "${R[kmfs]}" "${R[bindfs]}")"
printf "%-22s %12s %12s %12s %14s %14s\n" "small create files/s" "${C[bindfs]}" "${C[gocryptfs]}" "${C[kmfs]}" "$(ratio "${C[kmfs]}" "${C[gocryptfs]}")" "$(ratio "${C[kmfs]}" "${C[bindfs]}")"
printf "%-22s %12s %12s %12s %14s %14s\n" "small read files/s" "${S[bindfs]}" "${S[gocryptfs]}" "${S[kmfs]}" "$(ratio "${S[kmfs]}" "${S[gocryptfs]}")" "$(ratio "${S[kmfs]}" "${S[bindfs]}")"
