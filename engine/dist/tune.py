"""Sweeps on Ray Tune: a grid of retraining trials, each a Tune function that builds and fits a
``TorchTrainer`` (``engine.dist.train.fit_on_ray``).

The grid is expanded by the caller into explicit trial dicts (so that, e.g., the full-data
baseline is not repeated for every fraction) and handed to Tune as one ``grid_search`` over
them: Tune's own tables, the dashboard and TensorBoard show every field as ``trial/<field>``.
Each trial's Ray Train reports reach Tune through Ray's ``TuneReportCallback``, so Tune sees
the test accuracy after every pass, which is what ASHA stops on.

Results live under one storage path (``<storage>/<name>``, one directory per trial named by
its key); TensorBoard event files are written there by Tune's TBX logger. Resuming is the
caller's: ``jobs.sweep`` hands a rerun only the trials without a result, and each of those
resumes from its own Ray Train checkpoints. (``Tuner.restore`` is not used: it never reruns a
trial it recorded as finished, even when that trial's result was lost.)
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import ray
from ray import tune


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


def trial_dir_name() -> Optional[str]:
    """The running Tune trial's name, or None outside Tune."""
    try:
        return tune.get_context().get_trial_name()
    except Exception:  # noqa: BLE001  (not in a Tune session)
        return None


def concurrency(cpus_per_trial: float, gpus_per_trial: float, requested: int = 0) -> int:
    """Trials to run at once: ``requested`` if > 0, else as many as the cluster's CPUs (or
    GPUs, for GPU trials) hold. An autoscaling cluster starts with no GPU nodes: there a GPU
    sweep should say ``max_concurrent_trials`` (the GPU workers it may scale to)."""
    if requested > 0:
        return requested
    res = ray.cluster_resources()
    if gpus_per_trial > 0:
        return max(1, int(math.floor(res.get("GPU", 0) / gpus_per_trial)))
    return max(1, int(math.floor(res.get("CPU", 1) / (max(cpus_per_trial, 1e-3) + TRIAL_CPU))))


def run_tuner(trainable: Callable[[dict], None], trials: Sequence[dict], *, storage: str, name: str,
              max_concurrent: int, asha: Optional[dict] = None, max_t: int = 1):
    """Fit (or restore and finish) a Tuner whose trials are ``trainable({"trial": t})`` for
    every ``t`` in ``trials``; ``max_concurrent`` bounds the trials that run at once.
    ``asha``: ``{"grace_period": passes, "reduction_factor": r}`` stops trials whose test
    accuracy trails (metric ``test_accuracy``, time ``training_iteration`` = passes).
    Returns the ``ResultGrid``."""
    # trainable reserves TRIAL_CPU only: the TorchTrainer it starts reserves its workers' resources
    fn = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
    scheduler = None
    if asha:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", metric="test_accuracy", mode="max", max_t=max(1, max_t),
            grace_period=int(asha.get("grace_period", 1)), reduction_factor=float(asha.get("reduction_factor", 2)))
    tuner = tune.Tuner(
        fn,
        param_space={"trial": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(storage_path=storage, name=name, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    return tuner.fit()


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
