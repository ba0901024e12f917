# Shared by the benchmark scripts (fs_bench.sh, many_files.sh): tools, the
# binaries, timing, mounting each filesystem under test, and the summary
# arithmetic. Source it after setting DISK_DIR, TMPFS_DIR, KMFS_OPTS and
# (optionally) KMFS, KMFS_A (a second kmfs binary, mounted as `kmfs_a` for
# A/B runs) and PASSTHROUGH_LL_SRC.
PLL_SRC=${PASSTHROUGH_LL_SRC:-/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c}
KMFS_OPTS=${KMFS_OPTS:-}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
for t in fio gocryptfs bindfs gcc pkg-config python3 fusermount3; do
  command -v "$t" >/dev/null || { echo "missing $t (scripts/install-deps.sh)" >&2; exit 1; }
done
if [ -z "${KMFS:-}" ]; then
  cargo build --release --locked >/dev/null 2>&1
  KMFS=${CARGO_TARGET_DIR:-$ROOT/target}/release/kmfs
fi
KMFS=$(readlink -f "$KMFS")
[ -n "${KMFS_A:-}" ] && KMFS_A=$(readlink -f "$KMFS_A")

CACHE=$DISK_DIR/cache
mkdir -p "$CACHE"
# passthrough_ll, compiled at bench time (never committed).
PLL=$CACHE/passthrough_ll
if [ ! -x "$PLL" ] || [ "$PLL_SRC" -nt "$PLL" ]; then
  gcc -O2 -o "$PLL" "$PLL_SRC" $(pkg-config fuse3 --cflags --libs)
fi

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }

umount_all() {
  for m in "$DISK_DIR"/mnt-* "$TMPFS_DIR"/mnt-*; do
    [ -d "$m" ] || continue
    mountpoint -q "$m" 2>/dev/null && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }
  done
  if mountpoint -q "$TMPFS_DIR" 2>/dev/null; then umount "$TMPFS_DIR" || umount -l "$TMPFS_DIR"; fi
  return 0
}
trap umount_all EXIT
umount_all

# mount_fs FS BASE -> prints the directory the workloads use.
mount_fs() {
  local fs=$1 base=$2 b="$2/back-$1" m="$2/mnt-$1"
  rm -rf "$b"; mkdir -p "$b" "$m"
  case $fs in
    native) echo "$b"; return ;;
    # passthrough_ll keeps a descriptor open per inode it knows: the 8
    # parallel untars (~100k inodes) need more than a default limit. Raised
    # where the hard limit allows (CAP_SYS_RESOURCE); otherwise its untar may
    # fail with EMFILE, which the table shows as FAIL.
    passthrough_ll) (ulimit -n 1048576 2>/dev/null || true; "$PLL" -o source="$b" "$m") ;;
    bindfs) bindfs "$b" "$m" ;;
    gocryptfs)
      gocryptfs -q -init -passfile "$base/keys/pass" "$b" >/dev/null
      gocryptfs -q -passfile "$base/keys/pass" "$b" "$m" 2>/dev/null ;;
    securefs) # the 32-byte key file as its key (no password stretching)
      command -v securefs >/dev/null || { echo "missing securefs (apt-get install securefs)" >&2; exit 1; }
      securefs create --keyfile "$base/keys/k" "$b" >/dev/null 2>&1
      securefs mount -b --keyfile "$base/keys/k" "$b" "$m" >/dev/null 2>&1
      for _ in $(seq 50); do mountpoint -q "$m" && break; sleep 0.1; done ;;
    kmfs|kmfs_a)
      local bin=$KMFS; [ "$fs" = kmfs_a ] && bin=${KMFS_A:?set KMFS_A to a kmfs binary}
      "$bin" init --keyfile "$base/keys/k" "$b" >/dev/null 2>&1
      # shellcheck disable=SC2086
      "$bin" mount --keyfile "$base/keys/k" $KMFS_OPTS "$b" "$m" 2>/dev/null ;;
  esac
  echo "$m"
}

daemon_pid() { # mountpoint -> pid of the FUSE daemon serving it
  local m=$1 p
  for p in $(pgrep -f -- "$m"); do
    [ "$p" != "$$" ] && grep -qa -- "$m" "/proc/$p/cmdline" && { echo "$p"; return; }
  done
}
hwm() { local p; p=$(daemon_pid "$1"); [ -n "$p" ] && awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$p/status" || echo -; }
rss_kib() { local p; p=$(daemon_pid "$1"); [ -n "$p" ] && awk '/VmRSS/{print $2}' "/proc/$p/status" || echo 0; }

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

ratio() { # kmfs peer higher_is_better -> ">1 = kmfs better"
  awk -v k="$1" -v p="$2" -v hb="$3" 'BEGIN{
    if (k == "" || p == "" || k+0 <= 0 || p+0 <= 0) { print "-"; exit }
    printf "%.2f", hb ? k/p : p/k }'
}
