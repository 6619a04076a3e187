#!/bin/sh
# Runs an HTCondor command inside a Debian root filesystem holding the daemons (scripts/condor-root.sh),
# as that root's unprivileged `bonjourgrid` user (made by condor-root.sh; Condor refuses jobs owned by
# root or by `condor`).
# Usage: BONJOURGRID_CONDOR_BIND=dir[:dir...] condor-chroot.sh ROOT CMD [ARG...]
# A private mount namespace holds the bind mounts: they vanish with the daemons, and the
# cached root gets a fresh /tmp each time. Use as BONJOURGRID_CONDOR_PREFIX="condor-chroot.sh ROOT".
set -eu
ROOT=$1
shift
exec unshare --mount --propagation private -- sh -eu -c '
  root=$1; shift
  mount -t proc proc "$root/proc"
  mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
  mount --bind /dev "$root/dev"
  uid=$(chroot "$root" id -u bonjourgrid); gid=$(chroot "$root" id -g bonjourgrid)
  old_ifs=$IFS; IFS=:
  for d in ${BONJOURGRID_CONDOR_BIND:-}; do
    [ -n "$d" ] || continue
    mkdir -p "$root$d"
    mount --bind "$d" "$root$d"
    chown -R "$uid:$gid" "$d"
  done
  IFS=$old_ifs
  exec chroot --userspec="$uid:$gid" "$root" "$@"
' sh "$ROOT" "$@"
