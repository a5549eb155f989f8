"""An on-disk cache of small numpy results (the digits split, partition indices) shared by processes.

Why: Flower's deployment engine starts a fresh ClientApp process for every message, and Ray's
simulation starts one per actor. Each would import scikit-learn and flwr-datasets (pandas, scipy)
and recompute the same digits split and the same partitions: about 2 s of CPU per process, most
of a small ClientApp message. The first process stores the arrays; later ones read them in
milliseconds. What is stored is exactly what the computation returned.

An entry's name is a hash of what decides its content: the inputs, the versions of the libraries that
compute it (numpy's among them: its random generators may change between releases) and the source of
the functions that compute it (:func:`source_fingerprint`), so an upgrade or an edit computes afresh. Entries are
written to a temporary file and renamed into place, so concurrent processes never read a half-written
one. An entry that cannot be read (truncated, corrupt: the zip members carry CRCs) or that the
caller's ``check`` rejects is recomputed and rewritten, and the reason is logged. A folder that
cannot be written (a read-only image) only costs the recomputation, logged once per process.

``AUTOFLIP_CACHE_DIR`` sets the folder (default ``$XDG_CACHE_HOME/autoflip`` or
``~/.cache/autoflip``); ``AUTOFLIP_CACHE_DIR=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
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


def source_fingerprint(*functions: Callable[..., Any]) -> str:
    """A hash of the functions' source code, for a cache key: editing them invalidates their entries."""
    digest = hashlib.sha256()
    for fn in functions:
        try:
            digest.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):  # no source shipped: the bytecode (then a new Python also recomputes)
            digest.update(fn.__code__.co_code)
    return digest.hexdigest()[:16]


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
    text = json.dumps({**key, "numpy": np.__version__}, sort_keys=True)
    try:
        folder = cache_dir()  # expanduser fails without a home directory
        path = None if folder is None else folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npz"
        stored = path is not None and path.exists()
    except (OSError, RuntimeError) as exc:
        _note_unusable_folder(str(exc), exc)
        path, stored = None, False
    if stored:
        try:
            arrays = _read(path, text)
            if check is not None:
                check(arrays)
            return arrays
        except Exception as exc:  # noqa: BLE001 (any unreadable entry is recomputed; the reason is logged)
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
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the entry from other users of a shared folder
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        _note_unusable_folder(str(path.parent), exc)


def _note_unusable_folder(where: str, exc: BaseException) -> None:
    """Log once per process and folder that the cache cannot be used there (each process then recomputes)."""
    if where not in _warned:
        _warned.add(where)
        log.info("array cache %s unusable (%s); recomputing in every process", where, exc)
