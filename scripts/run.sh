#!/usr/bin/env bash
# Install, then run the main job: AutoFLIP on the embedded digits dataset with 10 simulated clients.
# Extra arguments go to the launcher, e.g.  bash scripts/run.sh --run-config "strategy='fedavg'"
# Relative paths you pass (data-dir, --output-dir) are taken from the folder you run this from;
# results go to <repo>/outputs unless you pass --output-dir. Exits non-zero unless the run completed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
bash "$REPO/scripts/install.sh"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$REPO/.venv/bin/python" -m runner.simulation --num-supernodes 10 --output-dir "$REPO/outputs" "$@"
