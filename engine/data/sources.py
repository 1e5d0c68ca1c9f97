"""The dataset registry's entries: embedded mini, Fashion-MNIST IDX, digits, synthetic."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from engine.data.base import (
    ArraySplit,
    DataInfo,
    InMemorySource,
    Partition,
    Source,
    check_split,
    files_key,
    validate_rows,
)
from engine.data.idx import FASHION_CLASSES, find_idx, read_idx_split
from engine.errors import ConfigError, DataError
from engine.registry import Registry

DATASETS: Registry = Registry("dataset")
EMBEDDED = Path(__file__).resolve().parent / "embedded"
MINI_FILE = EMBEDDED / "fashion_mnist_mini.npz"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
# Fashion-MNIST train-set pixel statistics (0.2860 mean, 0.3530 std in [0, 1] units).
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
# Sources with unknown statistics normalise to roughly zero mean, unit-ish variance.
GENERIC_MEAN, GENERIC_STD = 0.5, 0.25


def load_source(spec: str) -> Source:
    """``"name"``, ``"name:argument"`` or ``"name,key=value,...:argument"`` -> a Source (lazy:
    reads metadata, not images). Options are those the source's class lists in ``OPTIONS``
    (name -> type), e.g. ``imagefolder,size=224:/data/imagenet``; the whole spec, options
    included, is what travels to Ray workers and into provenance."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--data: give a data source spec, e.g. fashion-mnist-mini")
    name, pairs, arg = _split_spec(spec)
    cls = DATASETS[name]
    known = getattr(cls, "OPTIONS", {})
    opts = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in known:
            raise ConfigError(f"--data {spec!r}: {pair!r} is not an option of {name!r} "
                              f"({', '.join(f'{k}=...' for k in known) or 'it takes none'})")
        try:
            opts[key] = known[key](value)
        except ValueError:
            raise ConfigError(f"--data {spec!r}: option {key}={value!r} is not a {known[key].__name__}") from None
    return cls(arg or None, **opts) if opts else cls(arg or None)


def _split_spec(spec: str) -> tuple:
    """``"name,key=value,...:argument"`` -> (name, ["key=value", ...], argument or "")."""
    head, _, arg = str(spec).strip().partition(":")
    name, *pairs = head.split(",")
    return name, pairs, arg


def with_options(spec: str, flag: str, **options) -> str:
    """``spec`` with ``options`` set (replacing the spec's own), for flags such as
    ``--bad-images`` that map to a source option; ConfigError naming ``flag`` if the source
    takes no such option. ``None`` values are left out."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return spec
    name, pairs, arg = _split_spec(spec)
    known = getattr(DATASETS[name], "OPTIONS", {})
    for key in options:
        if key not in known:
            takers = sorted(n for n in DATASETS.names() if key in getattr(DATASETS[n], "OPTIONS", {}))
            raise ConfigError(f"{flag} applies to {', '.join(f'{n}:' for n in takers)} sources, not {name!r}")
    kept = [pair for pair in pairs if pair.partition("=")[0] not in options]
    head = ",".join([name, *kept, *(f"{k}={v}" for k, v in options.items())])
    return f"{head}:{arg}" if arg else head


class FashionMnistMini(InMemorySource):
    """The embedded default: 600 train and 100 test images per class of Fashion-MNIST, cut by
    ``python -m engine.data.make_mini``; sample ids are the original Fashion-MNIST indices."""

    def __init__(self, arg: Optional[str]):
        if arg:
            raise ConfigError(f"fashion-mnist-mini takes no argument, got {arg!r}")
        super().__init__("fashion-mnist-mini")

    def info(self) -> DataInfo:
        return DataInfo(self.spec, 10, (28, 28, 1), FASHION_MEAN, FASHION_STD, FASHION_CLASSES)

    def _load(self, split: str) -> ArraySplit:
        with np.load(MINI_FILE) as z:
            return ArraySplit(z[f"{split}_id"].astype(np.int64), z[f"{split}_image"], z[f"{split}_label"].astype(np.int64))


class FashionMnist(InMemorySource):
    """The full 60,000 / 10,000 Fashion-MNIST from IDX files; sample_id = index in the file."""

    def __init__(self, arg: Optional[str]):
        self.directory = Path(arg or FASHION_DIR)
        if not self.directory.is_dir():
            raise DataError(f"fashion-mnist: directory {str(self.directory)!r} does not exist "
                            "(install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR)")
        super().__init__(f"fashion-mnist:{self.directory}")

    def info(self) -> DataInfo:
        return DataInfo(self.spec, 10, (28, 28, 1), FASHION_MEAN, FASHION_STD, FASHION_CLASSES)

    def content_key(self) -> str:
        files = [find_idx(self.directory, "train", kind) for kind in ("images", "labels")]
        return files_key(self.spec, ((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))

    def _load(self, split: str) -> ArraySplit:
        images, labels = read_idx_split(self.directory, split)
        return ArraySplit(np.arange(len(labels), dtype=np.int64), images, labels)


class Digits(InMemorySource):
    """scikit-learn's 8x8 digits (1,797 images), values 0..16 scaled to 0..255; a fixed
    stratified 80/20 split; sample_id = index in ``load_digits``."""

    def __init__(self, arg: Optional[str]):
        if arg:
            raise ConfigError(f"digits takes no argument, got {arg!r}")
        super().__init__("digits")

    def info(self) -> DataInfo:
        return DataInfo(self.spec, 10, (8, 8, 1), (GENERIC_MEAN,), (GENERIC_STD,), tuple(map(str, range(10))))

    def _load(self, split: str) -> ArraySplit:
        images, labels, test_mask = _digits()
        keep = test_mask if split == "test" else ~test_mask
        ids = np.flatnonzero(keep).astype(np.int64)
        return ArraySplit(ids, images[keep], labels[keep])


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for c in range(10):  # stratified: 20% of each class
        members = np.flatnonzero(labels == c)
        test[rng.choice(members, int(round(0.2 * len(members))), replace=False)] = True
    return images, labels, test


SYNTH_CHUNK = 4096
SYNTH_CLASSES = 10
SYNTH_GENERATOR = "rng([chunk,split])-labels-then-raw64"  # change when the bytes drawn change


@dataclass(frozen=True)
class SyntheticPartition(Partition):
    """Chunks [first, last) of a synthetic split; chunk c is drawn from default_rng([c, split_code]):
    its labels with ``integers``, then its image bytes as the bit generator's raw 64-bit words."""

    first_chunk: int
    last_chunk: int
    rows: int                  # rows in the whole split
    id_offset: int
    split_code: int
    shape: tuple

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return min(self.last_chunk * SYNTH_CHUNK, self.rows) - self.first_chunk * SYNTH_CHUNK

    def labels(self) -> Iterator[tuple]:
        """(sample ids, labels) of each chunk, drawing no image bytes (labels are drawn first)."""
        for c in range(self.first_chunk, self.last_chunk):
            start, stop = c * SYNTH_CHUNK, min((c + 1) * SYNTH_CHUNK, self.rows)
            label = np.random.default_rng([c, self.split_code]).integers(0, SYNTH_CLASSES, stop - start)
            yield np.arange(start, stop, dtype=np.int64) + self.id_offset, label.astype(np.int64)

    def read(self) -> Iterator[dict]:
        for c in range(self.first_chunk, self.last_chunk):
            start, stop = c * SYNTH_CHUNK, min((c + 1) * SYNTH_CHUNK, self.rows)
            rng = np.random.default_rng([c, self.split_code])
            n = stop - start
            label = rng.integers(0, SYNTH_CLASSES, n).astype(np.int64)
            # uniform bytes straight from the bit generator (about 3x faster than
            # rng.integers(0, 256, dtype=uint8), which read tasks feeding a GPU notice)
            size = n * int(np.prod(self.shape))
            raw = rng.bit_generator.random_raw(-(-size // 8)).astype("<u8", copy=False)
            yield {"sample_id": np.arange(start, stop, dtype=np.int64) + self.id_offset,
                   "label": label, "image": raw.view(np.uint8)[:size].reshape(n, *self.shape)}


class Synthetic(Source):
    """``synthetic:N[,HxW[,C]]``: N random train images (default 32x32x3), 10 classes, and a
    test split of min(10000, max(100, N//10)) rows with ids from N. Generated lazily in fixed
    chunks, so scale tests never hold the whole set."""

    def __init__(self, arg: Optional[str]):
        m = re.fullmatch(r"\s*(\d+)\s*(?:,\s*(\d+)x(\d+)\s*(?:,\s*(\d+)\s*)?)?", arg or "")
        if not m or int(m.group(1)) < 1:
            raise ConfigError(f"synthetic spec must be synthetic:N[,HxW[,C]] with N >= 1, got {arg!r}")
        self.n = int(m.group(1))
        h, w, c = int(m.group(2) or 32), int(m.group(3) or 32), int(m.group(4) or 3)
        if min(h, w, c) < 1 or c > 4:
            raise ConfigError(f"synthetic image shape {h}x{w}x{c} is invalid (C must be 1..4)")
        self.shape = (h, w, c)
        self.spec = f"synthetic:{self.n},{h}x{w},{c}"

    def info(self) -> DataInfo:
        c = self.shape[2]
        return DataInfo(self.spec, SYNTH_CLASSES, self.shape, (GENERIC_MEAN,) * c, (GENERIC_STD,) * c)

    def content_key(self) -> str:
        return f"{self.spec};generator={SYNTH_GENERATOR}"

    def num_rows(self, split: str) -> int:
        return self.n if check_split(split) == "train" else min(10000, max(100, self.n // 10))

    def ids_and_labels(self, split: str) -> tuple:
        pairs = [pair for p in self.partitions(split) for pair in p.labels()]
        return tuple(np.concatenate([pair[k] for pair in pairs]) for k in (0, 1))

    def rows_of(self, split: str, ids: np.ndarray) -> ArraySplit:
        """Only the chunks that hold ``ids`` are drawn."""
        ids = np.asarray(ids, dtype=np.int64)
        offset = 0 if check_split(split) == "train" else self.n
        chunks = np.unique((ids - offset) // SYNTH_CHUNK)
        rows, code = self.num_rows(split), 0 if split == "train" else 1
        parts = [SyntheticPartition(int(c), int(c) + 1, rows, offset, code, self.shape)
                 for c in chunks if 0 <= c * SYNTH_CHUNK < rows]
        got = [b for p in parts for b in p.read()]
        h, w, ch = self.shape
        if not got:
            return ArraySplit(np.zeros(0, np.int64), np.zeros((0, h, w, ch), np.uint8),
                              np.zeros(0, np.int64)).subset(ids)
        return ArraySplit(*(np.concatenate([b[k] for b in got]) for k in ("sample_id", "image", "label"))).subset(ids)

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        rows = self.num_rows(split)
        chunks = -(-rows // SYNTH_CHUNK)
        per = max(1, round(target_rows / SYNTH_CHUNK))
        offset, code = (0, 0) if split == "train" else (self.n, 1)
        return [SyntheticPartition(c, min(c + per, chunks), rows, offset, code, self.shape)
                for c in range(0, chunks, per)]


DATASETS.register("fashion-mnist-mini")(FashionMnistMini)
DATASETS.register("fashion-mnist")(FashionMnist)
DATASETS.register("digits")(Digits)
DATASETS.register("synthetic")(Synthetic)

__all__ = ["DATASETS", "load_source", "validate_rows", "ArraySplit", "DataError"]
