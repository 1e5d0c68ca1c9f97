"""``webdataset:PATTERN_OR_DIR``: WebDataset tar shards of encoded images of any size.

A shard holds samples as consecutive members sharing a key: ``<key>.jpg`` (or ``.jpeg``,
``.png``, ``.webp``, ...: the image) and ``<key>.cls`` (the class index as text); a key is the
member's path up to the first dot of its file name, as webdataset groups them. PATTERN may hold
brace ranges and lists (``shard-{000..009}.tar``, ``{train,val}-{0..3}.tar``) and may be any URI
pyarrow opens (``s3://``, ``gs://``); a directory means every ``*.tar`` under it. When some
shards' names contain ``train`` and others ``val`` or ``test``, those are the splits; otherwise
everything is the training pool and the test split is a fixed 10% holdout by id. Sample ids:
63 bits of blake2b of the image member's name (``train/n01440764/x.JPEG`` gives the id
imagefolder gives that file), a collision refused. Members are read by their offsets (no
shard is ever read whole), so a partition is any run of rows and a training transform that
must see the original (``rrc-flip``) reads just that image again.
"""
from __future__ import annotations

import itertools
import os
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import pyarrow.fs as pafs

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
from engine.data.files import _filesystem
from engine.data.images import EncodedImages, decode_part, find_bad_images
from engine.data.sources import DATASETS
from engine.errors import ConfigError, DataError

IMAGE_EXT = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
MAX_SHARDS = 1_000_000


def expand_braces(pattern: str) -> list:
    """``a{0..2}b{x,y}`` -> ``[a0bx, a0by, a1bx, ...]`` as webdataset's braceexpand: numeric
    ranges keep the zero padding of their first bound (``{000..009}``), lists are
    comma-separated, and lists may nest (``{train-{000..146},val-{000..006}}``)."""
    out = _expand(pattern, pattern)
    if len(out) > MAX_SHARDS:
        raise ConfigError(f"webdataset: {pattern!r} names {len(out)} shards, more than {MAX_SHARDS}")
    return out


def _expand(text: str, pattern: str) -> list:
    start = text.find("{")
    if start < 0:
        if "}" in text:
            raise ConfigError(f"webdataset: unbalanced braces in {pattern!r}")
        return [text]
    depth, cuts, end = 0, [], None
    for i in range(start, len(text)):
        ch = text[i]
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 1:
            cuts.append(i)
        if depth == 0:
            end = i
            break
    if end is None:
        raise ConfigError(f"webdataset: unbalanced braces in {pattern!r}")
    body, head, rest = text[start + 1:end], text[:start], _expand(text[end + 1:], pattern)
    if "}" in head:
        raise ConfigError(f"webdataset: unbalanced braces in {pattern!r}")
    if cuts:
        bounds = [start] + cuts + [end]
        alts = [x for j in range(len(bounds) - 1) for x in _expand(text[bounds[j] + 1:bounds[j + 1]], pattern)]
    else:
        m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if not m:
            raise ConfigError(f"webdataset: {{{body}}} in {pattern!r} is neither a range {{A..B}} nor a list {{a,b}}")
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ConfigError(f"webdataset: empty range {{{body}}} in {pattern!r}")
        if hi - lo >= MAX_SHARDS:
            raise ConfigError(f"webdataset: {{{body}}} in {pattern!r} names more than {MAX_SHARDS} shards")
        width = len(m.group(1)) if m.group(1).startswith("0") else 0
        alts = [str(i).zfill(width) for i in range(lo, hi + 1)]
    return [head + a + r for a in alts for r in rest]


@lru_cache(maxsize=16)
def _shard_fs(uri: str):
    return _filesystem(uri)


def _read_at(uri: str, offset: int, size: int, where: str) -> bytes:
    fs, path = _shard_fs(uri)
    try:
        with fs.open_input_file(path) as fh:
            return fh.read_at(size, offset)
    except OSError as exc:
        raise DataError(f"webdataset: cannot read {where}: {exc}") from None


@dataclass(frozen=True)
class ShardPartition(Partition):
    """Rows of one shard: ``rows`` = ((sample_id, label, member, offset, size), ...)."""

    uri: str          # the shard
    rel: str          # its name for messages
    rows: tuple
    image_size: int
    eval_transform: str
    split: str

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return len(self.rows)

    def encoded(self) -> list:
        fs, path = _shard_fs(self.uri)
        try:
            with fs.open_input_file(path) as fh:
                return [(f"{self.rel}:{member}", fh.read_at(size, offset)) for _, _, member, offset, size in self.rows]
        except OSError as exc:
            raise DataError(f"webdataset: cannot read {self.rel}: {exc}") from None

    def read_encoded(self) -> tuple:
        """(sample ids, labels, [(where, bytes)]) of the partition's rows, not decoded."""
        return (np.array([r[0] for r in self.rows], dtype=np.int64), np.array([r[1] for r in self.rows], dtype=np.int64),
                self.encoded())

    def read(self) -> Iterator[dict]:
        images = decode_part(self.encoded(), self.image_size, self.eval_transform, "webdataset", self.split)
        yield {"sample_id": np.array([r[0] for r in self.rows], dtype=np.int64), "image": images,
               "label": np.array([r[1] for r in self.rows], dtype=np.int64)}


class WebDatasetSource(EncodedImages, Source):
    """``webdataset[,size=S][,eval=...][,bad=skip]:PATTERN_OR_DIR`` (see the module's text)."""

    def __init__(self, arg: Optional[str], size: Optional[int] = None, bad: str = "fail",
                 eval: str = "center-crop"):  # "eval": the option's name in the spec
        self._image_options("webdataset", arg, "shards: webdataset:PATTERN (e.g. shard-{000..009}.tar)", size, bad, eval)
        shards = self._find_shards(arg)
        self._stats = {}
        rows = {}  # shard uri -> [(sample_id, label, member, offset, size)]
        seen: dict = {}
        for uri, rel in shards:
            rows[uri] = self._list_shard(uri, rel)
            for sid, _, member, _, _ in rows[uri]:
                other = seen.setdefault(sid, f"{rel}:{member}")
                if other != f"{rel}:{member}":
                    raise DataError(f"webdataset: {other} and {rel}:{member} give the same sample_id; rename one")
        self.rel = dict(shards)
        train = [u for u, r in shards if "train" in r]
        test = [u for u, r in shards if "val" in r or "test" in r]
        if train and test and not set(train) & set(test):
            self.lists = {"train": [(u, row) for u in train for row in rows[u]],
                          "test": [(u, row) for u in test for row in rows[u]]}
        else:
            every = [(u, row) for u, _ in shards for row in rows[u]]
            held = in_holdout(np.array([row[0] for _, row in every], dtype=np.int64))
            self.lists = {"train": [x for x, h in zip(every, held) if not h], "test": [x for x, h in zip(every, held) if h]}
        if not self.lists["train"]:
            raise DataError(f"webdataset: no training samples in {arg!r}")
        if bad == "skip":
            self._skip_unreadable()
        labels = np.array([row[1] for split in self.lists.values() for _, row in split], dtype=np.int64)
        self.num_classes = int(labels.max()) + 1
        check_classes(labels, self.num_classes, f"webdataset {arg!r}")
        self._by_id: Optional[dict] = None

    def _find_shards(self, arg: str) -> list:
        """[(uri, name relative to the pattern's fixed prefix)] of the shards, in order."""
        fs, root = _filesystem(arg if "{" not in arg else arg.split("{")[0] or ".")
        scheme = arg.split("://")[0] + "://" if "://" in arg else ""
        if "{" in arg:
            uris = expand_braces(arg)
        else:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                found = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                               if f.type == pafs.FileType.File and f.path.endswith(".tar"))
                if not found:
                    raise DataError(f"webdataset: no .tar shards under {arg!r}")
                uris = [scheme + p if scheme else p for p in found]
            else:
                uris = [arg]
        prefix = os.path.commonpath([u.split("://")[-1] for u in uris]) if len(uris) > 1 else ""
        out = []
        for u in uris:
            bare = u.split("://")[-1]
            rel = os.path.relpath(bare, prefix) if prefix and os.path.isabs(bare) == os.path.isabs(prefix) \
                else os.path.basename(bare)
            out.append((u, rel))
        return out

    def _list_shard(self, uri: str, rel: str) -> list:
        """The samples of one shard: (sample_id, label, image member, offset, size), reading
        only the tar headers and the ``.cls`` members."""
        fs, path = _shard_fs(uri)
        try:
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise DataError(f"webdataset: shard {uri!r} does not exist")
            self._stats[rel] = (info.size, info.mtime_ns)
            with fs.open_input_file(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                samples: dict = {}
                for m in members:
                    d, base = os.path.split(m.name)
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    samples.setdefault(os.path.join(d, stem), {})[ext.lower()] = m
                out = []
                for key, parts in samples.items():
                    image = next((parts[e] for e in IMAGE_EXT if e in parts), None)
                    if image is None and "cls" not in parts:
                        continue  # a key with neither (metadata members): not a sample
                    if image is None:
                        raise DataError(f"webdataset: {rel}: sample {key!r} has no image member "
                                        f"(.{', .'.join(IMAGE_EXT)})")
                    if "cls" not in parts:
                        raise DataError(f"webdataset: {rel}: sample {key!r} has no .cls member (its class index)")
                    cls = parts["cls"]
                    text = fh.read_at(cls.size, cls.offset_data).decode("utf-8", "replace").strip()
                    if not re.fullmatch(r"\d{1,9}", text):
                        raise DataError(f"webdataset: {rel}: {cls.name} must hold a class index >= 0, got {text[:40]!r}")
                    out.append((stable_id(image.name), int(text), image.name, image.offset_data, image.size))
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"webdataset: {rel} is not a readable tar shard ({exc})") from None
        return out

    def _skip_unreadable(self) -> None:
        everything = [(u, row) for split in ("train", "test") for u, row in self.lists[split]]
        identity = self.uri + "".join(f"\n{rel}\0{size}\0{mtime}" for rel, (size, mtime) in sorted(self._stats.items()))
        by_shard: dict = {}
        for u, row in everything:
            by_shard.setdefault(u, []).append(row)

        def reader(u, rows):
            def read():
                try:
                    return ShardPartition(u, self.rel[u], tuple(rows), 1, "center-crop", "").encoded()
                except DataError as exc:
                    return [(f"{self.rel[u]}:{r[2]}", str(exc)) for r in rows]
            return read

        verdicts = find_bad_images(identity, [reader(u, rows) for u, rows in by_shard.items()])
        self.skipped = sorted(verdicts.items())
        for split in ("train", "test"):
            self.lists[split] = [(u, r) for u, r in self.lists[split] if f"{self.rel[u]}:{r[2]}" not in verdicts]
        if not self.lists["train"]:
            raise DataError(f"webdataset: none of the {len(everything)} image(s) in {self.uri!r} decodes")

    def ids_and_labels(self, split):
        rows = [row for _, row in self.lists[check_split(split)]]
        return np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64)

    def _first_train_image(self):
        u, row = self.lists["train"][0]
        return f"{self.rel[u]}:{row[2]}", _read_at(u, row[3], row[4], f"{self.rel[u]}:{row[2]}")

    def _encoded_by_id(self, sample_ids):
        if self._by_id is None:
            self._by_id = {row[0]: (u, row) for u, row in self.lists["train"]}
        out = []
        for sid in sample_ids:
            hit = self._by_id.get(int(sid))
            if hit is None:
                raise DataError(f"webdataset: sample_id {int(sid)} is not in the training split of {self.uri!r}")
            u, row = hit
            where = f"{self.rel[u]}:{row[2]}"
            out.append((where, _read_at(u, row[3], row[4], where)))
        return out

    def content_key(self) -> str:
        return files_key(self.spec, ((rel, *self._stats[rel]) for rel in sorted(self._stats)))

    def info(self) -> DataInfo:
        return self.image_info(self.num_classes)

    def num_rows(self, split: str) -> int:
        return len(self.lists[check_split(split)])

    def partitions(self, split: str, target_rows: int = 8192) -> list[Partition]:
        """Runs of at most ``target_rows`` rows, never across shards."""
        parts, size = [], self.size
        for u, group in itertools.groupby(self.lists[check_split(split)], key=lambda x: x[0]):
            rows = [row for _, row in group]
            for i in range(0, len(rows), target_rows):
                parts.append(ShardPartition(u, self.rel[u], tuple(rows[i:i + target_rows]), size,
                                            self.eval_transform, split))
        return parts

    def arrays(self, split: str):
        rows = super().arrays(split)
        validate_rows(rows.sample_id, rows.label, self.num_classes, f"{self.spec} {split}")
        return rows


DATASETS.register("webdataset")(WebDatasetSource)
