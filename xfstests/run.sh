#!/bin/bash
# Runs the kernel's filesystem test suite (xfstests / fstests) against kmfs
# with FSTYP=fuse.
#
#   XFSTESTS_DIR=/path/to/built/xfstests xfstests/run.sh [check arguments]
#
# Default check arguments: -g quick. Must run as root. It does not download or
# build xfstests: XFSTESTS_DIR must be a checkout on which `make` has been run
# (Debian build dependencies: acl attr automake bc dbench dump e2fsprogs fio
# gawk gcc indent libacl1-dev libaio-dev libcap-dev libgdbm-dev libtool
# libtool-bin liburing-dev make psmisc python3 quota uuid-dev uuid-runtime
# xfsprogs sqlite3 libgdbm-compat-dev xfslibs-dev).
#
# Environment:
#   XFSTESTS_DIR   built xfstests checkout (required)
#   KMFS_BIN       the kmfs binary (default: kmfs on PATH, else
#                  target/release/kmfs of this repository)
#   KMFS_XFS_WORK  work directory: key, backing directories, mountpoints,
#                  results (default /var/tmp/kmfs-xfstests)
#   KMFS_XFS_FRESH=1  start with new empty volumes
#   KMFS_XFS_OWNFS=0  backing directories as plain directories under the work
#                  directory, instead of (default) each on its own ext4 image
#                  of KMFS_XFS_IMG_SIZE (default 10G, sparse), loop-mounted
#
# What it sets up:
#   * a development key file and, per device name (kmfs-test, kmfs-scratch), a
#     backing directory that the mount helper initialises on first use (for
#     FSTYP=fuse, xfstests never runs mkfs);
#   * /sbin/mount.fuse.kmfs, which mount(8) runs for `mount -t fuse.kmfs DEV
#     DIR -o OPTS`: it maps DEV to its backing directory and runs the kmfs
#     daemon with fsname=DEV (so `umount DEV` finds the mount) and no subtype
#     (xfstests requires `df -T` to show exactly "fuse"); any other device is
#     handed to mount.fuse3 as usual, and the helper is removed when the run
#     ends, so the machine's own fuse.kmfs mounts are not affected; it mounts
#     with `dev` and `suid` unless nodev or nosuid is asked for (a local
#     filesystem's defaults, which xfstests assumes);
#   * the test users fsgqa, fsgqa2, 123456-fsgqa and groups fsgqa, fsgqa2 if
#     missing.
# Then it runs ./check -fuse with xfstests/local.config (HOST_OPTIONS) and the
# exclusions in xfstests/exclude.txt; results land in $KMFS_XFS_WORK/results
# (check.log, check.time, *.out.bad, *.full).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "xfstests/run.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mounts, mount helper, test users)"
: "${XFSTESTS_DIR:?set XFSTESTS_DIR to an already built xfstests checkout}"
XFSTESTS_DIR=$(cd "$XFSTESTS_DIR" && pwd)
[ -x "$XFSTESTS_DIR/check" ] || die "$XFSTESTS_DIR/check not found: not an xfstests checkout"
[ -x "$XFSTESTS_DIR/ltp/fsstress" ] || die "$XFSTESTS_DIR is not built (run make there first)"

if [ -z "${KMFS_BIN:-}" ]; then
    KMFS_BIN=$(command -v kmfs || true)
    [ -n "$KMFS_BIN" ] || KMFS_BIN=$here/../target/release/kmfs
fi
KMFS_BIN=$(readlink -f "$KMFS_BIN")
[ -x "$KMFS_BIN" ] || die "kmfs binary $KMFS_BIN not found (cargo build --release, or set KMFS_BIN)"

export KMFS_XFS_WORK=${KMFS_XFS_WORK:-/var/tmp/kmfs-xfstests}
work=$KMFS_XFS_WORK

# Nothing of ours may still be mounted from an earlier run.
for m in "$work/mnt/test" "$work/mnt/scratch"; do
    if mountpoint -q "$m" 2>/dev/null; then
        umount "$m" 2>/dev/null || umount -l "$m"
    fi
done
own_fs=${KMFS_XFS_OWNFS:-1}
if [ "${KMFS_XFS_FRESH:-0}" = 1 ]; then
    for d in "$work"/back/*; do
        if mountpoint -q "$d" 2>/dev/null; then
            umount "$d"
        fi
    done
    rm -rf "$work/back" "$work/img"
fi
mkdir -p "$work/back" "$work/mnt/test" "$work/mnt/scratch" "$work/results" "$work/keys"
# Each backing directory is the root of its own ext4 filesystem (a sparse
# image, loop-mounted): kmfs serves files by NFS file handle only when its
# backing directory is a whole filesystem (docs/SECURITY.md), which the
# open_by_handle tests (generic/426, 467, 477, 756, 777) need.
if [ "$own_fs" = 1 ]; then
    mkdir -p "$work/img"
    for dev in kmfs-test kmfs-scratch; do
        img=$work/img/$dev.ext4 back=$work/back/$dev
        mkdir -p "$back"
        mountpoint -q "$back" && continue
        if [ ! -s "$img" ]; then
            truncate -s "${KMFS_XFS_IMG_SIZE:-10G}" "$img"
            mkfs.ext4 -q -F "$img" || die "mkfs.ext4 $img failed"
            mount -o loop "$img" "$back" || die "cannot loop-mount $img (set KMFS_XFS_OWNFS=0 for plain directories)"
            rmdir "$back/lost+found"
            chmod 0700 "$back"
        else
            mount -o loop "$img" "$back" || die "cannot loop-mount $img (set KMFS_XFS_OWNFS=0 for plain directories)"
        fi
    done
fi
chmod 0700 "$work/keys"
chmod 0755 "$work" "$work/mnt" "$work/mnt/test" "$work/mnt/scratch"
key=$work/keys/key
if [ ! -s "$key" ]; then
    head -c 32 /dev/urandom >"$key"
fi
chmod 0600 "$key"

# The mount helper. mount(8) calls it as: DEV DIR [-sfnv] [-o OPTS] [-t TYPE].
helper=/sbin/mount.fuse.kmfs
cat >"$helper.tmp" <<EOF
#!/bin/sh
# Generated by kmfs xfstests/run.sh: mount helper for xfstests (FSTYP=fuse).
dev=\$1 mnt=\$2
shift 2
opts=
while [ \$# -gt 0 ]; do
    case \$1 in
        -o) opts="\$opts,\$2"; shift 2 ;;
        -o*) opts="\$opts,\${1#-o}"; shift ;;
        -t) shift 2 ;;
        -*) shift ;;
        *) echo "mount.fuse.kmfs: unexpected argument \$1" >&2; exit 1 ;;
    esac
done
opts=\${opts#,}
case ,\$opts, in
    *,remount,*)
        # A remount (ro/rw and the like) is the kernel's business: mount(8)
        # without helpers (-i) issues it on the existing FUSE mount.
        exec mount -i -o "\$opts" "\$mnt" ;;
esac
case \$dev in
    kmfs-test|kmfs-scratch) ;;
    # Any other fuse.kmfs mount (a real volume, fstab) goes the normal way.
    *) exec mount.fuse3 "\$dev" "\$mnt" -t fuse.kmfs \${opts:+-o "\$opts"} ;;
esac
# Device nodes and set-id bits: mount(8) passes "nodev" and "nosuid" on but
# drops "dev" and "suid", the kernel's defaults for a local filesystem, which
# xfstests assumes (generic/184, 306, 434 open device nodes they create; 633
# runs set-id binaries). kmfs itself mounts nodev,nosuid unless told "dev" or
# "suid", so the helper asks for them unless the test said otherwise.
case ,\$opts, in
    *,nodev,*) ;;
    *) opts="\$opts,dev" ;;
esac
case ,\$opts, in
    *,nosuid,*) ;;
    *) opts="\$opts,suid" ;;
esac
back=$work/back/\$dev
if [ ! -e "\$back/kmfs.volume" ]; then
    mkdir -p "\$back"
    "$KMFS_BIN" init --keyfile "$key" "\$back" >/dev/null || exit 32
fi
# The daemon's messages go to a log per device (they would clutter check's
# output); a failed mount names the log.
log=$work/daemon-\$dev.log
"$KMFS_BIN" mount --keyfile "$key" "\$back" "\$mnt" -o "subtype=,fsname=\$dev,allow_other,\$opts" 2>>"\$log" && exit 0
echo "mount.fuse.kmfs: kmfs mount failed, see \$log" >&2
tail -n 3 "\$log" >&2
exit 32
EOF
chmod 0755 "$helper.tmp"
mv "$helper.tmp" "$helper"
trap 'rm -f "$helper"' EXIT

# Test users and group (xfstests' README).
getent group fsgqa >/dev/null || groupadd fsgqa
getent group fsgqa2 >/dev/null || groupadd fsgqa2
getent passwd fsgqa >/dev/null || useradd -g fsgqa -m -N fsgqa
getent passwd fsgqa2 >/dev/null || useradd -m -N fsgqa2
getent passwd 123456-fsgqa >/dev/null || useradd -m -N 123456-fsgqa
# (su in some tests warns about a missing home directory)
for u in fsgqa fsgqa2 123456-fsgqa; do
    h=$(getent passwd "$u" | cut -d: -f6)
    [ -d "$h" ] || { mkdir -p "$h" && chown "$u" "$h"; }
done

cd "$XFSTESTS_DIR"
if [ $# -eq 0 ]; then
    set -- -g quick
fi
echo "kmfs: $KMFS_BIN ($("$KMFS_BIN" --version 2>/dev/null || echo '?'))"
echo "xfstests: $XFSTESTS_DIR; work: $work"
HOST_OPTIONS=$here/local.config ./check -fuse -E "$here/exclude.txt" "$@"
