#!/usr/bin/env bash
# Sets up, then runs a demo grid of namespaced desktops on this machine (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bonjourgrid demo "$@"
