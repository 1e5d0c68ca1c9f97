"""A Ray Data datasource over an ``engine.data.Source``'s partitions (streaming reads)."""
from __future__ import annotations

from typing import List, Optional

from ray.data import ReadTask
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource

from engine.data import Source
from engine.data.base import ArrayPartition


class _StoredPartition:
    """An in-memory partition put in the object store once: read tasks carry the reference,
    not the arrays (a task spec holding megabytes of pixels is shipped with every task and
    retry, and Ray warns about it), and the reading worker maps the arrays zero-copy."""

    def __init__(self, part: ArrayPartition):
        import ray

        self.num_rows = part.num_rows
        self.ref = ray.put(part)

    def read(self):
        import ray

        yield from ray.get(self.ref).read()


class SourceDatasource(Datasource):
    """Each read task reads one or more of the source's partitions and yields Arrow blocks
    ``{sample_id, image (uint8 tensor), label}``. File-backed and synthetic partitions are
    descriptions (paths, row ranges, seeds) read by the task itself; in-memory partitions
    (small data already loaded by the driver) are put in the object store once and the tasks
    carry references. With ``only`` (partition indices), just those partitions are read, and
    every row carries its partition's index in a ``part`` column (the unit of scoring shards
    and resume)."""

    def __init__(self, source: Source, split: str, target_rows: int = 8192, only: Optional[List[int]] = None,
                 encoded: bool = False, parts: Optional[list] = None):
        super().__init__()
        self._encoded = encoded
        # ``parts`` given (``Source.partitions_in_order``): their order is the rows' order, so
        # each read task takes a contiguous run of them (read in order with preserve_order)
        self._contiguous = parts is not None
        parts = source.partitions(split, target_rows) if parts is None else parts
        self._tag = only is not None
        self._parts = [(i, _StoredPartition(parts[i]) if isinstance(parts[i], ArrayPartition) else parts[i])
                       for i in (range(len(parts)) if only is None else only)]
        h, w, c = source.info().image_shape
        self._row_bytes = h * w * c + 16

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(p.num_rows for _, p in self._parts) * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> List[ReadTask]:
        n = min(parallelism, len(self._parts))
        if self._contiguous:
            bounds = [round(i * len(self._parts) / n) for i in range(n + 1)] if n else [0]
            groups = [self._parts[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        else:
            groups = [self._parts[i::parallelism] for i in range(n)]
        tasks = []
        for group in groups:
            rows = sum(p.num_rows for _, p in group)
            meta = BlockMetadata(num_rows=rows, size_bytes=rows * self._row_bytes, input_files=None, exec_stats=None)
            tasks.append(ReadTask(_reader(group, self._tag, self._encoded), meta))
        return tasks


def _reader(parts, tag: bool, encoded: bool = False):
    def read():
        import numpy as np
        import pyarrow as pa

        for index, part in parts:
            if encoded and hasattr(part, "read_encoded"):  # the files' bytes, decoded downstream
                ids, labels, items = part.read_encoded()
                yield pa.table({"sample_id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64()),
                                "data": pa.array([d for _, d in items], pa.binary()),
                                "where": pa.array([w for w, _ in items], pa.string())})
                continue
            for batch in part.read():
                if tag:
                    batch = {**batch, "part": np.full(len(batch["sample_id"]), index, dtype=np.int32)}
                yield BlockAccessor.batch_to_block(batch)
    return read


STREAM_ROWS = 1024  # rows per partition of a streamed split: blocks of a fixed size, whatever N


def read_source(source: Source, split: str, target_rows: int = STREAM_ROWS, only: Optional[List[int]] = None,
                encoded: bool = False, parts: Optional[list] = None):
    """The split as a Ray Dataset (lazy; read in parallel by Ray Data); ``only``: see
    ``SourceDatasource``. Partitions of ``STREAM_ROWS`` rows keep every block (and so what a
    read task, a sort task, the split coordinator or a train worker holds) of a size that does
    not grow with the split: at 64 px about 12 MB decoded. ``encoded``: rows of sources of encoded images carry the files'
    bytes (``data``) and names (``where``) instead of decoded images, for a training transform
    that must see the original (decoded downstream, ``engine.distributed.proxies``)."""
    import ray.data

    return ray.data.read_datasource(SourceDatasource(source, split, target_rows, only, encoded, parts))


__all__ = ["STREAM_ROWS", "SourceDatasource", "read_source"]
