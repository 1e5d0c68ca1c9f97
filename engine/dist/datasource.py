"""A Ray Data datasource over an ``engine.data.Source``'s partitions (streaming reads)."""
from __future__ import annotations

from typing import List, Optional

from ray.data import ReadTask
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource

from engine.data import Source


class SourceDatasource(Datasource):
    """Each read task reads one or more of the source's partitions and yields Arrow blocks
    ``{sample_id, image (uint8 tensor), label}``; nothing passes through the driver.
    With ``only`` (partition indices), just those partitions are read, and every row carries
    its partition's index in a ``part`` column (the unit of scoring shards and resume)."""

    def __init__(self, source: Source, split: str, target_rows: int = 8192, only: Optional[List[int]] = None):
        super().__init__()
        parts = source.partitions(split, target_rows)
        self._tag = only is not None
        self._parts = [(i, parts[i]) for i in (range(len(parts)) if only is None else only)]
        h, w, c = source.info().image_shape
        self._row_bytes = h * w * c + 16

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(p.num_rows for _, p in self._parts) * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> List[ReadTask]:
        groups = [self._parts[i::parallelism] for i in range(min(parallelism, len(self._parts)))]
        tasks = []
        for group in groups:
            rows = sum(p.num_rows for _, p in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * self._row_bytes, input_files=None, exec_stats=None)
            tasks.append(ReadTask(_reader(group, self._tag), meta))
        return tasks


def _reader(parts, tag: bool):
    def read():
        import numpy as np

        for index, part in parts:
            for batch in part.read():
                if tag:
                    batch = {**batch, "part": np.full(len(batch["sample_id"]), index, dtype=np.int32)}
                yield BlockAccessor.batch_to_block(batch)
    return read


def read_source(source: Source, split: str, target_rows: int = 8192, only: Optional[List[int]] = None):
    """The split as a Ray Dataset (lazy; read in parallel by Ray Data); ``only``: see
    ``SourceDatasource``."""
    import ray.data

    return ray.data.read_datasource(SourceDatasource(source, split, target_rows, only))


__all__ = ["SourceDatasource", "read_source"]
