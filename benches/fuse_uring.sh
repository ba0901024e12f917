#!/usr/bin/env bash
# FUSE transport comparison (issue 18, target 2): the same passthrough
# request handler served over the classic /dev/fuse read/writev transport
# and over FUSE-over-io_uring (benches/fuse_uring_proto), with libfuse's C
# passthrough_ll as a sanity baseline, in one interleaved run on a tmpfs
# backing directory.
#
#   sudo benches/fuse_uring.sh
#   RUNS=5 RAND_SECS=5 sudo -E benches/fuse_uring.sh
#
# Workloads (a fresh mount for each, page cache dropped first; medians):
#   ls -lR   of the 12,600-file tree fs_bench.sh makes (untarred straight
#            into the backing directory, not through FUSE)            (s)
#   rm -rf   of the same tree, then sync                              (s)
#   rand 1j  fio psync 4 KiB randrw 50/50, O_DIRECT, 1 job, 256 MiB   (IOPS)
#   rand 4j  the same with 4 jobs on the same file                    (IOPS)
# For the prototype it also prints, per workload, FUSE requests, the
# transport's own system calls per request, the daemon's context switches
# and CPU time per request, and the CPU time of daemon + application (ls,
# rm, fio: /usr/bin/time) per request (medians), from the counters the
# prototype prints on exit. CPU per request is the figure least disturbed by
# other load on the machine; wall times on a shared 2-core box are noisy.
#
# Environment: RUNS=3 RAND_SECS=3 CLASSIC_THREADS=$(nproc) DEPTH=8
#   FSES="passthrough_ll classic uring"  DISK_DIR TMPFS_DIR
#   TREE_TAR=/var/tmp/kmfs-bench/cache/tree-v1.tar (made by fs_bench.sh)
# The script sets /sys/module/fuse/parameters/enable_uring to Y for the run
# and restores it. Benchmarks report; they are not timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${RUNS:-3}
RAND_SECS=${RAND_SECS:-3}
DEPTH=${DEPTH:-8}
CLASSIC_THREADS=${CLASSIC_THREADS:-$(nproc)}
FSES=${FSES:-passthrough_ll classic uring}
# Own work directories, so common.sh's clean-up never touches another
# bench's mounts; the tree comes from fs_bench.sh's cache.
DISK_DIR=${DISK_DIR:-/var/tmp/kmfs-uring-bench}
TMPFS_DIR=${TMPFS_DIR:-/run/kmfs-uring-bench}
TAR=${TREE_TAR:-/var/tmp/kmfs-bench/cache/tree-v1.tar}
KMFS=${KMFS:-/bin/true} # common.sh's kmfs binary: not used here

. benches/common.sh

[ -f "$TAR" ] || {
  echo "missing $TAR: run 'RUNS=1 BACKINGS=tmpfs FSES=native benches/fs_bench.sh' once" >&2
  exit 1
}

cargo build --release --locked --example fuse_uring_proto >/dev/null 2>&1
PROTO=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/fuse_uring_proto

PARAM=/sys/module/fuse/parameters/enable_uring
[ -w "$PARAM" ] || { echo "this kernel has no FUSE io_uring transport ($PARAM)" >&2; exit 1; }
OLD_PARAM=$(cat "$PARAM")
echo Y >"$PARAM"
cleanup() { umount_all; echo "$OLD_PARAM" >"$PARAM"; }
trap cleanup EXIT

mkdir -p "$TMPFS_DIR"
mount -t tmpfs -o size=3G tmpfs "$TMPFS_DIR"
LOG=$TMPFS_DIR/stats.log
: >"$LOG"

PID= M=
start() { # fs: mounts it on $M (not in a subshell: $PID must be our child)
  local fs=$1 b=$TMPFS_DIR/back-$1 m=$TMPFS_DIR/mnt-$1
  mkdir -p "$b" "$m"
  case $fs in
    passthrough_ll) "$PLL" -o source="$b" "$m" ;;
    classic | uring)
      "$PROTO" --transport "$fs" --threads "$CLASSIC_THREADS" --depth "$DEPTH" \
        "$b" "$m" 2>>"$LOG.cur" &
      PID=$!
      for _ in $(seq 100); do mountpoint -q "$m" && break; sleep 0.05; done ;;
  esac
  M=$m
}
stop() { # fs metric run app_cpu_s: unmount, keep the prototype's counters
  local m=$TMPFS_DIR/mnt-$1
  umount "$m"
  if [ "$1" != passthrough_ll ]; then
    wait "$PID" || true
    # "stats transport=... classic_reqs=A uring_reqs=B transport_syscalls=C vcsw=D ivcsw=E cpu_us=F"
    # -> "fs,metric,run requests syscalls/req ctxsw/req daemon_us/req (app+daemon)_us/req"
    awk -v k="$1,$2,$3" -v app="$4" '/^stats /{
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      r = v["classic_reqs"] + v["uring_reqs"]
      if (r > 0) printf "%s %d %.3f %.3f %.2f %.2f\n", k, r, v["transport_syscalls"] / r,
        (v["vcsw"] + v["ivcsw"]) / r, v["cpu_us"] / r, (v["cpu_us"] + app * 1e6) / r
    }' "$LOG.cur" >>"$LOG"
    grep -v '^stats ' "$LOG.cur" >&2 || true
    : >"$LOG.cur"
  fi
}

fio_rand() { # dir jobs -> "total_IOPS(read+write) fio_cpu_s"
  local out=$TMPFS_DIR/fio.out cpu
  cpu=$(/usr/bin/time -f '%U %S' fio --name=r --directory="$1" --filename=rand --rw=randrw \
    --rwmixread=50 --bs=4k --size=256M --direct=1 --ioengine=psync --numjobs="$2" \
    --group_reporting --runtime="$RAND_SECS" --time_based --output-format=terse \
    --terse-version=3 --output="$out" 2>&1 >/dev/null | awk 'END{printf "%.3f", $1 + $2}')
  echo "$(awk -F';' '{printf "%.0f", $8 + $49}' "$out") $cpu"
}

timed() { # command... -> "elapsed_s app_cpu_s" (the command, then sync)
  local t0 t1 cpu
  t0=$(now)
  cpu=$(/usr/bin/time -f '%U %S' "$@" 2>&1 >/dev/null | awk 'END{printf "%.3f", $1 + $2}')
  sync; t1=$(now)
  echo "$(secs "$t0" "$t1") $cpu"
}

declare -A V
: >"$LOG.cur"
echo "uptime: $(uptime)"
echo "runs $RUNS; tree $(tar -tf "$TAR" | grep -vc '/$') files; fio 4 KiB randrw x ${RAND_SECS} s;" \
  "classic threads $CLASSIC_THREADS; uring: one queue per possible CPU ($(cat /sys/devices/system/cpu/possible)), depth $DEPTH"
for r in $(seq "$RUNS"); do
  for fs in $FSES; do
    b=$TMPFS_DIR/back-$fs
    rm -rf "$b"; mkdir -p "$b"
    tar -xf "$TAR" -C "$b"
    start "$fs"; drop
    read -r V[$fs,ls,$r] V[$fs,lscpu,$r] < <(timed ls -lR "$M/t")
    stop "$fs" ls "$r" "${V[$fs,lscpu,$r]}"
    start "$fs"; drop
    read -r V[$fs,rm,$r] V[$fs,rmcpu,$r] < <(timed rm -rf "$M/t")
    stop "$fs" rm "$r" "${V[$fs,rmcpu,$r]}"
    dd if=/dev/zero of="$b/rand" bs=1M count=256 status=none
    start "$fs"
    read -r V[$fs,r1,$r] V[$fs,r1cpu,$r] < <(fio_rand "$M" 1)
    stop "$fs" r1 "$r" "${V[$fs,r1cpu,$r]}"
    start "$fs"
    read -r V[$fs,r4,$r] V[$fs,r4cpu,$r] < <(fio_rand "$M" 4)
    stop "$fs" r4 "$r" "${V[$fs,r4cpu,$r]}"
    rm -rf "$b"
    echo "run $r $fs: ls ${V[$fs,ls,$r]} s, rm ${V[$fs,rm,$r]} s, rand1j ${V[$fs,r1,$r]}, rand4j ${V[$fs,r4,$r]} IOPS"
  done
done

med() { # fs metric
  local a=() r
  for r in $(seq "$RUNS"); do a+=("${V[$1,$2,$r]:-}"); done
  median "${a[@]}"
}
cnt() { # fs metric column(2=reqs 3=syscalls/req 4=ctxsw/req 5,6=cpu us/req) -> median
  # shellcheck disable=SC2046
  median $(awk -v k="$1,$2," -v c="$3" 'index($1, k) == 1 {print $c}' "$LOG")
}
echo
echo "| workload | passthrough_ll | classic | uring | uring vs classic |"
echo "|---|---|---|---|---|"
for spec in "ls:ls -lR s:0" "rm:rm -rf s:0" "r1:4 KiB randrw 1 job IOPS:1" "r4:4 KiB randrw 4 jobs IOPS:1"; do
  IFS=: read -r k label hb <<<"$spec"
  p=$(med passthrough_ll "$k"); c=$(med classic "$k"); u=$(med uring "$k")
  echo "| $label | $p | $c | $u | $(ratio "$u" "$c" "$hb")x |"
done
echo
echo "Prototype counters, medians per workload, classic / uring: FUSE requests; per request:"
echo "transport system calls, daemon context switches, daemon CPU us, and CPU us of daemon +"
echo "application (user+system; the figure least disturbed by other load on the machine)"
echo "| workload | requests | syscalls/req | ctxsw/req | daemon CPU us/req | total CPU us/req | uring vs classic (total CPU) |"
echo "|---|---|---|---|---|---|---|"
for k in ls rm r1 r4; do
  echo "| $k | $(cnt classic $k 2) / $(cnt uring $k 2) | $(cnt classic $k 3) / $(cnt uring $k 3)" \
    "| $(cnt classic $k 4) / $(cnt uring $k 4) | $(cnt classic $k 5) / $(cnt uring $k 5)" \
    "| $(cnt classic $k 6) / $(cnt uring $k 6) | $(ratio "$(cnt uring $k 6)" "$(cnt classic $k 6)" 0)x |"
done
echo "uptime: $(uptime)"
