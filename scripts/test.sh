#!/usr/bin/env bash
# Sets up, then runs the test suite: lint, unit, multi-host integration on namespaced hosts.
#   bash scripts/test.sh          the default tier (about 7 minutes)
#   bash scripts/test.sh --all    also the middleware tier: real HTCondor pools and BOINC clients (CI runs this)
# Other arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not middleware")
if [[ "${1:-}" == "--all" ]]; then
    tier=()
    shift
fi
bash scripts/setup.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -ra "${tier[@]}" "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $rc
