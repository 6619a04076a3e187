#!/usr/bin/env bash
# Sets up everything BonjourGrid needs on this machine, idempotently:
# Debian packages (when root), then a virtualenv in .venv with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 mosquitto docker.io busybox-static boinc-client strace)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # The packaged services are started by the tests themselves, on loopback and in namespaces only.
  systemctl disable --now mosquitto >/dev/null 2>&1 || true
  systemctl disable --now boinc-client >/dev/null 2>&1 || true  # workers run their own, unprivileged
else
  echo "setup: not root: skipping Debian packages (${APT_PACKAGES[*]}); namespaced tests will be skipped"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
mkdir -p .cache
# Backend plugins are their own packages (the HTCondor daemons come from scripts/condor-root.sh).
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test]' \
    && .venv/bin/python -m pip install -q -e backends/boinc -e backends/condor; } \
    >.cache/pip-install.log 2>&1; then
  tail -n 30 .cache/pip-install.log
  echo "setup: pip install failed (full log: .cache/pip-install.log)" >&2
  exit 1
fi
# An editable install leaves our own modules uncompiled, and with PYTHONDONTWRITEBYTECODE set
# (as on the CI machine) every command and daemon would compile them again: ~30 ms a command.
.venv/bin/python -m compileall -q bonjourgrid backends/boinc backends/condor
.venv/bin/python -c "import bonjourgrid, zeroconf, paho.mqtt, typer; print('setup: ok, bonjourgrid', bonjourgrid.__version__)"
