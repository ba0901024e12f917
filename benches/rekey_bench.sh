#!/usr/bin/env bash
# Rekey benchmark (issue 10): how fast `kmfs rekey` re-encrypts a mounted
# volume, and how much it slows foreground I/O at the default throttle.
#
#   sudo benches/rekey_bench.sh               # tmpfs and disk, < 5 min on 2 cores
#   BACKINGS=tmpfs SMALL=2000 BIG_MB=256 sudo -E benches/rekey_bench.sh
#
# Data set (deterministic): SMALL files of 1–64 KiB in 40 directories, plus
# BIG_FILES files of BIG_MB MiB each.
# 1. Rekey at full speed (`--cpu 100`): wall time from the request to phase
#    "done"  →  MB/s and files/s. Baseline in the same run: `cat` of every
#    file through the mount (decrypt + FUSE read) and the copy time of the
#    backing tree (`cp -a`, what a copy-beside scheme would at least cost).
# 2. Foreground slowdown at the default throttle (`kmfs rekey`, --cpu 50):
#    a dd write of FG_MB MiB (+fsync) and a cold dd read of the same size,
#    first with no rekey, then while a rekey runs (the data set is
#    re-encrypted again, to the next generation); ROUNDS rounds, medians →
#    ratios.
# Benchmarks report; they are not timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BACKINGS=${BACKINGS:-tmpfs disk}
SMALL=${SMALL:-3000}
BIG_FILES=${BIG_FILES:-4}
BIG_MB=${BIG_MB:-256}
FG_MB=${FG_MB:-512}
ROUNDS=${ROUNDS:-3}
DISK_DIR=${DISK_DIR:-/var/tmp/kmfs-rekey-bench}
TMPFS_DIR=${TMPFS_DIR:-/run/kmfs-rekey-bench}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
if [ -z "${KMFS:-}" ]; then
  cargo build --release --locked >/dev/null 2>&1
  KMFS=${CARGO_TARGET_DIR:-$ROOT/target}/release/kmfs
fi
KMFS=$(readlink -f "$KMFS")

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
phase() { "$KMFS" rekey --status --json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["phase"])'; }
wait_done() {
  while [ "$(phase "$1")" != done ]; do sleep 0.2; done
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mbps() { python3 -c "print(f'{$1 / 1e6 / max($2, 1e-9):.0f}')"; }
ratio() { python3 -c "print(f'{$1 / max($2, 1e-9):.2f}')"; }
# MB/s of a dd write (+fsync) / cold read of FG_MB MiB.
dd_write() {
  local t0 t1; t0=$(now)
  dd if=/dev/zero of="$1" bs=1M count="$FG_MB" conv=fsync status=none
  t1=$(now); mbps $((FG_MB << 20)) "$(secs "$t0" "$t1")"
}
dd_read() {
  local t0 t1; drop; t0=$(now)
  dd if="$1" of=/dev/null bs=1M status=none
  t1=$(now); mbps $((FG_MB << 20)) "$(secs "$t0" "$t1")"
}

cleanup() {
  for m in "$DISK_DIR"/*/mnt "$TMPFS_DIR"/*/mnt; do
    mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }
  done
  mountpoint -q "$TMPFS_DIR" && umount -l "$TMPFS_DIR"
  true
}
trap cleanup EXIT

printf '# kmfs rekey benchmark, %s, %s, %s cores\n' "$(date -u +%F)" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$(nproc)"
printf '# data set: %s files of 1-64 KiB + %s x %s MiB\n\n' "$SMALL" "$BIG_FILES" "$BIG_MB"

for backing in $BACKINGS; do
  if [ "$backing" = tmpfs ]; then
    mkdir -p "$TMPFS_DIR"
    mountpoint -q "$TMPFS_DIR" || mount -t tmpfs -o size=80% tmpfs "$TMPFS_DIR"
    base=$TMPFS_DIR/run
  else
    base=$DISK_DIR/run
  fi
  rm -rf "$base"; mkdir -p "$base/keys" "$base/back" "$base/mnt"
  chmod 700 "$base/keys"; head -c 32 /dev/urandom > "$base/keys/k"; chmod 600 "$base/keys/k"
  "$KMFS" init --keyfile "$base/keys/k" "$base/back" >/dev/null 2>&1
  "$KMFS" mount --keyfile "$base/keys/k" "$base/back" "$base/mnt" 2>/dev/null
  m=$base/mnt
  python3 - "$m" "$SMALL" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
r = random.Random(10)
for i in range(n):
    d = os.path.join(root, f"d{i % 40}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(r.randbytes(r.randint(1024, 65536)))
EOF
  for i in $(seq 1 "$BIG_FILES"); do
    dd if=/dev/urandom of="$m/big$i" bs=1M count="$BIG_MB" status=none
  done
  sync
  bytes=$(du -sb --apparent-size "$m" | cut -f1)
  files=$((SMALL + BIG_FILES))

  # Baselines: read everything through the mount; copy the backing tree.
  drop; t0=$(now); find "$m" -type f -print0 | xargs -0 cat > /dev/null; t1=$(now)
  cat_s=$(secs "$t0" "$t1")
  drop; t0=$(now); cp -a "$base/back" "$base/copy"; sync; t1=$(now); rm -rf "$base/copy"
  cp_s=$(secs "$t0" "$t1")

  # 1. Full-speed rekey.
  drop; t0=$(now)
  "$KMFS" rekey --cpu 100 "$m" >/dev/null
  wait_done "$m"; t1=$(now)
  rk_s=$(secs "$t0" "$t1")

  # 2. Foreground I/O alone, then during a default-throttle rekey, ROUNDS
  # times (a fresh rekey each round), medians.
  W0=(); R0=(); W1=(); R1=(); still=()
  for _ in $(seq 1 "$ROUNDS"); do
    W0+=("$(dd_write "$m/fg")"); R0+=("$(dd_read "$m/fg")"); rm -f "$m/fg"
    "$KMFS" rekey "$m" >/dev/null
    sleep 0.5
    W1+=("$(dd_write "$m/fg")"); R1+=("$(dd_read "$m/fg")"); rm -f "$m/fg"
    still+=("$(phase "$m")")
    wait_done "$m"
  done
  w0=$(median "${W0[@]}"); r0=$(median "${R0[@]}"); w1=$(median "${W1[@]}"); r1=$(median "${R1[@]}")

  echo "## backing: $backing ($((bytes / 1000000)) MB in $files files)"
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| rekey at --cpu 100 | ${rk_s} s = $(mbps "$bytes" "$rk_s") MB/s, $(python3 -c "print(f'{$files / $rk_s:.0f}')") files/s |"
  echo "| baseline: cat every file through the mount | ${cat_s} s = $(mbps "$bytes" "$cat_s") MB/s (rekey / cat time: $(ratio "$rk_s" "$cat_s")) |"
  echo "| baseline: cp -a of the backing tree + sync | ${cp_s} s (rekey / cp time: $(ratio "$rk_s" "$cp_s")) |"
  echo "| dd write ${FG_MB} MiB + fsync, MB/s: no rekey / during default rekey | ${w0} / ${w1} (ratio $(ratio "$w1" "$w0")) |"
  echo "| dd read ${FG_MB} MiB cold, MB/s: no rekey / during default rekey | ${r0} / ${r1} (ratio $(ratio "$r1" "$r0")) |"
  echo "| rekey phase when each foreground round ended | ${still[*]} |"
  echo
  fusermount3 -u "$m"
  rm -rf "$base"
done
