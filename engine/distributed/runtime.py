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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None,
                dashboard: bool = True, log_to_driver: bool = True) -> Iterator[None]:
    """Use the running Ray (tests share one per session), connect to ``RAY_ADDRESS``, or start
    a local instance; shut down only what this call started.

    The local dashboard listens on 127.0.0.1 only, on ``$WINNOW_DASHBOARD_PORT`` or a free
    port (printed by Ray). Ray Train's placement-group cleaner needs the state API that the
    dashboard serves; without it, it logs a warning every second."""
    if ray.is_initialized():
        yield
        return
    dashboard = dashboard and _dashboard_available()
    # Our workers print their own progress lines; Ray Train's print patch would echo each twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = dict(include_dashboard=dashboard, log_to_driver=log_to_driver, configure_logging=True,
                  logging_level="WARNING")
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=_local_temp_dir())
        if dashboard:
            port = int(os.environ.get("WINNOW_DASHBOARD_PORT") or _free_port())
            kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _dashboard_available() -> bool:
    """Whether this Ray install can serve the dashboard (``ray[default]``); a minimal Ray
    (``ray[data,train,tune]`` only) runs the same jobs without it."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (Ray's own test for ray[default])
    except ImportError:
        return False
    return True


def require_resources(what: str, per_unit: dict, units: int = 1) -> None:
    """On a local Ray (no ``RAY_ADDRESS``: the job's own instance, or a test session's), refuse at
    once what the machine can never give: ``units`` actors or workers needing ``per_unit``
    resources each (``{"GPU": 1, "CPU": 2}``) beyond the instance's totals. Ray would otherwise
    queue the request forever. On a cluster (``RAY_ADDRESS`` set) the autoscaler may add nodes,
    so nothing is refused here. ``what`` names the flags, e.g. "--gpus 1 per worker"."""
    from engine.errors import ConfigError

    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    for res, amount in per_unit.items():
        need = float(amount or 0) * units
        if need > 0 and need > float(have.get(res, 0)) + 1e-9:
            raise ConfigError(f"{what} needs {need:g} {res}(s) in all; this machine's Ray has "
                              f"{float(have.get(res, 0)):g} (on a cluster that adds nodes, set RAY_ADDRESS or use "
                              f"ray job submit)")


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def ray_running() -> bool:
    return ray.is_initialized()


def task_map(fn, items):
    """``map(fn, items)`` as Ray tasks (1 CPU each), results in order; connects to
    ``RAY_ADDRESS`` if Ray is not initialised yet in this process."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    remote = ray.remote(num_cpus=1)(fn)
    return ray.get([remote.remote(item) for item in items])
