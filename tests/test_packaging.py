"""The library installs alone into a user's environment: it keeps their flwr and brings no app packages.

Slow (a fresh venv and a pip install from the package index). torch is several GB, so the fresh venv
borrows this environment's site-packages through a ``.pth`` file placed after its own packages: what
the venv installs itself (flwr 1.42, the library) comes first on ``sys.path``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_library_installs_alone_next_to_flwr_1_42(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    Path(site, "zz_borrowed.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "flwr==1.42.0"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", str(REPO)], check=True, cwd=tmp_path)
    version = subprocess.check_output(
        [py, "-c", "import flwr, autoflip_strategy; print(flwr.__version__, autoflip_strategy.__file__)"],
        text=True, cwd=tmp_path).split()
    assert version[0] == "1.42.0" and version[1].startswith(site), version
    for app_package in ("server_app", "client_app", "autoflip_task"):
        found = subprocess.run([py, "-c", f"import {app_package}"], cwd=tmp_path, capture_output=True)
        assert found.returncode != 0, f"{app_package} is importable from the library install"
