#!/usr/bin/env bash
# The README's test command: set up (system packages, venv) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" dev
venv="${INSPECTD_VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
