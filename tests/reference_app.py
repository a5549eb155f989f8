"""Copies of the reference app with one component replaced, for tests that run a misbehaving app."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_reference_app(folder: Path, **components: str) -> Path:
    """The reference app in ``folder``, its components replaced (``clientapp="faulty_client:app"``).

    The copy ships every file of ``folder`` (the reference app's ``fab-include`` would leave out the
    replacing module), and the packages the reference app imports that are not installed."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    for kind, target in components.items():
        pyproject, n = re.subn(rf'{kind} = "[^"]+"', f'{kind} = "{target}"', pyproject)
        assert n == 1, f"no {kind} in pyproject.toml"
    pyproject, n = re.subn(r"\nfab-include = \[[^\]]*\]\n", "\n", pyproject)
    assert n == 1, "no fab-include in pyproject.toml"
    (folder / "pyproject.toml").write_text(pyproject)
    shutil.copy(ROOT / "README.md", folder / "README.md")
    for package in ("server_app", "client_app", "autoflip_task"):
        shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder
