"""Cut the embedded ``fashion-mnist-mini`` from the full Fashion-MNIST IDX files.

    python -m engine.data.make_mini [--src /usr/share/datasets/fashion-mnist] [--out FILE]

Keeps 600 training and 100 test images per class, drawn with numpy's default_rng(0) from
each class's indices, so the cut is reproducible byte for byte; the sample ids are the
original indices in the IDX files, so mini ids are a subset of the full set's.
"""
from __future__ import annotations

import argparse
import io

import numpy as np

from engine.artifacts import atomic_write_bytes
from engine.data.idx import read_idx_split
from engine.data.sources import FASHION_DIR, MINI_FILE

PER_CLASS = {"train": 600, "test": 100}


def cut(src: str, per_class: dict = PER_CLASS, seed: int = 0) -> dict:
    """Arrays of the mini set: {split}_id, {split}_image, {split}_label for train and test."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in per_class.items():
        images, labels = read_idx_split(src, split)
        keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                                       for c in range(int(labels.max()) + 1)]))
        out[f"{split}_id"] = keep.astype(np.int64)
        out[f"{split}_image"] = images[keep]
        out[f"{split}_label"] = labels[keep]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.data.make_mini", description=__doc__.split("\n")[1])
    p.add_argument("--src", default=FASHION_DIR, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(MINI_FILE), help="npz file to write")
    a = p.parse_args(argv)
    buf = io.BytesIO()
    np.savez_compressed(buf, **cut(a.src))
    atomic_write_bytes(a.out, buf.getvalue())
    print(f"wrote {a.out} ({len(buf.getvalue()) / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
