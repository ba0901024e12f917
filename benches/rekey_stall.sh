#!/usr/bin/env bash
# How long a file's readers wait while a rekey re-encrypts that file (root).
#
#   sudo benches/rekey_stall.sh                     # target/release/kmfs
#   sudo KMFS_BASE=/path/to/older/kmfs benches/rekey_stall.sh   # both, interleaved
#
# For each binary, ROUNDS times: a SIZE_MB file is written through a fresh
# mount (tmpfs backing by default), `kmfs rekey --cpu 100` starts, and for
# READ_SECS seconds a reader does a cold 4 KiB pread (page cache dropped for
# the file) at a random MiB offset every 20 ms, from just before the rekey
# starts. Prints the median, p99 and worst latency, and how long the rekey
# took (READ_SECS should cover it). Benchmarks report; they are
# not timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
SIZE_MB=${SIZE_MB:-2048}
READ_SECS=${READ_SECS:-6}
ROUNDS=${ROUNDS:-2}
WORK=${WORK:-/run/kmfs-rekey-stall}
if [ -z "${KMFS:-}" ]; then
  cargo build --release --locked >/dev/null 2>&1
  KMFS=${CARGO_TARGET_DIR:-$PWD/target}/release/kmfs
fi
BINS=("$KMFS")
[ -n "${KMFS_BASE:-}" ] && BINS=("$KMFS_BASE" "$KMFS")

mkdir -p "$WORK"
mountpoint -q "$WORK" || mount -t tmpfs -o size=$((SIZE_MB * 2 + 512))m kmfs-stall "$WORK"
cleanup() {
  mountpoint -q "$WORK/mnt" 2>/dev/null && fusermount3 -u "$WORK/mnt"
  sleep 0.5
  umount "$WORK" 2>/dev/null || true
}
trap cleanup EXIT

one() { # binary
  local k=$1 t0 t1
  rm -rf "$WORK/back" "$WORK/mnt"; mkdir -p "$WORK/back" "$WORK/mnt"
  mkdir -p -m 700 "$WORK/keys"
  head -c 32 /dev/urandom >"$WORK/keys/k"; chmod 600 "$WORK/keys/k"
  "$k" init --keyfile "$WORK/keys/k" "$WORK/back" >/dev/null 2>&1
  "$k" mount --keyfile "$WORK/keys/k" "$WORK/back" "$WORK/mnt" 2>/dev/null
  dd if=/dev/urandom of="$WORK/mnt/big" bs=1M count="$SIZE_MB" conv=fsync status=none
  python3 - "$WORK/mnt/big" "$SIZE_MB" "$READ_SECS" >"$WORK/reads" <<'PY' &
import os, random, sys, time
path, size_mb, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lat, end = [], time.time() + secs
while time.time() < end:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    off = random.randrange(size_mb) << 20
    t = time.perf_counter(); os.pread(fd, 4096, off); lat.append(time.perf_counter() - t)
    os.close(fd)
    time.sleep(0.02)
lat.sort()
ms = lambda x: f"{x * 1000:.1f}"
print(f"reads {len(lat)}, latency median {ms(lat[len(lat) // 2])} ms, "
      f"p99 {ms(lat[int(len(lat) * 0.99)])} ms, worst {ms(lat[-1])} ms")
PY
  local reader=$!
  sleep 0.2
  t0=$(date +%s.%N)
  "$k" rekey --cpu 100 "$WORK/mnt" >/dev/null
  "$k" rekey --status --wait "$WORK/mnt" >/dev/null 2>&1
  t1=$(date +%s.%N)
  wait "$reader"
  echo "  $(cat "$WORK/reads"); rekey $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s"
  fusermount3 -u "$WORK/mnt"
  sleep 0.5
}

echo "rekey_stall: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${SIZE_MB} MiB file on tmpfs, rekey --cpu 100"
for r in $(seq 1 "$ROUNDS"); do
  for k in "${BINS[@]}"; do
    echo "round $r, $k"
    one "$k"
  done
done
