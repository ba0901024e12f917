#!/usr/bin/env bash
# End-to-end filesystem benchmark (issue 9, SPEC section 7; many clients at
# once: issue 18): kmfs next to gocryptfs, securefs, libfuse's C
# passthrough_ll, bindfs and the backing filesystem itself, in one run, on a
# tmpfs backing directory AND on the disk.
#
#   sudo benches/fs_bench.sh                # everything (< 10 min on 2 cores)
#   RUNS=1 BACKINGS=tmpfs FSES="gocryptfs kmfs" sudo -E benches/fs_bench.sh
#
# Workloads (page cache dropped before each phase; medians of RUNS runs):
#   seq write   SEQ_MB MiB, 1 MiB writes, fsync at the end        (MiB/s)
#   seq read    the same file, cold cache                          (MiB/s)
#   untar       a deterministic ~12.6k-file tree (fixed seed, made by this
#               script with Python), then sync                      (s)
#   ls -lR, cat all files (find | xargs cat), rm -rf                (s)
#   rand read / rand write  fio psync 4 KiB on a 256 MiB file,
#               RAND_SECS seconds each                             (IOPS)
# Many clients at once (PHASES=conc):
#   8x write    8 fio jobs each streaming CONC_MB MiB (1 MiB writes) to its
#               own file, end fsync, aggregate; 1x write: the same fio
#               command with numjobs=1                               (MiB/s)
#   4t randrw   4 fio jobs of 4 KiB random read/write (50/50, psync) on one
#               shared 512 MiB file, RAND_SECS seconds, reads + writes;
#               1t randrw: the same with numjobs=1                   (IOPS)
#   8x untar    8 parallel `tar -x` of the tree into separate directories,
#               then sync                                            (s)
# Peak RSS: VmHWM of each FUSE daemon at the end of each backing (it covers
# the 1 GiB write, the untar and the concurrent phase). BIG_GB=10 adds a 10 GiB kmfs write on the
# disk backing and reports kmfs's VmHWM after it.
#
# Environment:
#   KMFS            kmfs binary   (default: target/release/kmfs, built here)
#   DISK_DIR        work dir on the disk       (default /var/tmp/kmfs-bench)
#   TMPFS_DIR       a tmpfs is mounted here    (default /run/kmfs-bench-tmpfs)
#   PASSTHROUGH_LL_SRC  passthrough_ll.c to compile with gcc (default: the copy
#                   libfuse3-dev ships in /usr/share/doc/libfuse3-dev/examples)
#   BACKINGS="tmpfs disk"
#   FSES="native passthrough_ll bindfs gocryptfs securefs kmfs"  (securefs:
#                   `apt-get install securefs`; its volume is keyed with a
#                   32-byte key file, no password)
#   PHASES="base conc"   the single-client workloads, the concurrent ones
#   RUNS=3 SEQ_MB=1024 CONC_MB=128 RAND_SECS=3 BIG_GB=0
#   KMFS_OPTS="-o no_writeback"   extra arguments for `kmfs mount`
#   KMFS_A          a second kmfs binary, benchmarked as FSES entry `kmfs_a`
#                   (interleaved A/B in one run; ratios stay kmfs's)
# Benchmarks report; they are not timed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${RUNS:-3}
SEQ_MB=${SEQ_MB:-1024}
CONC_MB=${CONC_MB:-128}
PHASES=${PHASES:-base conc}
RAND_SECS=${RAND_SECS:-3}
BIG_GB=${BIG_GB:-0}
BACKINGS=${BACKINGS:-tmpfs disk}
FSES=${FSES:-native passthrough_ll bindfs gocryptfs securefs kmfs}
DISK_DIR=${DISK_DIR:-/var/tmp/kmfs-bench}
TMPFS_DIR=${TMPFS_DIR:-/run/kmfs-bench-tmpfs}

. benches/common.sh

# The deterministic small-file tree: 12,600 files in 840 directories, sizes
# log-uniform 64 B .. 45 KiB, contents from the same seeded generator.
TAR=$CACHE/tree-v1.tar
if [ ! -f "$TAR" ]; then
  python3 - "$TAR" <<'PY'
import io, random, sys, tarfile
rng = random.Random(20261122)
out = sys.argv[1]
dirs = ["t"]
with tarfile.open(out + ".tmp", "w", format=tarfile.GNU_FORMAT) as tf:
    def add_dir(p):
        ti = tarfile.TarInfo(p); ti.type = tarfile.DIRTYPE; ti.mode = 0o755
        ti.mtime = 1_700_000_000; tf.addfile(ti)
    add_dir("t")
    for d in range(840):
        parent = rng.choice(dirs[-40:])
        p = f"{parent}/d{d:03d}"
        dirs.append(p); add_dir(p)
        for f in range(15):
            size = int(2 ** rng.uniform(6, 15.5))
            ti = tarfile.TarInfo(f"{p}/f{f:02d}_{rng.getrandbits(32):08x}.dat")
            ti.size = size; ti.mode = 0o644; ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(rng.randbytes(size)))
import os; os.rename(out + ".tmp", out)
PY
fi
NFILES=$(tar -tf "$TAR" | grep -vc '/$')
TREE_MB=$(du -m --apparent-size "$TAR" | cut -f1)


fio_seq() { # dir rw -> MiB/s as fio accounts it (end_fsync included)
  fio --name=s --directory="$1" --filename=big --rw="$2" --bs=1M --size="${SEQ_MB}M" \
    --ioengine=psync --end_fsync=1 --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' -v rw="$2" '{printf "%.0f", ((rw=="read") ? $7 : $48)/1024}'
}

fio_iops() { # dir rw
  fio --name=r --directory="$1" --filename=rand --rw="$2" --bs=4k --size=256M \
    --ioengine=psync --runtime="$RAND_SECS" --time_based --output-format=terse \
    --terse-version=3 2>/dev/null |
    awk -F';' -v rw="$2" '{print (rw=="randread") ? $8 : $49}'
}

fio_streams() { # dir numjobs -> aggregate MiB/s of numjobs writers, one file each
  fio --name=c --directory="$1" --rw=write --bs=1M --size="${CONC_MB}M" --numjobs="$2" \
    --ioengine=psync --end_fsync=1 --group_reporting --output-format=terse \
    --terse-version=3 2>/dev/null | awk -F';' '{printf "%.0f", $48/1024}'
  rm -f "$1"/c.*
}

fio_shared() { # dir numjobs -> IOPS (reads + writes) of numjobs threads on one file
  fio --name=m --directory="$1" --filename=shared --rw=randrw --bs=4k --size=512M \
    --numjobs="$2" --ioengine=psync --runtime="$RAND_SECS" --time_based --group_reporting \
    --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{print $8 + $49}'
}

declare -A V   # V[backing,fs,metric,run]
declare -A RSS
run_one() { # backing fs dir run
  local bk=$1 fs=$2 d=$3 r=$4 t0 t1
  drop; V[$bk,$fs,sw,$r]=$(fio_seq "$d" write)
  drop; V[$bk,$fs,sr,$r]=$(fio_seq "$d" read)
  rm -f "$d/big"
  drop; t0=$(now); tar -xf "$TAR" -C "$d"; sync; t1=$(now); V[$bk,$fs,untar,$r]=$(secs "$t0" "$t1")
  drop; t0=$(now); ls -lR "$d/t" >/dev/null; t1=$(now); V[$bk,$fs,ls,$r]=$(secs "$t0" "$t1")
  drop; t0=$(now); find "$d/t" -type f -print0 | xargs -0 cat >/dev/null; t1=$(now)
  V[$bk,$fs,cat,$r]=$(secs "$t0" "$t1")
  drop; t0=$(now); rm -rf "$d/t"; sync; t1=$(now); V[$bk,$fs,rm,$r]=$(secs "$t0" "$t1")
  fio --name=r --directory="$d" --filename=rand --rw=write --bs=1M --size=256M \
    --ioengine=psync >/dev/null 2>&1
  drop; V[$bk,$fs,rr,$r]=$(fio_iops "$d" randread)
  V[$bk,$fs,rw,$r]=$(fio_iops "$d" randwrite)
  rm -f "$d/rand"
}

run_conc() { # backing fs dir run: many clients at once
  local bk=$1 fs=$2 d=$3 r=$4 t0 t1 i
  drop; V[$bk,$fs,cw1,$r]=$(fio_streams "$d" 1)
  drop; V[$bk,$fs,cw8,$r]=$(fio_streams "$d" 8)
  fio --name=m --directory="$d" --filename=shared --rw=write --bs=1M --size=512M \
    --ioengine=psync >/dev/null 2>&1
  drop; V[$bk,$fs,sh1,$r]=$(fio_shared "$d" 1)
  drop; V[$bk,$fs,sh4,$r]=$(fio_shared "$d" 4)
  rm -f "$d/shared"
  for i in 1 2 3 4 5 6 7 8; do mkdir -p "$d/u$i"; done
  local pids=() ok=1
  drop; t0=$(now)
  for i in 1 2 3 4 5 6 7 8; do tar -xf "$TAR" -C "$d/u$i" & pids+=($!); done
  for i in "${pids[@]}"; do wait "$i" || ok=0; done
  sync; t1=$(now)
  # A failed untar (the peer ran out of something) is reported, not timed.
  if [ "$ok" = 1 ]; then V[$bk,$fs,untar8,$r]=$(secs "$t0" "$t1"); else V[$bk,$fs,untar8,$r]=FAIL; fi
  # A peer that ran out of descriptors (passthrough_ll holds one per inode
  # the kernel knows) may still be short of them: once the kernel forgets
  # the inodes it has them back. A leftover must not end the whole run.
  [ "$ok" = 1 ] || drop
  rm -rf "$d"/u[1-8] 2>/dev/null || { drop; rm -rf "$d"/u[1-8] 2>/dev/null; } ||
    echo "  [$bk run $r $fs] the failed untars could not all be removed" >&2
}


echo "kmfs fs_bench: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r)"
echo "seq ${SEQ_MB} MiB; tree ${NFILES} files / ${TREE_MB} MiB tar; random 4 KiB x ${RAND_SECS} s; concurrent streams ${CONC_MB} MiB each; medians of ${RUNS}; phases: ${PHASES}; load $(cut -d' ' -f1-3 /proc/loadavg)"
has_phase() { [[ " $PHASES " == *" $1 "* ]]; }
start=$(now)
for bk in $BACKINGS; do
  case $bk in
    tmpfs) base=$TMPFS_DIR; mkdir -p "$base"; mount -t tmpfs -o size=8g kmfs-bench "$base" ;;
    disk) base=$DISK_DIR/work; rm -rf "$base"; mkdir -p "$base" ;;
    *) echo "unknown backing $bk" >&2; exit 1 ;;
  esac
  mkdir -p "$base/keys"; chmod 700 "$base/keys"
  head -c 32 /dev/urandom >"$base/keys/k"; chmod 600 "$base/keys/k"
  echo benchpass >"$base/keys/pass"
  declare -A DIR=()
  for fs in $FSES; do DIR[$fs]=$(mount_fs "$fs" "$base"); done
  for r in $(seq 1 "$RUNS"); do
    for fs in $FSES; do
      if has_phase base; then
        run_one "$bk" "$fs" "${DIR[$fs]}" "$r"
        echo "  [$bk run $r $fs] sw ${V[$bk,$fs,sw,$r]} sr ${V[$bk,$fs,sr,$r]} untar ${V[$bk,$fs,untar,$r]} ls ${V[$bk,$fs,ls,$r]} cat ${V[$bk,$fs,cat,$r]} rm ${V[$bk,$fs,rm,$r]} rr ${V[$bk,$fs,rr,$r]} rw ${V[$bk,$fs,rw,$r]}" >&2
      fi
      if has_phase conc; then
        run_conc "$bk" "$fs" "${DIR[$fs]}" "$r"
        echo "  [$bk run $r $fs] 1x-write ${V[$bk,$fs,cw1,$r]} 8x-write ${V[$bk,$fs,cw8,$r]} 1t-randrw ${V[$bk,$fs,sh1,$r]} 4t-randrw ${V[$bk,$fs,sh4,$r]} 8x-untar ${V[$bk,$fs,untar8,$r]} (load $(cut -d' ' -f1 /proc/loadavg))" >&2
      fi
    done
  done
  for fs in $FSES; do
    [ "$fs" = native ] && { RSS[$bk,$fs]=-; continue; }
    RSS[$bk,$fs]=$(hwm "$base/mnt-$fs")
  done
  if [ "$bk" = disk ] && [ "$BIG_GB" -gt 0 ] && [[ " $FSES " == *" kmfs "* ]]; then
    fio --name=s --directory="${DIR[kmfs]}" --filename=huge --rw=write --bs=1M \
      --size="${BIG_GB}G" --ioengine=psync --end_fsync=1 >/dev/null 2>&1
    RSS[big]=$(hwm "$base/mnt-kmfs"); rm -f "${DIR[kmfs]}/huge"
  fi
  for fs in $FSES; do
    [ "$fs" = native ] && continue
    p=$(daemon_pid "$base/mnt-$fs")
    fusermount3 -u "$base/mnt-$fs"
    while [ -n "$p" ] && kill -0 "$p" 2>/dev/null; do sleep 0.1; done
  done
  [ "$bk" = tmpfs ] && umount "$base"
  [ "$bk" = disk ] && rm -rf "$base"
done

has() { [[ " $FSES " == *" $1 "* ]]; }
echo
echo "Ratios are kmfs relative to the peer, >1 = kmfs better (throughput ratio, or peer time / kmfs time)."
for bk in $BACKINGS; do
  echo
  echo "== backing: $bk"
  hdr=$(printf "%-22s" workload)
  for fs in $FSES; do hdr+=$(printf " %14s" "$fs"); done
  has kmfs && has gocryptfs && hdr+=$(printf " %9s" "x gocrypt")
  has kmfs && has securefs && hdr+=$(printf " %9s" "x secure")
  has kmfs && has passthrough_ll && hdr+=$(printf " %9s" "x pass_ll")
  has kmfs && has kmfs_a && hdr+=$(printf " %9s" "x kmfs_a")
  echo "$hdr"
  metrics=()
  has_phase base && metrics+=("sw:seq write MiB/s:1" "sr:seq read MiB/s:1" "untar:untar s:0" "ls:ls -lR s:0" \
           "cat:cat all s:0" "rm:rm -rf s:0" "rr:rand read IOPS:1" "rw:rand write IOPS:1")
  has_phase conc && metrics+=("cw1:1x write MiB/s:1" "cw8:8x write MiB/s:1" "sh1:1t randrw IOPS:1" \
           "sh4:4t randrw IOPS:1" "untar8:8x untar s:0")
  for m in "${metrics[@]}"; do
    IFS=: read -r key label hb <<<"$m"
    line=$(printf "%-22s" "$label")
    declare -A MED=()
    for fs in $FSES; do
      vals=(); for r in $(seq 1 "$RUNS"); do vals+=("${V[$bk,$fs,$key,$r]}"); done
      if [[ " ${vals[*]} " == *" FAIL "* ]]; then MED[$fs]=FAIL; else MED[$fs]=$(median "${vals[@]}"); fi
      line+=$(printf " %14s" "${MED[$fs]}")
    done
    has kmfs && has gocryptfs && line+=$(printf " %9s" "$(ratio "${MED[kmfs]}" "${MED[gocryptfs]}" "$hb")")
    has kmfs && has securefs && line+=$(printf " %9s" "$(ratio "${MED[kmfs]}" "${MED[securefs]}" "$hb")")
    has kmfs && has passthrough_ll && line+=$(printf " %9s" "$(ratio "${MED[kmfs]}" "${MED[passthrough_ll]}" "$hb")")
    has kmfs && has kmfs_a && line+=$(printf " %9s" "$(ratio "${MED[kmfs]}" "${MED[kmfs_a]}" "$hb")")
    echo "$line"
  done
  line=$(printf "%-22s" "daemon VmHWM MiB")
  for fs in $FSES; do line+=$(printf " %14s" "${RSS[$bk,$fs]}"); done
  echo "$line"
done
[ -n "${RSS[big]:-}" ] && echo "kmfs VmHWM after a ${BIG_GB} GiB write on disk: ${RSS[big]} MiB"
echo "total bench time: $(secs "$start" "$(now)") s"
