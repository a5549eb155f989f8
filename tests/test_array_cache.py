"""Tests for autoflip_task.array_cache and the loaders that use it (digits split, partitions)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from autoflip_task import array_cache as C
from autoflip_task import data as D


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(C.ENV_VAR, str(folder))
    D._load_cached.cache_clear()
    D._PARTITION_CACHE.clear()
    yield folder
    D._load_cached.cache_clear()
    D._PARTITION_CACHE.clear()


def _counting(arrays: dict[str, np.ndarray]):
    calls = []

    def compute():
        calls.append(1)
        return {k: v.copy() for k, v in arrays.items()}
    return compute, calls


def test_second_call_reads_what_the_first_stored(cache: Path) -> None:
    compute, calls = _counting({"a": np.arange(5), "b": np.ones((2, 3), np.float32)})
    first = C.cached_arrays({"k": 1}, compute)
    second = C.cached_arrays({"k": 1}, compute)
    assert calls == [1] and len(list(cache.glob("*.npz"))) == 1
    for name in ("a", "b"):
        assert np.array_equal(first[name], second[name]) and first[name].dtype == second[name].dtype
    C.cached_arrays({"k": 2}, compute)  # another key: computed and stored apart
    assert calls == [1, 1] and len(list(cache.glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_an_unreadable_entry_is_recomputed_logged_and_rewritten(cache: Path, damage: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    compute, calls = _counting({"a": np.arange(1000)})
    C.cached_arrays({"k": 1}, compute)
    (entry,) = cache.glob("*.npz")
    raw = entry.read_bytes()
    entry.write_bytes({"garbage": b"not a zip" * 10, "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        again = C.cached_arrays({"k": 1}, compute)
    assert calls == [1, 1] and np.array_equal(again["a"], np.arange(1000))
    assert "unusable" in caplog.text and entry.name in caplog.text
    assert C.cached_arrays({"k": 1}, compute)["a"].size == 1000 and calls == [1, 1]  # rewritten whole


def test_an_entry_the_check_rejects_is_recomputed(cache: Path) -> None:
    def check(arrays):
        if arrays["a"].max() > 10:
            raise ValueError("out of range")
    good, calls = _counting({"a": np.arange(5)})
    C.cached_arrays({"k": 1}, good, check)
    bad, _ = _counting({"a": np.arange(50)})
    (entry,) = cache.glob("*.npz")
    C._write(entry, C.json.dumps({"k": 1}, sort_keys=True), bad())  # what a broken writer would leave
    assert np.array_equal(C.cached_arrays({"k": 1}, good, check)["a"], np.arange(5)) and calls == [1, 1]


def test_a_check_that_rejects_the_computation_itself_fails_loudly(cache: Path) -> None:
    def check(arrays):
        raise ValueError("never right")
    with pytest.raises(ValueError, match="never right"):
        C.cached_arrays({"k": 1}, lambda: {"a": np.arange(3)}, check)
    assert not list(cache.glob("*.npz"))


def test_off_and_unwritable_folders_only_cost_the_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(C.ENV_VAR, "off")
    compute, calls = _counting({"a": np.arange(3)})
    C.cached_arrays({"k": 1}, compute)
    C.cached_arrays({"k": 1}, compute)
    assert calls == [1, 1] and C.cache_dir() is None
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(C.ENV_VAR, str(blocker / "cache"))
    assert np.array_equal(C.cached_arrays({"k": 1}, compute)["a"], np.arange(3)) and calls == [1, 1, 1]


def test_cached_digits_split_is_scikit_learns_split(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = D._split_digits(3)
    D._load_digits(3)  # computes and stores
    import sklearn.model_selection

    monkeypatch.setattr(sklearn.model_selection, "train_test_split",
                        lambda *a, **k: pytest.fail("the stored split was not used"))
    stored = D._load_digits(3)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        got = getattr(stored, name).numpy()
        assert got.dtype == fresh[name].dtype and np.array_equal(got, fresh[name])


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "pathological"])
def test_cached_partitions_are_the_partitioners_own(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                    partitioning: str) -> None:
    data = D.load_federated_data("digits")
    fresh = D._compute_partitions(data, 7, partitioning, 0.3, 2, 1)
    first = D.partition_indices(data, 7, partitioning, seed=1)
    D._PARTITION_CACHE.clear()  # as in a fresh process
    import datasets

    monkeypatch.setattr(datasets.Dataset, "from_dict",
                        lambda *a, **k: pytest.fail("the stored partitions were not used"))
    second = D.partition_indices(data, 7, partitioning, seed=1)
    for parts in (first, second):
        assert len(parts) == 7
        for got, want in zip(parts, fresh):
            assert np.array_equal(got, want) and got.dtype == np.int64 and not got.flags.writeable


def test_overlapping_stored_partitions_are_rejected() -> None:
    arrays = {"indices": np.array([0, 1, 1, 2]), "offsets": np.array([0, 2, 4])}
    with pytest.raises(ValueError, match="distinct"):
        D._check_partitions(arrays, 2, 10)
    with pytest.raises(ValueError, match="offsets"):
        D._check_partitions({"indices": np.arange(4), "offsets": np.array([0, 3])}, 2, 10)


def test_a_folder_that_cannot_be_resolved_only_costs_the_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(C, "cache_dir", no_home)
    assert np.array_equal(C.cached_arrays({"k": 1}, lambda: {"a": np.arange(3)})["a"], np.arange(3))


def test_the_key_covers_numpy_and_the_computing_code(cache: Path) -> None:
    def one():
        return 1

    def two():
        return 2
    assert C.source_fingerprint(one) != C.source_fingerprint(two)
    assert C.source_fingerprint(one) == C.source_fingerprint(one)
    C.cached_arrays({"k": 1}, lambda: {"a": np.arange(3)})
    (entry,) = cache.glob("*.npz")
    with np.load(entry) as stored:
        assert f'"numpy": "{np.__version__}"' in str(stored["__key__"])
