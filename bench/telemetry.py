"""Benchmark telemetry, attached through ``engine.hooks`` (``WINNOW_HOOKS=bench.telemetry``, set
before Ray starts so that Ray's workers and actors install it too).

Retraining phases (``train.timing``): every phase a run reaches, in the driver, in rank 0 and in
a sweep's Tune function, is appended as a JSON line ``{"phase", "epoch", "t", "pid"}`` to
``$WINNOW_TIMING_FILE`` (``bench/overhead.py`` reads them back).

Scoring actors:
Each actor call's bookkeeping rides along as compact numeric columns: ``_actor`` (an int64 key
of the actor), ``_busy`` (the call's seconds, on its first row; 0 on the others), ``_end``
(wall-clock time the call ended) and, on the first row of an actor's first call,
``_init0``/``_init1`` (wall-clock times its constructor began and ended; 0 elsewhere). The
driver drops every ``_`` column before writing shards; here it aggregates them into
``last_run``: rows/s overall; the steady-state rate, from the end of the first call of any
actor to the end of the last call (actor-side clocks; so without the start-up); when the
actors' constructors ran; the seconds the actors spent in calls; the blocks read.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

import numpy as np

last_run: dict = {}   # the latest scoring pass's stats (see ``Telemetry.stats``), set when it ends
_current: List["Telemetry"] = []


TIMING_ENV = "WINNOW_TIMING_FILE"


def install(on) -> None:
    on("train.timing", _timing)
    on("scoring.actor_ready", _actor_ready)
    on("scoring.called", _called)
    on("scoring.start", _start)
    on("scoring.block", _block)
    on("scoring.done", _done)


def _timing(phase: str, epoch) -> None:
    import json

    path = os.environ.get(TIMING_ENV)
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several processes stay whole
            f.write(json.dumps({"phase": phase, "epoch": epoch, "t": time.time(), "pid": os.getpid()}) + "\n")


def _actor_ready(actor, started: float) -> None:
    import ray

    actor_id = ray.get_runtime_context().get_actor_id()
    actor._telemetry_key = int(actor_id[:12], 16) if actor_id else os.getpid()
    actor._telemetry_init = (started, time.time())


def _called(actor, batch, out, seconds: float) -> None:
    n = len(out["sample_id"])
    out["_actor"] = np.full(n, getattr(actor, "_telemetry_key", os.getpid()), dtype=np.int64)
    out["_busy"] = np.zeros(n, dtype=np.float32)
    out["_init0"], out["_init1"] = np.zeros(n), np.zeros(n)
    out["_end"] = np.full(n, time.time())
    if n:
        out["_busy"][0] = seconds
        init = getattr(actor, "_telemetry_init", None)
        if init:
            out["_init0"][0], out["_init1"][0] = init
            actor._telemetry_init = None


def _start(rows: int) -> None:
    _current[:] = [Telemetry()]


def _block(batch) -> None:
    if _current:
        _current[0].update(batch)


def _done(stats: dict) -> None:
    t = _current.pop() if _current else Telemetry()
    last_run.clear()
    last_run.update(t.stats(), blocks=stats.get("blocks"))
    print(t.summary(), flush=True)


class Telemetry:
    def __init__(self):
        self.t0 = time.time()
        self.done = 0
        self.ends: List[tuple] = []       # (call end time, rows) per call, as blocks arrive
        self.rows: Dict[int, int] = {}
        self.busy: Dict[int, float] = {}
        self.inits: Dict[int, tuple] = {}

    def update(self, batch: Dict[str, np.ndarray]) -> None:
        if "_actor" not in batch:
            return
        actors = batch["_actor"]
        self.done += len(actors)
        ends, counts = np.unique(batch["_end"], return_counts=True)
        self.ends.extend(zip(ends.tolist(), counts.tolist()))
        ids, inv = np.unique(actors, return_inverse=True)
        busy = np.bincount(inv, weights=batch["_busy"], minlength=len(ids))
        count = np.bincount(inv, minlength=len(ids))
        for i, a in enumerate(ids.tolist()):
            self.rows[a] = self.rows.get(a, 0) + int(count[i])
            self.busy[a] = self.busy.get(a, 0.0) + float(busy[i])
        for j in np.flatnonzero(batch["_init1"]):
            self.inits[int(actors[j])] = (float(batch["_init0"][j]) - self.t0, float(batch["_init1"][j]) - self.t0)

    def stats(self) -> dict:
        """wall_s; rows; first_block_s (the pass's start to the end of the first call: the start-up);
        steady_rows_per_s (rows of the calls that ended after the first one, over the time from
        the first call's end to the last one's; None with a single call); inits ([(constructor
        start, end)] in seconds from the pass's start); busy_s (seconds all actors spent in calls)."""
        wall = max(time.time() - self.t0, 1e-9)
        out = {"wall_s": wall, "rows": self.done, "inits": sorted(self.inits.values()),
               "busy_s": sum(self.busy.values()), "first_block_s": None, "steady_rows_per_s": None}
        if self.ends:
            ends = sorted(self.ends)
            first, last = ends[0][0], ends[-1][0]
            out["first_block_s"] = first - self.t0
            if last > first:
                out["steady_rows_per_s"] = sum(r for t, r in ends if t > first) / (last - first)
        return out

    def summary(self) -> str:
        s = self.stats()
        per = ", ".join(f"{a:012x}"[:8] + f": {self.rows[a]} rows at {self.rows[a] / max(self.busy[a], 1e-9):.0f}/s"
                        for a in sorted(self.rows))
        inits = "; ".join(f"{a:.1f}-{b:.1f}s" for a, b in s["inits"]) or "?"
        steady = f"{s['steady_rows_per_s']:.0f} rows/s" if s["steady_rows_per_s"] else "n/a (one call)"
        return (f"telemetry: {steady} after the first call; actor constructor(s) ran {inits}; "
                f"{len(self.rows)} actor(s), rows/s while computing: {per}")
