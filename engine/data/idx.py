"""Reading IDX files (the MNIST / Fashion-MNIST format) with numpy, gzipped or raw."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from engine.errors import DataError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file as a uint8 array of the shape its header declares.

    Header: two zero bytes, type code 0x08 (unsigned byte), number of dimensions, then one
    big-endian int32 per dimension. DataError naming the file if it is truncated or malformed.
    """
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated (header)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, 4))
    size = int(np.prod(shape)) if shape else 0
    if len(raw) - header != size:
        raise DataError(f"IDX file {str(path)!r} holds {len(raw) - header} bytes of data, header says {size}")
    return np.frombuffer(raw, np.uint8, size, header).reshape(shape)


def find_idx(directory: str | Path, split: str, kind: str) -> Path:
    """``train-images-idx3-ubyte[.gz]`` (or ``train-images.idx3-ubyte``) in ``directory``."""
    directory = Path(directory)
    dims = "idx3" if kind == "images" else "idx1"
    stem = f"{_PREFIX[split]}-{kind}"
    for name in (f"{stem}-{dims}-ubyte", f"{stem}.{dims}-ubyte"):
        for cand in (directory / name, directory / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise DataError(f"no {stem}-{dims}-ubyte[.gz] in {str(directory)!r} "
                    "(install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR)")


def read_idx_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int64 [N]) of one split; sizes must agree."""
    images = read_idx(find_idx(directory, split, "images"))
    labels = read_idx(find_idx(directory, split, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX files in {str(directory)!r}: {images.shape} images vs {labels.shape} labels")
    return images[..., None], labels.astype(np.int64)
