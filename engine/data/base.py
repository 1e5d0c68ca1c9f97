"""Rows ``{sample_id:int64, image:uint8 HWC, label:int64}``: in memory and as partitions."""
from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from engine.errors import ConfigError, DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataInfo:
    """What models and normalisation need to know about a source."""

    spec: str                            # the spec string the source was built from
    num_classes: int
    image_shape: Tuple[int, int, int]    # (H, W, C)
    mean: Tuple[float, ...]              # per channel, pixel units in [0, 1]
    std: Tuple[float, ...]
    class_names: Optional[Tuple[str, ...]] = None
    train_transform: str = "none"        # the source's default training transform (engine.data.transforms)
    eval_transform: Optional[str] = None  # how images of any size were brought to image_shape; None: stored so


@dataclass
class ArraySplit:
    """One split in memory: ids int64 [N] (unique), images uint8 [N, H, W, C], labels int64 [N]."""

    sample_id: np.ndarray
    image: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_id)

    def subset(self, ids: np.ndarray) -> "ArraySplit":
        """Rows whose sample_id is in ``ids``, in the order of ``ids``; DataError if any is absent."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self):  # nothing to look up in (searchsorted would index an empty array)
            rows, absent = np.zeros(0, np.int64), ids
        else:
            order = np.argsort(self.sample_id, kind="stable")
            pos = np.clip(np.searchsorted(self.sample_id, ids, sorter=order), 0, len(order) - 1)
            rows = order[pos]
            absent = ids[self.sample_id[rows] != ids]
        if len(absent):
            raise DataError(f"{len(absent)} sample_id(s) are absent from the data, e.g. {absent[:5].tolist()}")
        return ArraySplit(self.sample_id[rows], self.image[rows], self.label[rows])

    def batches(self, batch_size: int) -> Iterator[dict]:
        """Dict batches of numpy arrays, in row order."""
        for i in range(0, len(self), batch_size):
            yield {"sample_id": self.sample_id[i:i + batch_size], "image": self.image[i:i + batch_size],
                   "label": self.label[i:i + batch_size]}


class StreamedSplit:
    """A split read one partition at a time: what evaluation needs of an ``ArraySplit``
    (``len``, ``batches``, ``head``) in memory bounded by a partition, whatever the split's size."""

    def __init__(self, source: "Source", split: str, target_rows: int = 1024):
        self.source, self.split, self.target_rows = source, split, target_rows

    def __len__(self) -> int:
        return self.source.num_rows(self.split)

    def batches(self, batch_size: int) -> Iterator[dict]:
        for part in self.source.partitions(self.split, self.target_rows):
            for block in part.read():
                yield from ArraySplit(block["sample_id"], block["image"], block["label"]).batches(batch_size)

    def head(self, n: Optional[int]) -> ArraySplit:
        """The first ``n`` rows (all if None or 0) in memory."""
        got, rows = [], 0
        for b in self.batches(1024):
            got.append(b)
            rows += len(b["sample_id"])
            if n and rows >= n:
                break
        h, w, c = self.source.info().image_shape
        if not got:
            return ArraySplit(np.zeros(0, np.int64), np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64))
        whole = ArraySplit(*(np.concatenate([b[k] for b in got]) for k in ("sample_id", "image", "label")))
        return whole if not n else ArraySplit(whole.sample_id[:n], whole.image[:n], whole.label[:n])


class Partition(abc.ABC):
    """A picklable piece of a split that can be read on any node (one Ray Data read task)."""

    num_rows: int

    @abc.abstractmethod
    def read(self) -> Iterator[dict]:
        """Yield dict batches ``{"sample_id", "image", "label"}`` of numpy arrays."""


@dataclass(frozen=True)
class ArrayPartition(Partition):
    """Rows already in memory (small data): the arrays travel with the task."""

    rows: ArraySplit

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return len(self.rows)

    def read(self) -> Iterator[dict]:
        yield from self.rows.batches(max(len(self.rows), 1))


class Source(abc.ABC):
    """A dataset with a train and a test split."""

    spec: str

    @abc.abstractmethod
    def info(self) -> DataInfo: ...

    @abc.abstractmethod
    def num_rows(self, split: str) -> int: ...

    @abc.abstractmethod
    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        """Pieces covering every row of ``split`` exactly once."""

    def partitions_in_order(self, split: str, order: np.ndarray, target_rows: int = 8192) -> Optional[list]:
        """Partitions whose rows, read one after the other, are ``split``'s rows in the order of
        the positions ``order`` (into ``ids_and_labels(split)``), each partition holding only its
        own rows' descriptions; or None when the source cannot read rows in any order cheaply
        (rows in row groups or tar shards, read a whole group at a time). A source of one file
        per image can: a proxy's pass then reads its split in its own order without a Ray Data
        sort, whose all-to-all exchange grows the memory of the process running it with the
        data (BENCHMARKS.md, issue 31). Default: None."""
        return None

    def content_key(self) -> str:
        """What the rows of the training split depend on besides the spec: file names, sizes
        and modification times for file-backed sources, the generator's version for synthetic
        data. Resumable work (the scoring shards) is keyed by it, so data changed in place is
        scored afresh instead of being stitched to stale shards. Default: the spec."""
        return self.spec

    def augment(self, images: np.ndarray, sample_ids: np.ndarray, transform: str, seed: int,
                epoch: int) -> np.ndarray:
        """Training transform ``transform`` for the rows ``sample_ids`` of the training split
        whose stored (or evaluation-transformed) images are ``images`` (uint8 [B, H, W, C]):
        uint8 [B, H, W, C], every draw from ``sample_rng(seed, epoch, sample_id)``. Default:
        on the images given (``augment_batch``); a source of images of any size overrides it
        where the transform must see the decoded original (``rrc-flip``)."""
        from engine.data.transforms import augment_batch

        return augment_batch(images, sample_ids, transform, seed, epoch)

    def ids_and_labels(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
        """(sample_id int64 [N], label int64 [N]) of ``split`` in row order, without decoding
        any image where the source can (listings, Parquet columns, tar member names): what
        manifest checks, counts and resumes need. Default: from the rows in memory."""
        rows = self.arrays(split)
        return rows.sample_id, rows.label

    def sample_ids(self, split: str) -> np.ndarray:
        """The sample ids of ``split`` in row order (``ids_and_labels``)."""
        return self.ids_and_labels(split)[0]

    def rows_of(self, split: str, ids: np.ndarray) -> ArraySplit:
        """The rows ``ids`` of ``split`` (in the order of ``ids``; DataError naming any that is
        absent), decoding only those where the source can. Default: from the rows in memory."""
        return self.arrays(split).subset(ids)

    def arrays(self, split: str) -> ArraySplit:
        """The whole split in memory (small data). Default: read every partition."""
        parts = [b for p in self.partitions(check_split(split)) for b in p.read()]
        h, w, c = self.info().image_shape
        if not parts:
            return ArraySplit(np.zeros(0, np.int64), np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64))
        return ArraySplit(*(np.concatenate([b[k] for b in parts]) for k in ("sample_id", "image", "label")))


class InMemorySource(Source):
    """A source whose splits are loaded once into memory (embedded, IDX, digits)."""

    def __init__(self, spec: str):
        self.spec = spec
        self._splits: dict = {}

    @abc.abstractmethod
    def _load(self, split: str) -> ArraySplit: ...

    def arrays(self, split: str) -> ArraySplit:
        split = check_split(split)
        if split not in self._splits:
            rows = self._load(split)
            validate_rows(rows.sample_id, rows.label, self.info().num_classes, f"{self.spec} {split}")
            self._splits[split] = rows
        return self._splits[split]

    def num_rows(self, split: str) -> int:
        return len(self.arrays(split))

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        rows = self.arrays(split)
        return [ArrayPartition(ArraySplit(rows.sample_id[i:i + target_rows], rows.image[i:i + target_rows],
                                          rows.label[i:i + target_rows]))
                for i in range(0, len(rows), target_rows)]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return split


def validate_rows(sample_id: np.ndarray, label: np.ndarray, num_classes: int, where: str) -> None:
    """DataError if ids are not unique int64 or labels are not int64 in [0, num_classes)."""
    sample_id, label = np.asarray(sample_id), np.asarray(label)
    if sample_id.ndim != 1 or label.shape != sample_id.shape:
        raise DataError(f"{where}: sample_id {sample_id.shape} and label {label.shape} must be 1-d of equal length")
    if sample_id.dtype.kind not in "iu" or label.dtype.kind not in "iu":
        raise DataError(f"{where}: sample_id and label must be integers, got {sample_id.dtype} and {label.dtype}")
    uniq, counts = np.unique(sample_id, return_counts=True)
    if len(uniq) != len(sample_id):
        raise DataError(f"{where}: duplicate sample_id {int(uniq[counts > 1][0])}")
    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: label {int(label[i])} of sample_id {int(sample_id[i])} is outside [0, {num_classes})")


def check_classes(labels: np.ndarray, num_classes: int, where: str, names: Optional[Sequence[str]] = None) -> None:
    """Before anything is sized by the number of classes (a model's last layer, per-class
    quotas): the labels number the classes 0..K-1 and every class has a sample. A label of
    10**9 among ten classes is refused here, not by a 4 TB allocation later; an empty class
    (which no per-class selection or evaluation can serve) too. ``np.unique``: memory of the
    labels' size, never of the largest label."""
    labels = np.asarray(labels)
    if not len(labels):
        raise DataError(f"{where}: no rows")
    if labels.min() < 0:
        raise DataError(f"{where}: negative label {int(labels.min())}")
    if names and labels.max() >= len(names):
        raise DataError(f"{where}: label {int(labels.max())} is outside the {len(names)} class names")
    present = np.unique(labels)
    if len(present) < num_classes:
        gaps = np.flatnonzero(present != np.arange(len(present)))
        first = int(gaps[0]) if len(gaps) else len(present)
        name = f" ({names[first]!r})" if names and first < len(names) else ""
        raise DataError(f"{where}: {num_classes - len(present):,} of its {num_classes:,} classes have no sample, "
                        f"e.g. class {first}{name} (the largest label is {int(labels.max()):,}); labels must number "
                        f"the classes 0..K-1, every class with samples")


def stable_id(key: str) -> int:
    """A 63-bit non-negative int64 from blake2b(key): ids derived from file names and rows."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def in_holdout(sample_id: np.ndarray, percent: int = 10) -> np.ndarray:
    """Deterministic test holdout: True for ids whose hash falls in the lowest ``percent``%."""
    h = np.array([stable_id(f"holdout:{int(i)}") % 100 for i in np.asarray(sample_id)], dtype=np.int64)
    return h < percent


def files_key(spec: str, stats: Iterable[tuple]) -> str:
    """``spec`` plus a digest of (name, size, mtime_ns) of each file: a cheap identity of
    file-backed data (``Source.content_key``)."""
    h = hashlib.sha256()
    n = 0
    for name, size, mtime in stats:
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
        n += 1
    return f"{spec};files={n};{h.hexdigest()[:16]}"
