"""File-based sources: ``parquet:PATH`` and ``imagefolder:PATH``, local or any URI pyarrow opens.

Splits: when PATH holds both ``train`` and ``test`` (sub-folders, or ``train*.parquet`` /
``test*.parquet`` files; for Parquet ``validation*``/``val*`` before ``test*``, as the Hugging
Face layout has an unlabelled test split) they are used as is; otherwise everything is the training pool and
the test split is a deterministic holdout of 10% of the sample ids (by hash).
Sample ids without a ``sample_id`` column are derived stably from the relative file path and
the row (parquet) or the relative path (imagefolder): 63 bits of blake2b.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine.data.base import (
    DataInfo,
    Partition,
    Source,
    check_classes,
    check_split,
    files_key,
    in_holdout,
    stable_id,
    validate_rows,
)
from engine.data.images import EncodedImages, decode_part, find_bad_images, open_image
from engine.data.sources import DATASETS, GENERIC_MEAN, GENERIC_STD
from engine.data.transforms import default_train_transform
from engine.errors import ConfigError, DataError

SHAPE_KEY = b"winnow_image_shape"


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 HWC (grayscale C=1, RGB C=3; other modes converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_image(data, where) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
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

    def ids_and_labels(self) -> tuple:
        return _group_ids_labels(self.uri, self.rel, self.row_group, self.first_row, self.keep, ())


def _id_columns(pf: pq.ParquetFile) -> list:
    """The columns a file's sample ids come from (``_ids``): sample_id, image.path or none."""
    if "sample_id" in pf.schema_arrow.names:
        return ["sample_id"]
    typ = pf.schema_arrow.field("image").type
    return ["image.path"] if pa.types.is_struct(typ) and typ.get_field_index("path") >= 0 else []


def _group_ids_labels(uri: str, rel: str, group: int, first_row: int, keep: str, drop: tuple) -> tuple:
    """(ids, labels) of a row group's kept rows, reading only the id and label columns."""
    fs, root = _filesystem(uri)
    with fs.open_input_file(root) as fh:
        pf = pq.ParquetFile(fh)
        t = pf.read_row_group(group, columns=_id_columns(pf) + ["label"])
    ids = _ids(t, rel, first_row)
    mask = _keep_mask(ids, keep)
    if drop:
        mask[np.asarray(drop, dtype=np.int64) - first_row] = False
    return ids[mask], _labels(t, rel)[mask]


def _image_bytes(col: pa.ChunkedArray) -> list:
    """The encoded images of an ``image`` column: bytes, or the ``bytes`` of a struct (the
    Hugging Face ``datasets`` layout, ``{bytes, path}``); None where a row has none."""
    if pa.types.is_struct(col.type):
        col = pc.struct_field(col, "bytes")
    return col.to_pylist()


def _is_encoded(typ: pa.DataType) -> bool:
    """An ``image`` column of encoded files: bytes, or a struct with a ``bytes`` field."""
    if pa.types.is_struct(typ):
        return typ.get_field_index("bytes") >= 0
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ)


@dataclass(frozen=True)
class EncodedParquetPartition(Partition):
    """One row group of encoded images of any size, brought to ``size`` x ``size`` by the
    evaluation transform; ``keep`` selects holdout rows, ``drop`` lists the rows (in the file)
    that ``bad=skip`` left out."""

    uri: str
    rel: str
    row_group: int
    first_row: int
    num_rows: int
    keep: str
    size: int
    eval_transform: str
    split: str
    drop: tuple = ()

    def read_encoded(self) -> tuple:
        """(sample ids, labels, [(where, bytes)]) of the partition's rows, not decoded."""
        fs, root = _filesystem(self.uri)
        with fs.open_input_file(root) as fh:
            t = pq.ParquetFile(fh).read_row_group(self.row_group)
        ids = _ids(t, self.rel, self.first_row)
        mask = _keep_mask(ids, self.keep)
        if self.drop:
            mask[np.asarray(self.drop, dtype=np.int64) - self.first_row] = False
        rows = np.flatnonzero(mask)
        data = _image_bytes(t.column("image"))
        items = [(f"{self.rel} row {self.first_row + int(i)}", data[i] or b"") for i in rows]
        return ids[rows], _labels(t, self.rel)[rows], items

    def ids_and_labels(self) -> tuple:
        return _group_ids_labels(self.uri, self.rel, self.row_group, self.first_row, self.keep, self.drop)

    def read(self) -> Iterator[dict]:
        ids, labels, items = self.read_encoded()
        yield {"sample_id": ids, "label": labels,
               "image": decode_part(items, self.size, self.eval_transform, "parquet", self.split)}


def _ids(t: pa.Table, rel: str, first_row: int) -> np.ndarray:
    """A row group's sample ids: the ``sample_id`` column; else, for images stored with their
    file name (the Hugging Face layout's ``image.path``), the name; else the file and row."""
    if "sample_id" in t.column_names:
        col = t.column("sample_id")
        if not pa.types.is_integer(col.type) or col.null_count:
            raise DataError(f"{rel}: column 'sample_id' must be integers without nulls, got {col.type}")
        return col.to_numpy().astype(np.int64)
    paths = [None] * t.num_rows
    if "image" in t.column_names and pa.types.is_struct(t.column("image").type) \
            and t.column("image").type.get_field_index("path") >= 0:
        paths = pc.struct_field(t.column("image"), "path").to_pylist()
    return np.array([stable_id(path) if path else stable_id(f"{rel}:{first_row + i}")
                     for i, path in enumerate(paths)], dtype=np.int64)


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


class ParquetSource(EncodedImages, Source):
    """``parquet[,size=S][,eval=...][,bad=skip]:PATH`` with columns ``image``, ``label`` (an
    integer) and optional ``sample_id``. ``image`` holds encoded image files of any size (PNG,
    JPEG, ...: bytes, or the Hugging Face ``datasets`` layout, a struct of ``bytes`` and
    ``path``), made RGB and brought to S x S as imagefolder's are (``EncodedImages``); or
    fixed-size uint8 arrays (lists or a fixed-shape tensor), used as stored. A file written by
    ``write_parquet_source`` declares its images' shape (metadata ``winnow_image_shape``): its
    images are used as stored unless ``size=S`` is given. Ids: ``sample_id``, else the image's
    ``path`` (Hugging Face), else file and row. Class names: the Hugging Face metadata's
    ``ClassLabel`` names when present."""

    def __init__(self, arg: Optional[str], size: Optional[int] = None, bad: str = "fail",
                 eval: str = "center-crop"):  # "eval": the option's name in the spec
        self._image_options("parquet", arg, "a path: parquet:PATH", size, bad, eval)
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
        kind = {f: _split_of(os.path.relpath(f, self.base)) for f in files}
        train = [f for f in files if kind[f] == "train"]
        test = [f for f in files if kind[f] == "val"] or [f for f in files if kind[f] == "test"]
        if train and test:
            self.files = {"train": (train, "all"), "test": (test, "all")}
        else:
            self.files = {"train": (files, "train"), "test": (files, "test")}
        self._parts: dict = {}
        self._info: Optional[DataInfo] = None
        self._encoded: Optional[bool] = None
        self._drop: Optional[dict] = None   # bad=skip: {relative file: rows left out}
        self._by_id: Optional[dict] = None  # sample_id -> (where, bytes) of the training rows (rrc-flip)
        if bad == "skip":
            self.info()  # decodes everything once (cached): ``skipped`` is known from the start

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

    @property
    def encoded(self) -> bool:
        """Images of any size (decoded and brought to S x S), not stored at one fixed shape."""
        if self._encoded is None:
            first = self.files["train"][0][0]
            pf = self._open(first)
            for col in ("image", "label"):
                if col not in pf.schema_arrow.names:
                    raise DataError(f"parquet: {first!r} lacks column {col!r}; it has {pf.schema_arrow.names}")
            typ = pf.schema_arrow.field("image").type
            declared = SHAPE_KEY in (pf.schema_arrow.metadata or {})
            self._encoded = _is_encoded(typ) and (pa.types.is_struct(typ) or not declared or self._size is not None)
            if not self._encoded and (self._size is not None or self.eval_transform != "center-crop"
                                      or self.bad != "fail"):
                raise ConfigError(f"parquet: {first!r} stores fixed-size images; size=, eval= and bad= apply "
                                  "to encoded images of any size")
        return self._encoded

    def _first_train_image(self):
        """The first training row's image that bad=skip kept (for the default size)."""
        files, keep = self.files["train"]
        for f in files:
            pf, rel, start = self._open(f), os.path.relpath(f, self.base), 0
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g)
                mask = np.ones(t.num_rows, bool) if keep == "all" else _keep_mask(_ids(t, rel, start), keep)
                data = _image_bytes(t.column("image"))
                for i in np.flatnonzero(mask):
                    if start + int(i) not in (self._drop or {}).get(rel, ()):
                        return f"{rel} row {start + int(i)}", data[i] or b""
                start += t.num_rows
        raise DataError(f"parquet: no training rows in {self.uri!r}")

    def _encoded_by_id(self, sample_ids):
        if self._by_id is None:  # the training split's encoded images, read once per process
            self._by_id = {int(i): item for p in self.partitions("train") for i, item in
                           zip(*p.read_encoded()[::2])}
        out = []
        for sid in sample_ids:
            item = self._by_id.get(int(sid))
            if item is None:
                raise DataError(f"parquet: sample_id {int(sid)} is not in the training split of {self.uri!r}")
            out.append(item)
        return out

    def info(self) -> DataInfo:
        if self._info is None:
            first = self.files["train"][0][0]
            encoded = self.encoded
            pf = self._open(first)
            labels = np.concatenate([_labels(self._open(f).read(columns=["label"]), f)
                                     for f in sorted(set(self.files["train"][0] + self.files["test"][0]))])
            names = _hf_class_names(pf)
            num_classes = max(int(labels.max()) + 1, len(names or ())) if len(labels) else 0
            check_classes(labels, num_classes, f"parquet {self.uri!r}", names)
            if encoded:
                if self.bad == "skip":
                    self._skip_unreadable()
                self._info = self.image_info(num_classes, names)
            else:
                shape = _image_shape(pf, os.path.relpath(first, self.base))
                c = shape[2]
                self._info = DataInfo(self.spec, num_classes, tuple(shape), (GENERIC_MEAN,) * c, (GENERIC_STD,) * c,
                                      names, train_transform=default_train_transform(min(shape[:2])))
        return self._info

    def _skip_unreadable(self) -> None:
        """``bad=skip``: decode every row's image once (``find_bad_images``, cached) and leave out
        the rows whose image does not decode (``skipped``, by file and row)."""
        everything = sorted(set(self.files["train"][0] + self.files["test"][0]))
        infos = self.fs.get_file_info(everything)
        identity = self.uri + "".join(f"\n{os.path.relpath(i.path, self.base)}\0{i.size}\0{i.mtime_ns}" for i in infos)
        groups = []
        for f in everything:
            rel = os.path.relpath(f, self.base)
            start = 0
            pf = self._open(f)
            for g in range(pf.num_row_groups):
                groups.append(self._group_reader(f, rel, g, start))
                start += pf.metadata.row_group(g).num_rows
        verdicts = find_bad_images(identity, groups)
        self.skipped = sorted(verdicts.items())
        self._drop = {}
        for where in verdicts:
            rel, _, row = where.rpartition(" row ")
            self._drop.setdefault(rel, set()).add(int(row))

    def _group_reader(self, path: str, rel: str, group: int, start: int):
        def read():
            data = _image_bytes(self._open(path).read_row_group(group, columns=["image"]).column("image"))
            return [(f"{rel} row {start + i}", d if d else "no image bytes") for i, d in enumerate(data)]
        return read

    def num_rows(self, split: str) -> int:
        return sum(p.num_rows for p in self.partitions(split))

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        """One partition per row group (Parquet's own unit of streaming reads)."""
        split = check_split(split)
        if split not in self._parts:
            self.info()
            self._parts[split] = self._partitions(split, self._drop or {})
        return self._parts[split]

    def _partitions(self, split: str, drop: dict) -> list:
        files, keep = self.files[split]
        parts = []
        for f in files:
            pf = self._open(f)
            rel = os.path.relpath(f, self.base)
            start = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                mask = np.ones(n, bool) if keep == "all" else _keep_mask(self._group_ids(pf, g, rel, start), keep)
                gone = tuple(sorted(r for r in drop.get(rel, ()) if start <= r < start + n and mask[r - start]))
                rows = int(mask.sum()) - len(gone)
                if rows:
                    if self.encoded:
                        parts.append(EncodedParquetPartition(self._uri(f), rel, g, start, rows, keep, self.size,
                                                             self.eval_transform, split, gone))
                    else:
                        parts.append(ParquetPartition(self._uri(f), rel, g, start, rows, keep,
                                                      tuple(self.info().image_shape)))
                start += n
        return parts

    def ids_and_labels(self, split: str) -> tuple:
        pairs = [p.ids_and_labels() for p in self.partitions(split)]
        ids = np.concatenate([i for i, _ in pairs]) if pairs else np.zeros(0, np.int64)
        labels = np.concatenate([lab for _, lab in pairs]) if pairs else np.zeros(0, np.int64)
        validate_rows(ids, labels, self.info().num_classes, f"{self.spec} {split}")
        return ids, labels

    @staticmethod
    def _group_ids(pf: pq.ParquetFile, group: int, rel: str, start: int) -> np.ndarray:
        """Sample ids of one row group, reading only the columns they come from."""
        cols = _id_columns(pf)
        t = pf.read_row_group(group, columns=cols) if cols else pa.table({"_": pa.nulls(
            pf.metadata.row_group(group).num_rows)})
        return _ids(t, rel, start)

    def arrays(self, split: str):
        rows = super().arrays(split)
        validate_rows(rows.sample_id, rows.label, self.info().num_classes, f"{self.spec} {split}")
        return rows


def _split_of(rel: str) -> Optional[str]:
    """'train', 'val' or 'test' when a folder or file name of ``rel`` starts with it (the
    Hugging Face layout names files ``train-00000-of-00004.parquet``, ``validation-...``)."""
    for part in rel.replace(os.sep, "/").split("/"):
        for kind, prefixes in (("train", ("train",)), ("val", ("validation", "val")), ("test", ("test",))):
            if part.startswith(prefixes):
                return kind
    return None


def _hf_class_names(pf: pq.ParquetFile) -> Optional[tuple]:
    """The ``label`` feature's class names in a Hugging Face ``datasets`` file's metadata."""
    import json

    raw = (pf.schema_arrow.metadata or {}).get(b"huggingface")
    try:
        names = json.loads(raw)["info"]["features"]["label"]["names"] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) and names else None


# ---------------------------------------------------------------- imagefolder

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as ImageFolder does
FOLDER_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_DIRS = ("val", "test")  # ILSVRC names its held-out split val/


@lru_cache(maxsize=16)
def _cached_fs(uri: str):
    return _filesystem(uri)


def _read_file(fs, root: str, rel: str) -> bytes:
    with fs.open_input_file(f"{root.rstrip('/')}/{rel}") as fh:
        return fh.read()


def _read_listed(uri: str, rel: str) -> bytes:
    """The bytes of a listed image file; DataError naming it if it cannot be read."""
    fs, root = _cached_fs(uri)
    try:
        return _read_file(fs, root, rel)
    except OSError as exc:
        raise DataError(f"imagefolder: cannot read {rel}: {exc}") from None


@dataclass(frozen=True)
class FilesPartition(Partition):
    """Image files ``(relative path, label)`` under ``uri``, decoded, made RGB and brought to
    ``size`` x ``size`` by the evaluation transform."""

    uri: str
    files: tuple
    size: int
    split: str
    eval_transform: str = "center-crop"

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return len(self.files)

    def read_encoded(self) -> tuple:
        """(sample ids, labels, [(where, bytes)]) of the partition's files, not decoded."""
        return (np.array([stable_id(rel) for rel, _ in self.files], dtype=np.int64),
                np.array([lab for _, lab in self.files], dtype=np.int64),
                [(rel, _read_listed(self.uri, rel)) for rel, _ in self.files])

    def read(self) -> Iterator[dict]:
        items = [(rel, _read_listed(self.uri, rel)) for rel, _ in self.files]
        images = decode_part(items, self.size, self.eval_transform, "imagefolder", self.split)
        yield {"sample_id": np.array([stable_id(rel) for rel, _ in self.files], dtype=np.int64),
               "image": images, "label": np.array([lab for _, lab in self.files], dtype=np.int64)}


class ImageFolderSource(EncodedImages, Source):
    """``imagefolder:PATH_OR_URI`` (a local path, ``file://``, ``s3://``, ``gs://``: any
    filesystem pyarrow knows): one folder per class, ``PATH/<class>/**/<image>``, or the ILSVRC
    layout ``PATH/train/<class>/...`` beside ``PATH/val/<class>/...`` (or ``test/``). Classes are
    the training folders' names, sorted, labelled 0..K-1 as torchvision's ``ImageFolder`` does;
    a test folder's classes must be among them. Sample ids: 63 bits of blake2b of the path
    relative to PATH (stable under re-listing; a collision is refused). Images of any size and
    mode: decoded by content (a PNG named .JPEG decodes), made RGB, then brought to ``size`` x
    ``size`` (option ``size=S``; default: the first training image's shorter side, at most 224)
    by the evaluation transform (option ``eval=center-crop|resize``; see ``eval_geometry``).
    Training transforms that must see the original (``rrc-flip``) decode the files again
    (``augment``)."""

    def __init__(self, arg: Optional[str], size: Optional[int] = None, bad: str = "fail",
                 eval: str = "center-crop"):  # "eval": the option's name in the spec
        self._image_options("imagefolder", arg, "a path: imagefolder:PATH", size, bad, eval)
        self.fs, self.root = _filesystem(arg)
        self.root = self.root.rstrip("/") or "/"
        info = self.fs.get_file_info(self.root)
        if info.type != pafs.FileType.Directory:
            raise DataError(f"imagefolder: {arg!r} is not a directory")
        listing = [f for f in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))]
        rels = {}
        for f in listing:
            rel = f.path[len(self.root):].lstrip("/")
            rels[rel] = f
        top_dirs = {r for r, f in rels.items() if "/" not in r and f.type == pafs.FileType.Directory}
        test_dir = next((d for d in TEST_DIRS if d in top_dirs), None)
        prefix = {"train": "train/", "test": f"{test_dir}/"} if "train" in top_dirs and test_dir else None
        train_prefix = prefix["train"] if prefix else ""
        self.classes = sorted(r[len(train_prefix):] for r, f in rels.items() if f.type == pafs.FileType.Directory
                              and r.startswith(train_prefix) and "/" not in r[len(train_prefix):])
        if not self.classes:
            raise DataError(f"imagefolder: no class folders in {arg!r}{' train/' if prefix else ''}")
        index = {c: i for i, c in enumerate(self.classes)}
        self._stats = {}

        if prefix:
            self.lists = {}
            for split in ("train", "test"):
                self.lists[split], per_class = self._scan(rels, prefix[split], prefix[split].rstrip("/"), index)
                if split == "train":
                    empty = [c for c in self.classes if not per_class.get(c)]
                    if empty:
                        raise DataError(f"imagefolder: class folder {prefix['train']}{empty[0]} has no images "
                                        f"({', '.join(FOLDER_EXT)})")
        else:
            every, per_class = self._scan(rels, "", "", index)
            empty = [c for c in self.classes if not per_class.get(c)]
            if empty:
                raise DataError(f"imagefolder: class folder {empty[0]!r} has no images ({', '.join(FOLDER_EXT)})")
            test = in_holdout(np.array([stable_id(rel) for rel, _ in every], dtype=np.int64))
            self.lists = {"train": [f for f, t in zip(every, test) if not t],
                          "test": [f for f, t in zip(every, test) if t]}
        if bad == "skip":
            self._skip_unreadable()
        self._check_ids()
        self._rel_of: Optional[dict] = None  # sample_id -> relative path of the training files (augment)

    def _scan(self, rels: dict, pre: str, where: str, index: dict) -> tuple:
        """([(relative path, label)], {class: count}) of the image files under ``pre``; their
        sizes and times go to ``_stats``."""
        found, per_class = [], {}
        for rel, f in sorted(rels.items()):
            if f.type != pafs.FileType.File or not rel.startswith(pre) or not rel.lower().endswith(FOLDER_EXT):
                continue
            cls, sep, _ = rel[len(pre):].partition("/")
            if not sep:
                continue  # a file beside the class folders, as ImageFolder ignores it
            if cls not in index:
                raise DataError(f"imagefolder: {where} class folder {cls!r} is not among the training classes")
            found.append((rel, index[cls]))
            per_class[cls] = per_class.get(cls, 0) + 1
            self._stats[rel] = (f.size, f.mtime_ns)
        return found, per_class

    def _check_ids(self) -> None:
        """No two files of the folder share a sample_id (a hash of the relative path)."""
        seen: dict = {}
        for split in ("train", "test"):
            for rel, _ in self.lists[split]:
                other = seen.setdefault(stable_id(rel), rel)
                if other != rel:
                    raise DataError(f"imagefolder: {other} and {rel} hash to the same sample_id; rename one")

    def _skip_unreadable(self) -> None:
        """``bad=skip``: decode every listed file once (``find_bad_images``, cached) and leave
        out those that fail, recording them in ``skipped``."""
        everything = sorted(rel for split in ("train", "test") for rel, _ in self.lists[split])
        identity = self.uri + "".join(f"\n{rel}\0{self._stats[rel][0]}\0{self._stats[rel][1]}" for rel in everything)

        def one(rel):
            def read():
                try:
                    return [(rel, _read_file(self.fs, self.root, rel))]
                except OSError as exc:
                    return [(rel, f"cannot read {rel}: {exc}")]
            return read

        verdicts = find_bad_images(identity, [one(rel) for rel in everything])
        self.skipped = sorted(verdicts.items())
        for split in ("train", "test"):
            self.lists[split] = [(rel, lab) for rel, lab in self.lists[split] if rel not in verdicts]
        if not self.lists["train"]:
            raise DataError(f"imagefolder: none of the {len(everything)} image(s) under {self.uri!r} decodes")

    def ids_and_labels(self, split):
        files = self.lists[check_split(split)]
        return (np.array([stable_id(rel) for rel, _ in files], dtype=np.int64),
                np.array([lab for _, lab in files], dtype=np.int64))

    def _first_train_image(self):
        rel = self.lists["train"][0][0]
        return rel, _read_listed(self.uri, rel)

    def _encoded_by_id(self, sample_ids):
        if self._rel_of is None:
            self._rel_of = {stable_id(rel): rel for rel, _ in self.lists["train"]}
        out = []
        for sid in sample_ids:
            rel = self._rel_of.get(int(sid))
            if rel is None:
                raise DataError(f"imagefolder: sample_id {int(sid)} is not in the training split of {self.uri!r}")
            out.append((rel, _read_listed(self.uri, rel)))
        return out

    def content_key(self) -> str:
        return files_key(self.spec, ((f"{rel}:{label}", *self._stats[rel]) for rel, label in self.lists["train"]))

    def info(self) -> DataInfo:
        return self.image_info(len(self.classes), self.classes)

    def num_rows(self, split: str) -> int:
        return len(self.lists[check_split(split)])

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        files = self.lists[check_split(split)]
        size = self.size
        return [FilesPartition(self.uri, tuple(files[i:i + target_rows]), size, split, self.eval_transform)
                for i in range(0, len(files), target_rows)]

    def partitions_in_order(self, split: str, order: np.ndarray, target_rows: int = 8192) -> list[Partition]:
        """One file per image: any order is a list of files, cut into partitions."""
        files = self.lists[check_split(split)]
        ordered = [files[int(i)] for i in order]
        return [FilesPartition(self.uri, tuple(ordered[i:i + target_rows]), self.size, split, self.eval_transform)
                for i in range(0, len(ordered), target_rows)]


DATASETS.register("parquet")(ParquetSource)
DATASETS.register("imagefolder")(ImageFolderSource)
