"""Scoring shards: one Parquet file per source partition, written as soon as the partition's
rows are all scored, so a killed run can resume from what it finished.

A directory of shards belongs to one configuration (``fingerprint``: data, partitioning,
checkpoints, scores and their parameters); a rerun with another configuration starts over.
Files are written to a temporary name and renamed, so a shard either is complete or does not
exist; ``done()`` also checks each file's row count against its partition's size.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.artifacts import atomic_write_bytes, write_table


class ShardStore:
    def __init__(self, directory: Path, fingerprint: str, sizes: Sequence[int]):
        self.dir = Path(directory)
        self.sizes = list(sizes)
        stamp = self.dir / "fingerprint.json"
        if self.dir.exists():
            try:
                same = json.loads(stamp.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                print(f"{self.dir}: shards of another configuration; starting over", flush=True)
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            atomic_write_bytes(stamp, json.dumps({"fingerprint": fingerprint, "parts": len(sizes)}).encode())

    def path(self, part: int) -> Path:
        return self.dir / f"part-{part:06d}.parquet"

    def done(self) -> List[int]:
        """Partitions whose shard exists with the right number of rows."""
        out = []
        for p in range(len(self.sizes)):
            f = self.path(p)
            if f.exists():
                try:
                    if pq.read_metadata(f).num_rows == self.sizes[p]:
                        out.append(p)
                        continue
                except (OSError, pa.ArrowException):
                    pass
                f.unlink(missing_ok=True)  # unreadable or wrong size: score it again
        return out

    def write(self, part: int, cols: Dict[str, np.ndarray]) -> None:
        write_table(self.path(part), to_table(cols), {"kind": "score_shard"})

    def read_all(self) -> Dict[str, np.ndarray]:
        tables = [pq.read_table(self.path(p)) for p in range(len(self.sizes))]
        return from_table(pa.concat_tables(tables))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def to_table(cols: Dict[str, np.ndarray]) -> pa.Table:
    arrays = {}
    for k, v in cols.items():
        v = np.asarray(v)
        if v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
        else:
            arrays[k] = pa.array(v)
    return pa.table(arrays)


def from_table(table: pa.Table) -> Dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out
