#!/usr/bin/env bash
# SMB2 durable-handle reconnects through smbd (issue 16): the same
# smbtorture durable-open tests as tests/it/samba.rs, on a plain directory,
# a gocryptfs mount and a kmfs mount, each shared by one private smbd on
# 127.0.0.1, side by side; and how often smbd denied a reconnect because the
# file's stat changed ("stat_ex... differs").
#
#   sudo benches/samba_durable.sh
#   KMFS_OLD=/path/to/older/kmfs sudo -E benches/samba_durable.sh   # adds a column
#
# Needs samba, smbclient and samba-testsuite (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DISK_DIR=${DISK_DIR:-/var/tmp/kmfs-bench}
TMPFS_DIR=${TMPFS_DIR:-/run/kmfs-bench-tmpfs}
. benches/common.sh
for t in smbd smbtorture; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install samba samba-testsuite)" >&2; exit 1; }
done
TESTS="reopen1a reopen2 reopen2a reopen2-lease reopen3 reopen4 file-position lock-oplock"
FSES="native gocryptfs kmfs"

base=$TMPFS_DIR; mkdir -p "$base"; mount -t tmpfs -o size=1g kmfs-bench "$base"
mkdir -p "$base/keys"; chmod 700 "$base/keys"
head -c 32 /dev/urandom >"$base/keys/k"; chmod 600 "$base/keys/k"
echo benchpass >"$base/keys/pass"
declare -A DIR
for fs in $FSES; do DIR[$fs]=$(mount_fs "$fs" "$base"); done
if [ -n "${KMFS_OLD:-}" ]; then
  FSES="$FSES kmfs_old"; mkdir -p "$base/back-kmfs_old" "$base/mnt-kmfs_old"
  "$KMFS_OLD" init --keyfile "$base/keys/k" "$base/back-kmfs_old" >/dev/null 2>&1
  "$KMFS_OLD" mount --keyfile "$base/keys/k" "$base/back-kmfs_old" "$base/mnt-kmfs_old" 2>/dev/null
  DIR[kmfs_old]=$base/mnt-kmfs_old
fi

s=$base/smb; mkdir -p "$s"/{private,lock,state,cache,pid,ncalrpc}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
{
  cat <<CONF
[global]
  server role = standalone server
  smb ports = $port
  interfaces = 127.0.0.1
  bind interfaces only = yes
  disable netbios = yes
  private dir = $s/private
  lock directory = $s/lock
  state directory = $s/state
  cache directory = $s/cache
  pid directory = $s/pid
  ncalrpc dir = $s/ncalrpc
  log file = $s/log.%m
  log level = 1
  map to guest = Bad User
  load printers = no
  printcap name = /dev/null
  disable spoolss = yes
CONF
  for fs in $FSES; do
    printf '[%s]\n  path = %s\n  read only = no\n  guest ok = yes\n  force user = root\n  durable handles = yes\n  kernel oplocks = no\n  kernel share modes = no\n  posix locking = no\n' "$fs" "${DIR[$fs]}"
  done
} >"$s/smb.conf"
smbd --foreground --no-process-group --configfile="$s/smb.conf" >"$s/smbd.out" 2>&1 &
smbd_pid=$!
stop_smbd() {
  kill "$smbd_pid" 2>/dev/null || true; wait "$smbd_pid" 2>/dev/null || true
  # Its per-connection children hold the shares until they are gone.
  pkill -f -- "$s/smb.conf" 2>/dev/null || true
  for _ in $(seq 50); do pgrep -f -- "$s/smb.conf" >/dev/null || break; sleep 0.1; done
  umount_all
}
trap stop_smbd EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

echo "kmfs samba_durable: $(date -u +%Y-%m-%dT%H:%MZ), $(smbd --version), tmpfs backing"
echo "(reopen1a reconnects as a second user; on a guest share it fails everywhere)"
printf '%-16s' test; for fs in $FSES; do printf ' %10s' "$fs"; done; echo
for t in $TESTS; do
  printf '%-16s' "$t"
  for fs in $FSES; do
    r=$(timeout 120 smbtorture "//127.0.0.1/$fs" -p "$port" -U% -N "smb2.durable-open.$t" 2>&1 |
        grep -Eo '^(success|failure|error|skip)' | head -1 || true)
    printf ' %10s' "${r:-none}"
  done
  echo
done
echo "smbd denials of a durable reconnect, all shares: $(grep -h 'denying durable reconnect' "$s"/log.* 2>/dev/null | wc -l)"
grep -h 'denying durable reconnect' "$s"/log.* 2>/dev/null | sed 's/^ *//' | sort | uniq -c | head -5 || true
