"""Connecting to Ray: a cluster when ``RAY_ADDRESS`` is set, else a private local instance."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional

import ray


def _local_temp_dir() -> str:
    """Our own temp dir (never Ray's shared /tmp/ray): on a shared machine we must be able to
    stop exactly what we started. Short path: Ray's socket names must fit in 107 bytes."""
    return os.environ.get("WINNOW_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), f"winnow-ray-{os.getuid()}")


@contextlib.contextmanager
def ray_session(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
                dashboard: bool = False) -> Iterator[None]:
    """Use the running Ray (tests share one per session), connect to ``RAY_ADDRESS``, or start
    a local instance; shut down only what this call started."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    kwargs = dict(include_dashboard=dashboard, log_to_driver=True, configure_logging=True,
                  logging_level="WARNING")
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=_local_temp_dir())
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))
