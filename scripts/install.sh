#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the reference app's and the tests' extras.
# Skipped when .venv already holds an install made from this very pyproject.toml (the stamp file),
# so `scripts/run.sh` with a bad option fails in seconds; set FORCE_INSTALL=1 to reinstall anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=.venv/.autoflip-install-stamp
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "${FORCE_INSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && .venv/bin/python -c "import importlib.util as u; assert u.find_spec('flwr') and u.find_spec('autoflip_strategy')" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[app,test]"
echo "$WANT" > "$STAMP"
