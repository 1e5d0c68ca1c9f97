"""Sweeps on Ray Tune: a grid of retraining trials, each a Tune function that runs
``engine.stages.train.train_stage``: in its own process when a trial is one worker on the job's
own machine (``engine.distributed.in_process``; the trial then reserves the trial's CPUs and
GPUs), else by fitting a ``TorchTrainer`` (``engine.distributed.train.fit_on_ray``). Trial
actors are reused from one trial to the next (``reuse_actors``): a process, its imports and its
loaded data serve many trials.

The grid is expanded by the caller into explicit trial dicts (so that, e.g., the full-data
baseline is not repeated for every fraction) and handed to Tune as one ``grid_search`` over
them: Tune's own tables, the dashboard and TensorBoard show every field as ``trial/<field>``.
Each trial's reports reach Tune (``tune.report`` from the in-process run, Ray's
``TuneReportCallback`` from a TorchTrainer), so Tune sees the test accuracy after every pass,
which is what ASHA stops on.

Results live under one storage path (``<storage>/<name>``, one directory per trial named by
its key); TensorBoard event files are written there by Tune's TBX logger. Resuming is the
caller's: ``engine.stages.sweep`` hands a rerun only the trials without a result, and each of those
resumes from its own Ray Train checkpoints. (``Tuner.restore`` is not used: it never reruns a
trial it recorded as finished, even when that trial's result was lost.)
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, List, Optional, Sequence

import ray
from ray import tune

logger = logging.getLogger(__name__)

# What a trial's own function reserves (Tune refuses an empty request); its TorchTrainer's
# workers reserve the trial's real resources.
TRIAL_CPU = 0.01


def report_callbacks() -> list:
    """Ray Train callbacks for a ``TorchTrainer`` launched from a Tune trial: Tune's report
    callback inside a Tune session, nothing outside one (``jobs.train`` on its own)."""
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if not _in_tune_session():
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def train_trial(config: dict, cfg, out: str, executor: str = "ray-train") -> None:
    """The Tune trial function of a sweep (``engine.stages.sweep``): ``train_stage`` on the
    trial's manifest, every pass's metrics forwarded to Tune (by Ray Train's report callback, or
    directly from a run in this trial's own process, ``executor`` in-process). A trial whose
    metrics.json exists (an earlier run finished it) is not trained again: its final metrics are
    reported as they are."""
    from dataclasses import replace
    from pathlib import Path

    from engine import hooks
    from engine.stages.sweep import trial_result
    from engine.stages.train import train_stage

    hooks.fire("train.timing", phase="trial_start", epoch=None)
    tc, done = trial_result(cfg, config["trial"], Path(out))
    if done is not None:
        report_to_tune({"test_accuracy": done["test_accuracy"], "passes": done["passes"], "reused": True})
        return
    tc = replace(tc, executor=executor)
    if executor == "in-process":
        train_stage(tc, reporters=[report_to_tune])
    else:
        train_stage(tc, callbacks=report_callbacks())
    hooks.fire("train.timing", phase="trial_end", epoch=None)


def report_to_tune(metrics: dict) -> None:
    """Report ``metrics`` to the running Tune trial (for a trial that reuses an earlier result
    instead of fitting a ``TorchTrainer``)."""
    tune.report(metrics)


def trial_dir_name() -> Optional[str]:
    """The running Tune trial's name, or None outside Tune."""
    try:
        return tune.get_context().get_trial_name()
    except Exception:  # any error: not in a Tune session
        return None


def concurrency(cpus_per_trial: float, gpus_per_trial: float, requested: int = 0, own: float = TRIAL_CPU) -> int:
    """Trials to run at once: ``requested`` if > 0, else as many as the cluster's CPUs (or
    GPUs, for GPU trials) hold. An autoscaling cluster starts with no GPU nodes: there a GPU
    sweep should say ``max_concurrent_trials`` (the GPU workers it may scale to)."""
    if requested > 0:
        return requested
    res = ray.cluster_resources()
    if gpus_per_trial > 0:
        return max(1, int(math.floor(res.get("GPU", 0) / gpus_per_trial)))
    return max(1, int(math.floor(res.get("CPU", 1) / (max(cpus_per_trial, 1e-3) + own))))


def run_tuner(trainable: Callable[..., None], trials: Sequence[dict], *, storage: str, name: str,
              max_concurrent: int, asha: Optional[dict] = None, max_t: int = 1,
              params: Optional[dict] = None, resources: Optional[dict] = None):
    """Fit (or restore and finish) a Tuner whose trials are ``trainable({"trial": t}, **params)``
    for every ``t`` in ``trials`` (``params`` travel through the object store once, by
    ``tune.with_parameters``); ``max_concurrent`` bounds the trials that run at once.
    ``asha``: ``{"grace_period": passes, "reduction_factor": r}`` stops trials whose test
    accuracy trails (metric ``test_accuracy``, time ``training_iteration`` = passes).
    ``resources``: what a trial reserves; by default ``TRIAL_CPU`` only, the TorchTrainer it
    starts reserving its workers' resources (a trial that trains in its own process reserves
    the trial's CPUs and GPUs). Returns the ``ResultGrid``."""
    if params:
        trainable = tune.with_parameters(trainable, **params)
    fn = tune.with_resources(trainable, resources or {"CPU": TRIAL_CPU})
    scheduler = None
    if asha:
        scheduler = asha_scheduler(max_t, int(asha.get("grace_period", 1)), float(asha.get("reduction_factor", 2)))
    from engine.console import verbose

    callbacks = [ReclaimOrphanedPlacementGroups(), TrialProgress(len(trials))]
    tuner = tune.Tuner(
        fn,
        param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(storage_path=storage, name=name, verbose=1 if verbose() else 0,
                                  failure_config=tune.FailureConfig(max_failures=1), callbacks=callbacks),
    )
    # Tune's own SIGINT handler ends the run "gracefully" and returns a partial ResultGrid that
    # the sweep would report as finished; the job's handler (jobs._cli) stops it with one
    # "interrupted" line and exit 130 instead; a rerun runs the trials without a result.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    return tuner.fit()


def asha_scheduler(passes: int, grace_period: int, reduction_factor: float):
    """ASHA on the per-pass test accuracy that stops trials only *before* their last pass.

    Stock ASHA stops every trial when it reports ``max_t`` and may cut one at a rung equal to
    its last pass: Tune then kills the trial between its last report and the end of its
    function, so a fully trained trial loses its result (metrics.json, model) to a race. Here
    a STOP at or after the last pass becomes CONTINUE: the trial finishes and keeps its result;
    trials that trail at an earlier rung are stopped as usual."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class _StopBeforeLastPass(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and result.get("training_iteration", 0) >= passes:
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action

    passes = max(1, int(passes))
    return _StopBeforeLastPass(time_attr="training_iteration", metric="test_accuracy", mode="max",
                               max_t=passes, grace_period=min(int(grace_period), passes),
                               reduction_factor=reduction_factor, stop_last_trials=False)


def orphaned_placement_groups(job_id: Optional[str] = None) -> List[str]:
    """Hex ids of this job's placement groups whose creator actor has died: not detached, not
    removed, created by an actor (not by a driver) that is dead.

    A trial's ``TorchTrainer`` places its workers in a placement group that its Train
    controller actor creates. When Tune stops the trial (ASHA) or it fails, the trial actor
    and its controller die, but a placement group created by an actor lives as long as the
    *job*: its CPUs/GPUs stay reserved and the next trials' workers never get scheduled (a
    sweep that hangs forever at "pending placement groups"). Ray Train's own cleaner removes
    it only when it can reach the state API, i.e. only with the dashboard; this check reads
    the GCS placement-group table directly and works on a minimal Ray too."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = job_id or ray.get_runtime_context().get_job_id()
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        d = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = d.creator_actor_id
        by_actor = bool(creator) and creator != b"\xff" * len(creator)
        if (d.state != gcs_pb2.PlacementGroupTableData.REMOVED and not d.is_detached and by_actor
                and d.creator_actor_dead and d.creator_job_id.hex() == job):
            out.append(d.placement_group_id.hex())
    return out


def reclaim_orphaned_placement_groups(job_id: Optional[str] = None) -> List[str]:
    """Remove :func:`orphaned_placement_groups`; returns the ids removed."""
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_hex in orphaned_placement_groups(job_id):
        try:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
            removed.append(pg_hex)
        except Exception as e:  # any error: removed meanwhile, e.g. by Ray Train's cleaner
            logger.debug("placement group %s not removed: %s", pg_hex, e)
    return removed


class ReclaimOrphanedPlacementGroups(tune.Callback):
    """Tune callback (driver side): every ``interval_s`` of the Tune loop, and whenever a trial
    ends, remove the placement groups that stopped or failed trials' Train controllers left
    behind (see :func:`orphaned_placement_groups`)."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self._last = 0.0
        self.reclaimed: List[str] = []

    def _reclaim(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        try:
            removed = reclaim_orphaned_placement_groups()
        except Exception as e:  # any error: never let housekeeping fail a sweep
            logger.warning("could not check for orphaned placement groups: %s", e)
            return
        if removed:
            logger.info("released %d placement group(s) left by stopped trials", len(removed))
            self.reclaimed.extend(removed)

    def on_step_begin(self, iteration, trials, **info):
        self._reclaim()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._reclaim(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._reclaim(force=True)


class TrialProgress(tune.Callback):
    """Tune callback (driver side): Winnow's own line per trial that ends (its key, passes, test
    accuracy or error), with how many are done and the sweep's ETA (the sweep's time so far per
    finished trial, which already counts the trials running at once, times the trials left),
    instead of Tune's status tables (shown with ``--verbose``)."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()

    def _line(self, trial, what: str) -> None:
        self.done += 1
        left = self.total - self.done
        elapsed = time.monotonic() - self.t0
        eta = f", about {elapsed / self.done * left:.0f} s left" if left else ""
        print(f"tune: trial {trial.config['trial']['key']} {what} ({self.done}/{self.total} done in "
              f"{elapsed:.0f} s{eta})", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        acc = r.get("test_accuracy")
        if acc is None:
            what = "ended without a result"
        elif r.get("final") or r.get("reused"):
            what = f"test-acc {acc:.4f} after {r.get('passes', '?')} pass(es)" + (" (an earlier run's)"
                                                                                  if r.get("reused") else "")
        else:
            what = f"stopped early at pass {r.get('epoch', '?')} (test-acc {acc:.4f})"
        self._line(trial, what)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "failed (its error is listed at the end)")


def _trial_name(trial) -> str:
    """The trial's key (e.g. ``topk-el2n-f0.3-s0``) names it on the dashboard, in TensorBoard
    and on disk, instead of Tune's long parameter string."""
    return str(trial.config["trial"]["key"])


def trial_errors(grid) -> List[str]:
    """One line per errored trial of a ``ResultGrid``."""
    out = []
    for r in grid:
        if r.error is not None:
            t = (r.config or {}).get("trial", {})
            first = str(r.error).strip().splitlines()[0] if str(r.error).strip() else type(r.error).__name__
            out.append(f"{t.get('key', '?')}: {first[:200]}")
    return out
