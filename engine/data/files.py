"""File-based sources: ``parquet:PATH`` (local or s3://) and ``imagefolder:PATH``.

Splits: when PATH holds both ``train`` and ``test`` (sub-folders, or ``train*.parquet`` /
``test*.parquet`` files) they are used as is; otherwise everything is the training pool and
the test split is a deterministic holdout of 10% of the sample ids (by hash).
Sample ids without a ``sample_id`` column are derived stably from the relative file path and
the row (parquet) or the relative path (imagefolder): 63 bits of blake2b.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.data.base import DataInfo, Partition, Source, check_split, files_key, in_holdout, stable_id, validate_rows
from engine.data.sources import DATASETS, GENERIC_MEAN, GENERIC_STD
from engine.errors import ConfigError, DataError

SHAPE_KEY = b"winnow_image_shape"
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp"}


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 HWC (grayscale C=1, RGB C=3; other modes converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image at {where}: {exc}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _filesystem(path: str):
    try:
        fs, root = pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot open {path!r}: {exc}") from None
    return fs, root


# ---------------------------------------------------------------- parquet


def write_parquet_source(path: str | Path, image: np.ndarray, label: np.ndarray,
                         sample_id: Optional[np.ndarray] = None, encode: Optional[str] = "png",
                         row_group_size: int = 4096) -> None:
    """Write arrays as a Parquet file that ``parquet:PATH`` reads: ``image`` as PNG bytes
    (``encode="png"``) or raw fixed-size uint8 lists with the shape in the file metadata
    (``encode=None``), ``label`` int64 and, if given, ``sample_id`` int64."""
    image = np.asarray(image, dtype=np.uint8)
    if encode == "png":
        col = pa.array([encode_png(im) for im in image], type=pa.binary())
    elif encode is None:
        flat = image.reshape(len(image), -1)
        col = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    else:
        raise ConfigError(f"encode must be 'png' or None, got {encode!r}")
    cols = {"image": col, "label": pa.array(np.asarray(label, np.int64))}
    if sample_id is not None:
        cols["sample_id"] = pa.array(np.asarray(sample_id, np.int64))
    table = pa.table(cols).replace_schema_metadata({SHAPE_KEY: ",".join(map(str, image.shape[1:])).encode()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)


@dataclass(frozen=True)
class ParquetPartition(Partition):
    """One row group of one file; ``keep`` selects holdout rows ('all', 'train', 'test')."""

    uri: str
    rel: str
    row_group: int
    first_row: int
    num_rows: int  # rows this partition yields (after the holdout filter)
    keep: str
    shape: tuple

    def read(self) -> Iterator[dict]:
        fs, root = _filesystem(self.uri)
        with fs.open_input_file(root) as fh:
            t = pq.ParquetFile(fh).read_row_group(self.row_group)
        ids = _ids(t, self.rel, self.first_row)
        mask = _keep_mask(ids, self.keep)
        images = _images(t.column("image"), self.shape, self.rel, self.first_row)
        labels = _labels(t, self.rel)
        yield {"sample_id": ids[mask], "image": images[mask], "label": labels[mask]}


def _ids(t: pa.Table, rel: str, first_row: int) -> np.ndarray:
    if "sample_id" in t.column_names:
        return t.column("sample_id").to_numpy().astype(np.int64)
    return np.array([stable_id(f"{rel}:{first_row + i}") for i in range(t.num_rows)], dtype=np.int64)


def _keep_mask(ids: np.ndarray, keep: str) -> np.ndarray:
    if keep == "all":
        return np.ones(len(ids), bool)
    test = in_holdout(ids)
    return test if keep == "test" else ~test


def _labels(t: pa.Table, rel: str) -> np.ndarray:
    col = t.column("label")
    if not pa.types.is_integer(col.type):
        raise DataError(f"{rel}: column 'label' must be integer, got {col.type}")
    if col.null_count:
        raise DataError(f"{rel}: column 'label' has {col.null_count} null value(s)")
    return col.to_numpy().astype(np.int64)


def _images(col: pa.ChunkedArray, shape: tuple, rel: str, first_row: int) -> np.ndarray:
    typ = col.type
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        out = np.empty((len(col), *shape), np.uint8)
        for i, v in enumerate(col.to_pylist()):
            im = decode_image(v or b"", f"{rel} row {first_row + i}")
            if im.shape != tuple(shape):
                raise DataError(f"{rel} row {first_row + i}: image shape {im.shape} differs from {tuple(shape)}")
            out[i] = im
        return out
    if isinstance(typ, pa.FixedShapeTensorType):
        arr = col.combine_chunks().to_numpy_ndarray()
    elif pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ):
        flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if flat.size != len(col) * int(np.prod(shape)):
            raise DataError(f"{rel}: image lists do not all have {int(np.prod(shape))} values ({shape})")
        arr = flat
    else:
        raise DataError(f"{rel}: column 'image' has type {typ}; expected bytes or a uint8 array")
    return np.asarray(arr).astype(np.uint8).reshape(len(col), *shape)


def _image_shape(pf: pq.ParquetFile, rel: str) -> tuple:
    meta = pf.schema_arrow.metadata or {}
    if SHAPE_KEY in meta:
        return tuple(int(v) for v in meta[SHAPE_KEY].decode().split(","))
    typ = pf.schema_arrow.field("image").type
    if isinstance(typ, pa.FixedShapeTensorType):
        shape = tuple(typ.shape)
        return shape if len(shape) == 3 else (*shape, 1)
    first = pf.read_row_group(0, columns=["image"]).column("image")
    if pa.types.is_binary(first.type) or pa.types.is_large_binary(first.type):
        return decode_image(first[0].as_py() or b"", f"{rel} row 0").shape
    side = int(round(np.sqrt(len(first[0]))))
    if side * side != len(first[0]):
        raise DataError(f"{rel}: cannot tell the image shape of {len(first[0])}-value lists; "
                        f"set file metadata {SHAPE_KEY.decode()}='H,W,C'")
    return (side, side, 1)


class ParquetSource(Source):
    """``parquet:PATH`` with columns image, label and optional sample_id."""

    def __init__(self, arg: Optional[str]):
        if not arg:
            raise ConfigError("parquet source needs a path: parquet:PATH")
        self.spec, self.uri = f"parquet:{arg}", arg
        self.fs, root = _filesystem(arg)
        info = self.fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"parquet: {arg!r} does not exist")
        if info.type == pafs.FileType.File:
            files = [root]
            self.base = os.path.dirname(root)
        else:
            sel = pafs.FileSelector(root, recursive=True)
            files = sorted(f.path for f in self.fs.get_file_info(sel)
                           if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
            self.base = root
        if not files:
            raise DataError(f"parquet: no .parquet files under {arg!r}")
        rel = {f: os.path.relpath(f, self.base) for f in files}
        train = [f for f in files if rel[f].startswith("train")]
        test = [f for f in files if rel[f].startswith("test")]
        if train and test:
            self.files = {"train": (train, "all"), "test": (test, "all")}
        else:
            self.files = {"train": (files, "train"), "test": (files, "test")}
        self._parts: dict = {}
        self._info: Optional[DataInfo] = None

    def content_key(self) -> str:
        files = self.files["train"][0]
        infos = self.fs.get_file_info(files)
        return files_key(self.spec, ((os.path.relpath(i.path, self.base), i.size, i.mtime_ns) for i in infos))

    def _uri(self, path: str) -> str:
        return path if "://" not in self.uri else f"{self.uri.split('://')[0]}://{path}"

    def _open(self, path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.fs.open_input_file(path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"parquet: {path!r} is not a readable Parquet file ({exc})") from None

    def info(self) -> DataInfo:
        if self._info is None:
            first = self.files["train"][0][0]
            pf = self._open(first)
            for col in ("image", "label"):
                if col not in pf.schema_arrow.names:
                    raise DataError(f"parquet: {first!r} lacks column {col!r}; it has {pf.schema_arrow.names}")
            shape = _image_shape(pf, os.path.relpath(first, self.base))
            labels = np.concatenate([_labels(self._open(f).read(columns=["label"]), f)
                                     for f in sorted(set(self.files["train"][0] + self.files["test"][0]))])
            if labels.min() < 0:
                raise DataError(f"parquet: negative label {int(labels.min())} in {self.uri!r}")
            c = shape[2]
            self._info = DataInfo(self.spec, int(labels.max()) + 1, tuple(shape),
                                  (GENERIC_MEAN,) * c, (GENERIC_STD,) * c)
        return self._info

    def num_rows(self, split: str) -> int:
        return sum(p.num_rows for p in self.partitions(split))

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        """One partition per row group (Parquet's own unit of streaming reads)."""
        split = check_split(split)
        if split not in self._parts:
            files, keep = self.files[split]
            shape = self.info().image_shape
            parts = []
            for f in files:
                pf = self._open(f)
                rel = os.path.relpath(f, self.base)
                start = 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    rows = n if keep == "all" else int(_keep_mask(self._group_ids(pf, g, rel, start, n), keep).sum())
                    if rows:
                        parts.append(ParquetPartition(self._uri(f), rel, g, start, rows, keep, tuple(shape)))
                    start += n
            self._parts[split] = parts
        return self._parts[split]

    @staticmethod
    def _group_ids(pf: pq.ParquetFile, group: int, rel: str, start: int, n: int) -> np.ndarray:
        """Sample ids of one row group, reading only the sample_id column (if any)."""
        if "sample_id" in pf.schema_arrow.names:
            return pf.read_row_group(group, columns=["sample_id"]).column("sample_id").to_numpy().astype(np.int64)
        return np.array([stable_id(f"{rel}:{start + i}") for i in range(n)], dtype=np.int64)

    def arrays(self, split: str):
        rows = super().arrays(split)
        validate_rows(rows.sample_id, rows.label, self.info().num_classes, f"{self.spec} {split}")
        return rows


# ---------------------------------------------------------------- imagefolder


@dataclass(frozen=True)
class FilesPartition(Partition):
    """A list of (absolute path, relative path, label) image files."""

    files: tuple
    shape: tuple

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return len(self.files)

    def read(self) -> Iterator[dict]:
        images = np.empty((len(self.files), *self.shape), np.uint8)
        for i, (path, rel, _) in enumerate(self.files):
            with open(path, "rb") as fh:
                im = decode_image(fh.read(), rel)
            if im.shape != tuple(self.shape):
                raise DataError(f"imagefolder: {rel} has shape {im.shape}, the first image {tuple(self.shape)}")
            images[i] = im
        yield {"sample_id": np.array([stable_id(rel) for _, rel, _ in self.files], dtype=np.int64),
               "image": images, "label": np.array([lab for _, _, lab in self.files], dtype=np.int64)}


class ImageFolderSource(Source):
    """``imagefolder:PATH``: PATH/<class>/<image> (or PATH/train/<class> + PATH/test/<class>);
    classes sorted by name -> labels 0..K-1."""

    def __init__(self, arg: Optional[str]):
        if not arg:
            raise ConfigError("imagefolder source needs a path: imagefolder:PATH")
        root = Path(arg)
        if not root.is_dir():
            raise DataError(f"imagefolder: {arg!r} is not a directory")
        self.spec, self.root = f"imagefolder:{arg}", root
        split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
        top = root / "train" if split_dirs else root
        self.classes = sorted(d.name for d in top.iterdir() if d.is_dir())
        if not self.classes:
            raise DataError(f"imagefolder: no class folders in {str(top)!r}")
        if split_dirs:
            self.lists = {s: self._scan(root / s) for s in ("train", "test")}
        else:
            every = self._scan(root)
            test = in_holdout(np.array([stable_id(rel) for _, rel, _ in every], dtype=np.int64))
            self.lists = {"train": [f for f, t in zip(every, test) if not t], "test": [f for f, t in zip(every, test) if t]}
        if not self.lists["train"]:
            raise DataError(f"imagefolder: no images (png/jpg/jpeg/bmp) under {arg!r}")
        first = self.lists["train"][0]
        with open(first[0], "rb") as fh:
            self.shape = decode_image(fh.read(), first[1]).shape

    def content_key(self) -> str:
        def stats():
            for path, rel, label in self.lists["train"]:
                st = os.stat(path)
                yield f"{rel}:{label}", st.st_size, st.st_mtime_ns
        return files_key(self.spec, stats())

    def _scan(self, top: Path) -> list:
        files = []
        for label, name in enumerate(self.classes):
            d = top / name
            if not d.is_dir():
                raise DataError(f"imagefolder: class folder {str(d)!r} is missing")
            for p in sorted(d.rglob("*")):
                if p.suffix.lower() in IMAGE_EXT and p.is_file():
                    files.append((str(p), str(p.relative_to(self.root)), label))
        return files

    def info(self) -> DataInfo:
        c = self.shape[2]
        return DataInfo(self.spec, len(self.classes), tuple(self.shape), (GENERIC_MEAN,) * c, (GENERIC_STD,) * c,
                        tuple(self.classes))

    def num_rows(self, split: str) -> int:
        return len(self.lists[check_split(split)])

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        files = self.lists[check_split(split)]
        return [FilesPartition(tuple(files[i:i + target_rows]), tuple(self.shape))
                for i in range(0, len(files), target_rows)]


DATASETS.register("parquet")(ParquetSource)
DATASETS.register("imagefolder")(ImageFolderSource)
