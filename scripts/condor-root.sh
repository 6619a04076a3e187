#!/usr/bin/env bash
# Builds (once) and caches a Debian trixie root filesystem holding HTCondor's daemons.
# Debian bookworm ships no condor daemons; trixie's run here in a chroot (docs/backends/condor.md).
# Usage: scripts/condor-root.sh [ROOT]; prints ROOT on success. Needs root.
set -euo pipefail
ROOT=${1:-${BONJOURGRID_CONDOR_ROOT:-/var/cache/bonjourgrid/condor-trixie}}
# The daemons run as this unprivileged user of the root (Condor refuses jobs owned by root or by
# its own `condor` account, so a pool run by `condor` could not take jobs from itself).
add_user() { grep -q '^bonjourgrid:' "$1/etc/passwd" || chroot "$1" useradd --system --user-group \
  --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin bonjourgrid; }
if [ -f "$ROOT/.bonjourgrid-complete" ]; then
  [ "$(id -u)" != 0 ] || add_user "$ROOT"
  echo "$ROOT"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "condor-root: must run as root to build $ROOT" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# The Debian mirror apt already uses on this machine (deb822 sources first, then sources.list).
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
if [ -z "$mirror" ]; then
  mirror=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -v security | head -n1 || true)
fi
if [ -z "$mirror" ]; then
  echo "condor-root: no Debian mirror found in apt's sources" >&2
  exit 1
fi

tmp="$ROOT.partial"
cleanup() { umount "$tmp/proc" 2>/dev/null || true; }
trap cleanup EXIT
umount "$tmp/proc" 2>/dev/null || true
mkdir -p "$(dirname "$ROOT")"
if [ ! -x "$tmp/usr/sbin/condor_master" ]; then  # a partial root with the packages unpacked is resumed
  rm -rf "$tmp"
  # debootstrap fails configuring python3-cryptography (--include misses a dependency): fixed just below.
  debootstrap --variant=minbase --include=condor,python3 trixie "$tmp" "$mirror" >&2 \
    || echo "condor-root: debootstrap reported errors; completing the install in the root" >&2
fi
# --include leaves python3-cryptography unconfigured: finish the install inside the root.
mount -t proc proc "$tmp/proc"
cp /etc/resolv.conf "$tmp/etc/resolv.conf"
chroot "$tmp" apt-get -f install -y -qq python3-cffi-backend >&2
chroot "$tmp" dpkg --configure -a >&2
chroot "$tmp" apt-get clean
umount "$tmp/proc"
add_user "$tmp"
chroot "$tmp" /usr/sbin/condor_master -version >&2
touch "$tmp/.bonjourgrid-complete"
rm -rf "$ROOT"
mv "$tmp" "$ROOT"
echo "$ROOT"
