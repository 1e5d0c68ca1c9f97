"""Named points in the hot paths where tests and ``bench/`` attach code: fault drills (a
scoring actor or a training worker that dies at a chosen moment) and benchmark telemetry
(per-call timings of the scoring actors). Production code only calls ``fire(point, ...)``:
with no hook installed that is a dictionary lookup, and the drills and the telemetry live with
the tests and benchmarks that use them (``tests/drills.py``, ``bench/telemetry.py``).

Hooks must reach Ray's worker processes, so they are installed by name: ``$WINNOW_HOOKS`` is a
comma-separated list of modules (``tests.drills``, ``bench.telemetry``), and in every process
the first ``fire`` imports each and calls its ``install(on)`` once. Ray's workers inherit the
environment of the Ray instance they belong to: set the variable before the job (or the test
session) starts Ray, e.g. ``WINNOW_HOOKS=tests.drills python -m jobs.train ...``. ``install``
does the same in the current process only.

Points (keyword arguments):

- ``scoring.actor_ready(actor, started)``: a scoring actor's constructor finished
  (``started``: wall-clock time it began);
- ``scoring.call(actor, batch)``: a scoring actor received a block, before scoring it;
- ``scoring.called(actor, batch, out, seconds)``: after scoring it; a hook may add columns to
  ``out`` whose names start with ``_`` (the driver drops them before the shards are written);
- ``scoring.start(rows)``: the driver starts a scoring pass over ``rows`` rows;
- ``scoring.block(batch)``: the driver received a scored block (with those columns);
- ``scoring.done(stats)``: the driver's scoring pass ended (``stats``: rows, wall_s, blocks);
- ``train.checkpointed(work_dir, epoch, in_process)``: rank 0 reported pass ``epoch``'s checkpoint
  (``in_process``: in the job's own process, ``engine.distributed.in_process``);
- ``train.timing(phase, epoch)``: a retraining run reached ``phase``: in the driver ``stage_start``,
  ``fit_start``, ``fit_end``, ``stage_end``; in rank 0 ``loop_start``, ``ready``, and per pass
  ``pass_start``, ``trained``, ``evaluated``, ``reported``; ``loop_end``; in a sweep's Tune
  function ``trial_start``, ``trial_end`` (``bench/overhead.py`` times the phases).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, List, Set

from engine.errors import ConfigError

ENV = "WINNOW_HOOKS"
POINTS = ("scoring.actor_ready", "scoring.call", "scoring.called", "scoring.start", "scoring.block", "scoring.done",
          "train.checkpointed", "train.timing")

_hooks: Dict[str, List[Callable]] = {}
_installed: Set[str] = set()
_seen_env: List[str] = []


def on(point: str, fn: Callable) -> None:
    """Call ``fn(**context)`` at ``point`` (what an ``install(on)`` does)."""
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}; known: {', '.join(POINTS)}")
    _hooks.setdefault(point, []).append(fn)


def install(module: str) -> None:
    """Import ``module`` and call its ``install(on)``, once per process."""
    if module in _installed:
        return
    try:
        installer = importlib.import_module(module).install
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"${ENV} names {module!r}, which is not an importable module with an install(on) "
                          f"function ({type(exc).__name__}: {exc})") from None
    _installed.add(module)
    installer(on)


def fire(point: str, **context) -> None:
    env = os.environ.get(ENV, "")
    if env and _seen_env[-1:] != [env]:
        _seen_env.append(env)
        for module in (m.strip() for m in env.split(",")):
            if module:
                install(module)
    for fn in _hooks.get(point, ()):
        fn(**context)


def uninstall_all() -> None:
    """Forget every hook of this process (tests)."""
    _hooks.clear()
    _installed.clear()
    _seen_env.clear()
