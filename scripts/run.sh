#!/usr/bin/env bash
# Install, then run the main job: AutoFLIP on the embedded digits dataset with 10 simulated clients.
# Extra arguments go to the launcher, e.g.  bash scripts/run.sh --run-config "strategy='fedavg'"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
exec .venv/bin/python -m runner.simulation --num-supernodes 10 --output-dir outputs "$@"
