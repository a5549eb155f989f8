"""The Docker deployment for real: docker/test-compose.sh end to end (marker `docker`).

Not in the default run (it takes minutes): `python -m pytest -m docker -s tests/test_docker_compose.py`.
The script builds the images, starts the compose federation with TLS and SuperNode
authentication, submits a short AutoFLIP run with `flwr run` from the host, checks
that a SuperNode with an unregistered key is refused, and times one capped client
dense vs pruned. This test runs it and checks what it reports. It is skipped, with
the reason, where no Docker engine can be reached or started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docker" / "test-compose.sh"
INSTALL = "apt-get install -y docker.io docker-compose debootstrap"


def engine_unavailable() -> str | None:
    """Why the script cannot get a Docker engine here (None: it can)."""
    if not shutil.which("docker"):
        return f"no docker CLI ({INSTALL})"
    if not (shutil.which("docker-compose") or subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0):
        return f"no docker compose ({INSTALL})"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        return None
    if not shutil.which("dockerd"):
        return f"no Docker engine answers and dockerd is not installed ({INSTALL})"
    if os.geteuid() != 0:
        return "no Docker engine answers and starting a private dockerd needs root"
    if os.environ.get("AUTOFLIP_BASE", "local") == "local" and not shutil.which("debootstrap"):
        return f"the local base image needs debootstrap ({INSTALL})"
    return None


def table_rows(out: str) -> dict[str, list[str]]:
    """The timing table's rows by strategy name."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and re.fullmatch(r"[\d.]+", cells[2]):
            rows[cells[0]] = cells
    return rows


def test_compose_federation_with_tls_auth_pruning_and_capped_clients():
    reason = engine_unavailable()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PYTHON=sys.executable,
               FLWR=str(Path(sys.executable).parent / "flwr"))
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=3600)
    out = res.stdout + res.stderr
    print(out)
    assert res.returncode == 0, out[-8000:]
    assert "E2E OK AutoFLIP over TLS" in out
    assert "E2E OK unregistered SuperNode refused" in out
    assert "ALL CHECKS PASSED" in out
    if os.environ.get("TIMING_ROUNDS", "3") != "0":
        rows = table_rows(out)
        assert set(rows) == {"FedAvg (dense)", "AutoFLIP default", "AutoFLIP structured 0.5"}, rows
        assert float(rows["FedAvg (dense)"][2]) == 1.0
        assert float(rows["AutoFLIP default"][2]) < 1.0
        assert float(rows["AutoFLIP structured 0.5"][2]) < 1.0
        assert all(float(r[3]) > 0 for r in rows.values())
