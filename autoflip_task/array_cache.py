"""An on-disk cache of small numpy results (the digits split, partition indices) shared by processes.

Why: Flower's deployment engine starts a fresh ClientApp process for every message, and Ray's
simulation starts one per actor. Each would import scikit-learn and flwr-datasets (pandas, scipy)
and recompute the same digits split and the same partitions: about 2 s of CPU per process, most
of a small ClientApp message. The first process stores the arrays; later ones read them in
milliseconds. What is stored is exactly what the computation returned.

An entry's name is a hash of everything that decides its content (the inputs and the versions of
the libraries that compute it), so a new scikit-learn or flwr-datasets computes afresh. Entries are
written to a temporary file and renamed into place, so concurrent processes never read a half-written
one. An entry that cannot be read (truncated, corrupt: the zip members carry CRCs) or that the
caller's ``check`` rejects is recomputed and rewritten, and the reason is logged. A folder that
cannot be written (a read-only image) only costs the recomputation, logged once per process.

``AUTOFLIP_CACHE_DIR`` sets the folder (default ``$XDG_CACHE_HOME/autoflip`` or
``~/.cache/autoflip``); ``AUTOFLIP_CACHE_DIR=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
ENV_VAR = "AUTOFLIP_CACHE_DIR"
_KEY = "__key__"
_warned: set[str] = set()

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path | None:
    """The cache folder, or None when ``AUTOFLIP_CACHE_DIR=off``."""
    configured = os.environ.get(ENV_VAR, "")
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "autoflip"


def library_version(distribution: str) -> str:
    """The installed version of ``distribution`` (read from its metadata: nothing is imported)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def cached_arrays(key: Mapping[str, Any], compute: Callable[[], Arrays],
                  check: Callable[[Arrays], None] | None = None) -> Arrays:
    """``compute()``, or what an earlier process stored under ``key`` (JSON-serialisable values).

    ``check(arrays)`` raises ValueError when stored arrays are not what ``compute`` would give (wrong
    shapes, values out of range); they are then recomputed. Computed arrays are checked too, so a
    ``check`` that disagrees with ``compute`` fails loudly instead of recomputing forever.
    """
    folder = cache_dir()
    text = json.dumps(dict(key), sort_keys=True)
    path = None if folder is None else folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npz"
    if path is not None and path.exists():
        try:
            arrays = _read(path, text)
            if check is not None:
                check(arrays)
            return arrays
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("cache entry %s for %s is unusable (%s: %s); recomputing", path.name, text,
                        type(exc).__name__, exc)
    arrays = compute()
    if check is not None:
        check(arrays)
    if path is not None:
        _write(path, text, arrays)
    return arrays


def _read(path: Path, text: str) -> Arrays:
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    if str(arrays.pop(_KEY, "")) != text:
        raise ValueError("the entry was stored under another key")
    return arrays


def _write(path: Path, text: str, arrays: Arrays) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{_KEY: np.array(text)}, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        if str(path.parent) not in _warned:
            _warned.add(str(path.parent))
            log.info("array cache %s not writable (%s); recomputing in every process", path.parent, exc)
