"""Connecting to Ray: a cluster when ``RAY_ADDRESS`` is set, else a private local instance.

The private instance is private: every Ray process of it binds to loopback (Ray's
single-machine mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which also keeps other nodes from
joining) and runs with token authentication (``RAY_AUTH_MODE=token``), the token in a file only
this user can read (``~/.cache/winnow/ray/auth_token``, unless ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH`` names one). A process without the token cannot run anything in it."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import ray

# Set on every process of the job's own Ray (the driver and, inherited, Ray's daemons and workers).
PRIVATE_RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")


def _local_temp_dir() -> str:
    """Our own temp dir (never Ray's shared /tmp/ray): on a shared machine we must be able to
    stop exactly what we started. Short path: Ray's socket names must fit in 107 bytes."""
    return os.environ.get("WINNOW_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), f"winnow-ray-{os.getuid()}")


def _refuse(path: str, st: os.stat_result, why: str):
    from engine.errors import ConfigError

    return ConfigError(f"{path} {why} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); the job's own Ray "
                       f"keeps its token there: remove it and rerun")


def _token_dir() -> str:
    # Not Ray's temp dir: Ray makes that world-writable (chmod 0777) on every start.
    from engine.storage import cache_root

    return str(cache_root() / "ray")


def private_token_path(token_dir: Optional[str] = None) -> str:
    """The token file of the job's own Ray, ``auth_token`` in ``~/.cache/winnow/ray``: created
    once with a random 256-bit token, mode 0600, in a directory this user owns that no one else
    can write. A directory or file someone else could have planted or read is refused, never used."""
    token_dir = token_dir or _token_dir()
    os.makedirs(token_dir, mode=0o700, exist_ok=True)
    st = os.lstat(token_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise _refuse(token_dir, st, "is not a directory that only this user can write")
    path = os.path.join(token_dir, "auth_token")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077 or st.st_size == 0:
        raise _refuse(path, st, "is not a non-empty file that only this user can read")
    return path


def _reload_ray_settings() -> None:
    """Make this process see the environment's auth mode and single-machine switch. Ray reads
    them once (``RAY_AUTH_MODE`` into its C++ config, the cluster switch into a module constant)
    when first imported, which may be before a job sets them."""
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR,
                                                              not ray_constants.IS_WINDOWS_OR_OSX)
    reset_auth_token_state()


@contextlib.contextmanager
def private_ray_env(token_dir: Optional[str] = None, dashboard_url: Optional[str] = None) -> Iterator[dict]:
    """The environment of the job's own Ray, set for the block and restored after it: token
    authentication, loopback only. Yields the variables it set (the token's path included).

    ``dashboard_url``: where Ray's state API is served. Ray's own processes (Ray Train's
    placement-group cleaner among them) otherwise find their cluster by scanning the machine for
    GCS processes, and fail with "Found multiple active Ray instances" as soon as another Ray
    runs on it (another job, another user)."""
    env = dict(PRIVATE_RAY_ENV)
    if dashboard_url:
        env["RAY_API_SERVER_ADDRESS"] = dashboard_url
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_TOKEN_PATH"] = private_token_path(token_dir)
    saved = {k: os.environ.get(k) for k in _AUTH_ENV}
    os.environ.update(env)
    _reload_ray_settings()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _reload_ray_settings()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None, dashboard: bool = True,
                log_to_driver: bool = True, log_dir: Optional[str] = None, job: str = "job") -> Iterator[None]:
    """``_session`` (below); with ``log_dir`` (a job's run directory), what Ray and its
    processes write to standard error goes to ``log_dir/logs/ray.log`` instead of the console,
    unless the job runs with ``--verbose`` (``engine.console``)."""
    if ray.is_initialized() or log_dir is None:
        with _session(num_cpus, num_gpus, dashboard, log_to_driver):
            yield
        return
    from engine.console import LOG_NAME, ray_logs_to

    with ray_logs_to(Path(log_dir) / LOG_NAME, job) as log:
        if log is not None:
            print(f"ray: Ray's own output goes to {log} (--verbose shows it here)", flush=True)
        with _session(num_cpus, num_gpus, dashboard, log_to_driver):
            yield


@contextlib.contextmanager
def _session(num_cpus: Optional[int], num_gpus: Optional[int], dashboard: bool,
             log_to_driver: bool) -> Iterator[None]:
    """Use the running Ray (tests share one per session), connect to ``RAY_ADDRESS``, or start
    a private local instance (loopback only, token authentication: see the module's doc); shut
    down only what this call started.

    The local dashboard listens on 127.0.0.1 only, on ``$WINNOW_DASHBOARD_PORT`` or a free
    port (printed by Ray); it asks for the token. Ray Train's placement-group cleaner needs the
    state API that the dashboard serves; without it, it logs a warning every second."""
    if ray.is_initialized():
        yield
        return
    dashboard = dashboard and _dashboard_available()
    # Our workers print their own progress lines; Ray Train's print patch would echo each twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    _keep_worker_lines_as_printed()
    kwargs = dict(include_dashboard=dashboard, log_to_driver=log_to_driver, configure_logging=True,
                  logging_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        _init_keeping_signal_handlers(**kwargs)
        try:
            yield
        finally:
            ray.shutdown()
        return
    kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=_local_temp_dir())
    url = None
    if dashboard:
        port = int(os.environ.get("WINNOW_DASHBOARD_PORT") or _free_port())
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
        url = f"http://127.0.0.1:{port}"
    with private_ray_env(dashboard_url=url), _env_defaults(LOCAL_TRAIN_ENV):
        _init_keeping_signal_handlers(**kwargs)
        if url:
            token = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
            print(f"ray: a private local Ray; its dashboard: {url} (it asks for the token in {token})", flush=True)
        try:
            yield
        finally:
            ray.shutdown()


def _keep_worker_lines_as_printed() -> None:
    """The lines Winnow's workers print (a proxy's epochs, a run's passes) reach the console one
    by one: Ray's deduplication would fold similar lines into one "[repeated 4x across
    cluster]" (``RAY_DEDUP_LOGS``, read once when Ray is imported, so set on its module), and
    off a terminal the prefix naming the worker carries no colour codes (``RAY_COLOR_PREFIX``;
    a value the user set wins)."""
    import ray._private.ray_logging as ray_logging

    if "RAY_DEDUP_LOGS" not in os.environ and hasattr(ray_logging, "RAY_DEDUP_LOGS"):
        ray_logging.RAY_DEDUP_LOGS = False
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


# Ray Train settings for a job's own single-machine Ray (a variable the user set wins). Its
# controller polls the workers every 2 s by default, so every run ends up to 2 s after its loop
# (bench/overhead.py: "Ray Train stop" 4.5 s of a 22.5 s run), and it starts a preemption watcher
# actor, a process of its own, for spot instances a laptop does not have. On a cluster
# (RAY_ADDRESS) Ray's defaults stay.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def _env_defaults(defaults: dict) -> Iterator[None]:
    """``defaults`` in os.environ for the block (those not already set); removed after it."""
    added = [k for k in defaults if k not in os.environ]
    os.environ.update({k: defaults[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class _ErrorsToLogFile:
    """A filter for the console handlers of Ray Data's logger: its ERROR records (a failed task's
    traceback, "Exception occurred in Ray Data or Ray Core internal code", "Full stack trace")
    stay in Ray Data's log file (``ray-data.log`` in the session's logs) and out of the console,
    where the job's one ``jobs.X: error:`` line reports the error, its remote traceback in the
    job's error log (jobs._cli)."""

    def filter(self, record) -> bool:
        return record.levelno < logging.ERROR


def keep_ray_errors_off_the_console() -> None:
    """Install ``_ErrorsToLogFile`` on the console handlers of the ``ray.data`` logger (once;
    its file handlers keep everything)."""
    import ray.data  # noqa: F401  (configures the logger's handlers)

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
            continue  # Ray Data's file handler (SessionFileHandler, a plain Handler) keeps everything
        if not any(isinstance(f, _ErrorsToLogFile) for f in handler.filters):
            handler.addFilter(_ErrorsToLogFile())


def _init_keeping_signal_handlers(**kwargs) -> None:
    """``ray.init``, leaving the job's SIGTERM handler in place: ``ray.init`` replaces it with
    ``sys.exit(15)``, which skips the job's clean stop (jobs._cli: one line, exit 143)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    keep_ray_errors_off_the_console()
    try:
        ray.init(**kwargs)
    except Exception as e:  # any error: Ray did not start (a timeout under load, a port taken, a bad address)
        from engine.errors import ConfigError, RunFailedError

        if isinstance(e, ConfigError):
            raise
        where = os.environ.get("RAY_ADDRESS") or "a local Ray for this job"
        why = " ".join(str(e).split()) or "no message; the machine may be too loaded to start Ray in time"
        raise RunFailedError(f"could not start or reach {where} ({type(e).__name__}: {why[:300]}); rerun the "
                             f"same command when the machine is less loaded") from e
    if main and previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _dashboard_available() -> bool:
    """Whether this Ray install can serve the dashboard (``ray[default]``); a minimal Ray
    (``ray[data,train,tune]`` only) runs the same jobs without it."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (Ray's own test for ray[default])
    except ImportError:
        return False
    return True


RESOURCE_WAIT_ENV = "WINNOW_RESOURCE_WAIT_S"
DEFAULT_RESOURCE_WAIT_S = 900.0  # a GPU node from zero: instance start, image pull, setup (a few minutes)


def resource_wait_s() -> float:
    """How long a job on a cluster waits for the nodes it needs: ``$WINNOW_RESOURCE_WAIT_S``
    seconds, 900 by default."""
    from engine.errors import ConfigError

    text = os.environ.get(RESOURCE_WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_RESOURCE_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{RESOURCE_WAIT_ENV}={text!r}: expected a number of seconds >= 0")
    return value


def units_that_fit(nodes: List[Dict[str, float]], per_unit: Dict[str, float]) -> int:
    """How many bundles of ``per_unit`` the nodes (each a dict of its total resources) hold
    at once, a bundle never split across nodes (as a Ray Train worker or an actor needs)."""
    need = {r: float(a) for r, a in per_unit.items() if a and float(a) > 0}
    if not need:
        return 1 << 30
    return sum(min(int(float(node.get(r, 0)) // a + 1e-9) for r, a in need.items()) for node in nodes)


def _alive_node_resources() -> List[Dict[str, float]]:
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def _request_from_autoscaler(bundles: List[Dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _fmt(res: Dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items()) if v) or "nothing"


def require_resources(what: str, per_unit: dict, units: int = 1, *, nodes=_alive_node_resources,
                      request=_request_from_autoscaler, clock=time.monotonic, sleep=time.sleep, say=None,
                      poll_s: float = 5.0, say_every_s: float = 60.0) -> None:
    """Make sure ``units`` workers or actors needing ``per_unit`` resources each (``{"GPU": 1,
    "CPU": 2}``) can be placed before the job asks Ray for them; ``what`` names the flags behind
    the request, e.g. "--gpus 1 per worker". Ray itself would queue an impossible request forever.

    On a local Ray (no ``RAY_ADDRESS``: the job's own instance, or a test session's) what the
    machine does not have is refused at once (``ConfigError``, exit 2). On a cluster
    (``RAY_ADDRESS`` set), where the autoscaler may add nodes (GPU workers scale from zero), the
    job asks the autoscaler for them, says what it waits for (and again every ``say_every_s``),
    and gives up after ``$WINNOW_RESOURCE_WAIT_S`` seconds (900 by default) with one line
    (``ResourcesUnavailableError``, exit 1); the request to the autoscaler is withdrawn either way."""
    from engine.errors import ConfigError, ResourcesUnavailableError

    say = say or (lambda line: print(line, flush=True))
    need = {r: float(a) for r, a in per_unit.items() if a and float(a) > 0}
    have_nodes = nodes()
    if units_that_fit(have_nodes, need) >= units:
        return
    totals: Dict[str, float] = {}
    for node in have_nodes:
        for r, a in node.items():
            totals[r] = totals.get(r, 0.0) + float(a)
    if not os.environ.get("RAY_ADDRESS"):
        for res, amount in need.items():
            if amount * units > totals.get(res, 0.0) + 1e-9 or not units_that_fit(have_nodes, {res: amount}) >= units:
                raise ConfigError(f"{what} needs {amount * units:g} {res}(s) in all; this machine's Ray has "
                                  f"{totals.get(res, 0.0):g} (on a cluster that adds nodes, set RAY_ADDRESS or use "
                                  f"ray job submit)")
        raise ConfigError(f"{what} needs {units} x {_fmt(need)}, which this machine's Ray ({_fmt(totals)}) cannot "
                          f"place at once")
    wait = resource_wait_s()
    start = last_said = clock()
    request([dict(need) for _ in range(units)])
    try:
        say(f"waiting for {units} x {_fmt(need)} ({what}): the cluster has {_fmt({r: totals.get(r, 0.0) for r in need})} "
            f"now; asked its autoscaler for them; giving up after {wait:g} s ({RESOURCE_WAIT_ENV})")
        while True:
            elapsed = clock() - start
            if units_that_fit(nodes(), need) >= units:
                say(f"the cluster has them after {elapsed:.0f} s")
                return
            if elapsed >= wait:
                raise ResourcesUnavailableError(
                    f"{what}: the cluster did not provide {units} x {_fmt(need)} within {wait:g} s; check its "
                    f"node types and autoscaler (ray status), or wait longer with {RESOURCE_WAIT_ENV}=SECONDS")
            if clock() - last_said >= say_every_s:
                last_said = clock()
                say(f"still waiting for {units} x {_fmt(need)} ({elapsed:.0f} s of {wait:g} s)")
            sleep(min(poll_s, max(wait - elapsed, 0.0)) or poll_s)
    finally:
        request([])


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
