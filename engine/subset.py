"""A Winnow manifest in anyone's own PyTorch trainer (timm, torchvision's references, Lightning).

    from engine.subset import ManifestSubset, ids_from_paths
    ds = torchvision.datasets.ImageFolder("/data/imagenet/train")
    sub = ManifestSubset("runs/select/manifest.parquet", ids_from_paths([p for p, _ in ds.samples], "/data/imagenet"))
    loader = DataLoader(ds, batch_size=256, sampler=sub.sampler(seed=0), num_workers=8)
    for epoch in range(90):
        loader.sampler.set_epoch(epoch)
        for x, y in loader: ...

``ManifestSubset`` maps the manifest's sample ids onto the positions of the user's dataset (its
own ids, in its order) once; ``sampler`` yields those positions, shuffled per epoch and split
across DDP ranks as ``DistributedSampler`` does; ``weighted_sampler`` draws them with the
manifest's weights (the weighted selectors: GEDA, CRAIG, GRAD-MATCH); ``subset`` is a
``torch.utils.data.Subset`` with ``weights`` aligned to it for a per-sample weighted loss.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, Subset

from engine.artifacts import read_manifest
from engine.data.base import stable_id
from engine.errors import DataError


def ids_from_paths(paths: Sequence[str], root: str | os.PathLike) -> np.ndarray:
    """The sample ids Winnow's ``imagefolder:ROOT`` gives these files (their paths relative
    to ROOT, the folder passed to ``--data``: for the ILSVRC layout the one that holds
    ``train/``), in the order given (e.g. torchvision ``ImageFolder.samples``)."""
    root = Path(root).resolve()
    out = np.empty(len(paths), dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            rel = Path(p).resolve().relative_to(root)
        except ValueError:
            raise DataError(f"{p!r} is not under {str(root)!r}: pass the folder given to imagefolder:") from None
        out[i] = stable_id(rel.as_posix())
    return out


class ManifestSubset:
    """The rows a manifest selects, as positions in the user's dataset.

    ``dataset_ids``: the sample id of every item of the user's dataset, in its index order
    (``ids_from_paths``, the Parquet ``sample_id`` column, ...). Every manifest id must be
    among them (a DataError names how many are not, and an example)."""

    def __init__(self, manifest: str | os.PathLike, dataset_ids: Sequence[int]):
        ids, weight, self.meta = read_manifest(manifest)
        dataset_ids = np.asarray(dataset_ids, dtype=np.int64)
        if len(np.unique(dataset_ids)) != len(dataset_ids):
            raise DataError("dataset_ids holds a sample id twice: each item of the dataset needs its own id")
        order = np.argsort(dataset_ids, kind="stable")
        pos = np.clip(np.searchsorted(dataset_ids, ids, sorter=order), 0, max(len(order) - 1, 0))
        found = order[pos] if len(order) else np.zeros(0, np.int64)
        ok = dataset_ids[found] == ids if len(order) else np.zeros(len(ids), bool)
        if not ok.all():
            absent = ids[~ok]
            raise DataError(f"manifest {str(manifest)!r} names {len(absent)} sample_id(s) that the dataset does not "
                            f"hold, e.g. {absent[:5].tolist()}: are its ids those Winnow scored?")
        keep = np.argsort(found, kind="stable")  # dataset order
        self.indices = found[keep].astype(np.int64)
        self.sample_ids = ids[keep]
        w = weight[keep]
        self.weights = w / w.mean()  # mean 1: a weighted loss keeps the unweighted scale

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, dataset) -> Subset:
        """``torch.utils.data.Subset`` of the selected items, in dataset order (``weights[i]``
        belongs to its item ``i``)."""
        return Subset(dataset, self.indices.tolist())

    def sampler(self, shuffle: bool = True, seed: int = 0, num_replicas: Optional[int] = None,
                rank: Optional[int] = None, drop_last: bool = False) -> "ManifestSampler":
        return ManifestSampler(self.indices, shuffle, seed, num_replicas, rank, drop_last)

    def weighted_sampler(self, num_samples: Optional[int] = None, seed: int = 0, num_replicas: Optional[int] = None,
                         rank: Optional[int] = None) -> "ManifestSampler":
        """Positions drawn with replacement with probability proportional to the manifest's
        weights, ``num_samples`` per epoch (default: the subset's size)."""
        return ManifestSampler(self.indices, True, seed, num_replicas, rank, False, weights=self.weights,
                               num_samples=num_samples)


class ManifestSampler(Sampler):
    """Dataset positions of a manifest's rows: shuffled per ``set_epoch`` (seeded), split across
    DDP ranks as ``DistributedSampler`` does (padded to equal length unless ``drop_last``), or
    drawn with ``weights``."""

    def __init__(self, indices: np.ndarray, shuffle: bool = True, seed: int = 0, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, drop_last: bool = False, weights: Optional[np.ndarray] = None,
                 num_samples: Optional[int] = None):
        if num_replicas is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist and rank is None else (rank or 0)
        rank = 0 if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.indices, self.shuffle, self.seed = np.asarray(indices, dtype=np.int64), shuffle, seed
        self.num_replicas, self.rank, self.drop_last, self.epoch = num_replicas, rank, drop_last, 0
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        total = len(self.indices) if num_samples is None else int(num_samples)
        self.per_rank = total // num_replicas if drop_last else math.ceil(total / num_replicas)
        self.total = total

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            p = torch.as_tensor(self.weights / self.weights.sum())
            order = torch.multinomial(p, self.total, replacement=True, generator=g).numpy()
        elif self.shuffle:
            order = torch.randperm(len(self.indices), generator=g).numpy()
        else:
            order = np.arange(len(self.indices))
        need = self.per_rank * self.num_replicas
        if len(order) < need:  # pad by repeating from the start, as DistributedSampler does
            order = np.concatenate([order, np.resize(order, need - len(order))]) if len(order) else order
        order = order[:need]
        return iter(self.indices[order[self.rank::self.num_replicas]].tolist())


__all__ = ["ManifestSampler", "ManifestSubset", "ids_from_paths"]
