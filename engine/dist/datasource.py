"""A Ray Data datasource over an ``engine.data.Source``'s partitions (streaming reads)."""
from __future__ import annotations

from typing import List, Optional

from ray.data import ReadTask
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource

from engine.data import Source


class SourceDatasource(Datasource):
    """Each read task reads one or more of the source's partitions and yields Arrow blocks
    ``{sample_id, image (uint8 tensor), label}``; nothing passes through the driver."""

    def __init__(self, source: Source, split: str, target_rows: int = 8192):
        super().__init__()
        self._parts = source.partitions(split, target_rows)
        h, w, c = source.info().image_shape
        self._row_bytes = h * w * c + 16

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(p.num_rows for p in self._parts) * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> List[ReadTask]:
        groups = [self._parts[i::parallelism] for i in range(min(parallelism, len(self._parts)))]
        tasks = []
        for group in groups:
            rows = sum(p.num_rows for p in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * self._row_bytes, input_files=None, exec_stats=None)
            tasks.append(ReadTask(_reader(group), meta))
        return tasks


def _reader(parts):
    def read():
        for part in parts:
            for batch in part.read():
                yield BlockAccessor.batch_to_block(batch)
    return read


def read_source(source: Source, split: str, target_rows: int = 8192):
    """The split as a Ray Dataset (lazy; read in parallel by Ray Data)."""
    import ray.data

    return ray.data.read_datasource(SourceDatasource(source, split, target_rows))


__all__ = ["SourceDatasource", "read_source"]
