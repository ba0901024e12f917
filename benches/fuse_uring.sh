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
# Workloads (a fresh mount for each, page cache dropped before ls and rm;
# medians):
#   untar    the 12,600-file tree fs_bench.sh makes, through the mount,
#            then sync                                                (s)
#   ls -lR   of that tree                                             (s)
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
# Filesystems (FSES): passthrough_ll; the prototype as `classic` (one
# /dev/fuse fd, CLASSIC_THREADS threads), `classic-kmfs` (kmfs's fuser
# setting: KMFS_THREADS threads with a cloned fd each), `uring` (one queue
# per possible CPU, its thread pinned there, as libfuse does) and
# `uring-nopin` (the same, threads not pinned).
# Environment: RUNS=3 RAND_SECS=3 CLASSIC_THREADS=$(nproc) DEPTH=8
#   KMFS_THREADS  FSES  DISK_DIR TMPFS_DIR
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
# kmfs's own fuser setting: 2 x CPUs clamped to 4..16, one cloned fd each.
KMFS_THREADS=${KMFS_THREADS:-$(n=$(($(nproc) * 2)); echo $((n < 4 ? 4 : n > 16 ? 16 : n)))}
FSES=${FSES:-passthrough_ll classic classic-kmfs uring uring-nopin}
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
    classic | classic-kmfs | uring | uring-nopin)
      local args=(--transport "${fs%%-*}" --threads "$CLASSIC_THREADS" --depth "$DEPTH")
      [ "$fs" = classic-kmfs ] && args=(--transport classic --threads "$KMFS_THREADS" --clone-fd)
      [ "$fs" = uring-nopin ] && args+=(--no-pin)
      "$PROTO" "${args[@]}" "$b" "$m" 2>>"$LOG.cur" &
      PID=$!
      for _ in $(seq 100); do mountpoint -q "$m" && break; sleep 0.05; done ;;
  esac
  M=$m
}
stop() { # fs metric run app_cpu_s: unmount, keep the prototype's counters
  local m=$TMPFS_DIR/mnt-$1 i
  # A just-exited workload's last file references can linger for a moment
  # ("target is busy"): retry, then detach.
  for i in 1 2 3 4 5 6 7 8 9 10; do
    umount "$m" 2>/dev/null && break
    [ "$i" = 10 ] && umount -l "$m"
    sleep 0.2
  done
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
    start "$fs"
    read -r V[$fs,untar,$r] V[$fs,untarcpu,$r] < <(timed tar -xf "$TAR" -C "$M")
    stop "$fs" untar "$r" "${V[$fs,untarcpu,$r]}"
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
    echo "run $r $fs: untar ${V[$fs,untar,$r]} s, ls ${V[$fs,ls,$r]} s, rm ${V[$fs,rm,$r]} s, rand1j ${V[$fs,r1,$r]}, rand4j ${V[$fs,r4,$r]} IOPS"
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
printf '| workload |'; for fs in $FSES; do printf ' %s |' "$fs"; done; echo ' uring vs classic |'
printf '|---|'; for _ in $FSES; do printf -- '---|'; done; echo '---|'
for spec in "untar:untar s:0" "ls:ls -lR s:0" "rm:rm -rf s:0" "r1:4 KiB randrw 1 job IOPS:1" "r4:4 KiB randrw 4 jobs IOPS:1"; do
  IFS=: read -r k label hb <<<"$spec"
  printf '| %s |' "$label"
  for fs in $FSES; do printf ' %s |' "$(med "$fs" "$k")"; done
  echo " $(ratio "$(med uring "$k")" "$(med classic "$k")" "$hb")x |"
done
echo
echo "Prototype counters (medians over runs): FUSE requests, and per request: transport system"
echo "calls, daemon context switches, daemon CPU us, CPU us of daemon + application (user+system;"
echo "the figure least disturbed by other load on the machine)"
echo "| workload | variant | requests | syscalls/req | ctxsw/req | daemon CPU us/req | total CPU us/req |"
echo "|---|---|---|---|---|---|---|"
for k in untar ls rm r1 r4; do
  for fs in $FSES; do
    [ "$fs" = passthrough_ll ] && continue
    echo "| $k | $fs | $(cnt "$fs" $k 2) | $(cnt "$fs" $k 3) | $(cnt "$fs" $k 4) | $(cnt "$fs" $k 5) | $(cnt "$fs" $k 6) |"
  done
done
echo "uptime: $(uptime)"
