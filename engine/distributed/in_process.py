"""One-worker retraining in the job's own process, with Winnow's own checkpoints and resume.

A ``TorchTrainer`` costs seconds before and after its loop whatever the loop does: a
controller actor, a worker group of its own process (Python, torch and Winnow imported again),
a placement group, and polling (``bench/overhead.py``: about 7.7 s of a short run on the
2-core machine after the settings of ``runtime.LOCAL_TRAIN_ENV``). When one worker on the
job's own machine is asked for, that buys nothing: ``--executor auto`` then runs the same
training function (``engine.distributed.train._train_loop``) here, with an
``InProcessSession`` in place of Ray Train's:

- checkpoints: after every pass rank 0's checkpoint directory (the same files Ray Train
  would persist) is copied to ``RUN/_partial/in_process/run-<fingerprint>/checkpoint_<n>``
  (written under a temporary name and renamed, so a crash never leaves a partial checkpoint
  that looks complete; the two newest are kept);
- resume: a rerun of the same command resumes from the newest one (damaged files fall back to
  the previous checkpoint, planted ones are refused, as for Ray Train's);
- failures: an error in the loop that is not the user's restarts it from the newest
  checkpoint, up to ``--max-failures`` times (Ray Train's ``FailureConfig``); a killed
  process is resumed by the rerun;
- reports: each pass's metrics go to ``reporters`` (a sweep's trial forwards them to Tune).

Same seed, same weights: the loop, its shuffling and its augmentation draws are Ray Train's
(tests/test_train.py checks the two executors give identical weights).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from engine.config import TrainConfig
from engine.errors import ConfigError

SUBDIR = "in_process"
KEEP = 2


class InProcessSession:
    """``RayTrainSession``'s interface for rank 0 of a world of one, in this process."""

    in_process = True
    rank, world = 0, 1

    def __init__(self, run_dir: Path, gpus: float, reporters: Sequence[Callable[[dict], None]] = ()):
        self.run_dir = Path(run_dir)
        self.gpus = gpus
        self.reporters = list(reporters)
        self.last: Optional[tuple] = None  # (metrics, checkpoint dir) of the latest report

    def device(self) -> torch.device:
        return torch.device("cuda:0") if self.gpus else torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device())

    def checkpoints(self) -> list:
        """This run's complete checkpoints, oldest first."""
        from engine.distributed.train import _checkpoint_dirs

        return _checkpoint_dirs(self.run_dir)

    def checkpoint(self):
        from ray.train import Checkpoint

        done = self.checkpoints()
        return Checkpoint.from_directory(str(done[-1])) if done else None

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        path = None
        if checkpoint_dir:
            done = self.checkpoints()
            n = int(done[-1].name.split("_")[-1]) + 1 if done else 1
            path = self.run_dir / f"checkpoint_{n:06d}"
            tmp = self.run_dir / f"{path.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            os.replace(tmp, path)
            for old in done[:max(0, len(done) + 1 - KEEP)]:
                shutil.rmtree(old, ignore_errors=True)
        self.last = (dict(metrics), path)
        for report in self.reporters:
            report(dict(metrics))


def single_machine() -> bool:
    """The job's Ray is its own machine's alone: not a cluster (``RAY_ADDRESS``), one live node,
    the one this process runs on."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return False
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0]["NodeID"] == ray.get_runtime_context().get_node_id()


def resolve_executor(cfg: TrainConfig, stream: bool) -> str:
    """``--executor``: ``in-process`` or ``ray-train``; ``auto`` is in-process for one worker
    with the in-memory loader on the job's own single-machine Ray with its checkpoints local
    (and a GPU in this process if GPUs are asked for), else Ray Train."""
    if cfg.executor == "in-process":
        check_in_process(cfg, stream, gpu=torch.cuda.is_available())
        return "in-process"
    if cfg.executor == "ray-train":
        return "ray-train"
    ok = unmet_need(cfg, stream, gpu=torch.cuda.is_available()) is None and single_machine()
    return "in-process" if ok else "ray-train"


def trial_executor(base: TrainConfig, workers: int, source) -> str:
    """The executor of a sweep's trials, decided once by the driver (a trial's resources are
    reserved before it starts): ``resolve_executor`` for the YAML's train section with the
    trial's workers, on the full training split (its largest subset)."""
    from dataclasses import replace

    from engine.data import load_source
    from engine.distributed.train import resolve_loader

    cfg = replace(base, workers=workers)
    return resolve_executor(cfg, resolve_loader(cfg, None, source or load_source(base.data)) == "ray-data")


def check_in_process(cfg: TrainConfig, stream: bool, gpu: bool) -> None:
    """ConfigError naming what ``--executor in-process`` needs and ``cfg`` does not give."""
    why = unmet_need(cfg, stream, gpu)
    if why:
        raise ConfigError(f"--executor in-process needs {why}; use --executor ray-train")


def unmet_need(cfg: TrainConfig, stream: bool, gpu: bool) -> Optional[str]:
    """What the in-process path needs and ``cfg`` does not give (``stream``: the ray-data loader;
    ``gpu``: whether this process sees a GPU), or None."""
    if cfg.workers != 1:
        return "--workers 1"
    if stream:
        return "the in-memory loader (--loader memory)"
    if "://" in (cfg.checkpoint_storage or ""):
        return "a local --checkpoint-storage (not a URI)"
    if cfg.gpus and not gpu:
        return "a GPU visible to this process"
    return None


def fit_in_process(cfg: TrainConfig, loop_cfg: dict, storage: str, name: str, work: Path,
                   reporters: Sequence[Callable[[dict], None]] = ()) -> dict:
    """Run ``_train_loop`` here with an ``InProcessSession`` (restarting from the newest
    checkpoint after an error, at most ``cfg.max_failures`` times). Returns the final metrics
    and the final checkpoint's directory."""
    from engine.distributed.train import _raise_run_failed, _train_loop, check_checkpoints
    from engine.errors import user_error

    check_checkpoints(storage, name)
    session = InProcessSession(Path(storage, name), cfg.gpus, reporters)
    session.run_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    rng = torch.get_rng_state(), np.random.get_state()
    try:
        for attempt in range(cfg.max_failures + 1):
            try:
                _train_loop(loop_cfg, session)
                break
            except Exception as exc:
                if user_error(exc) is not None or attempt == cfg.max_failures:
                    _raise_run_failed(exc, cfg, work, logs=None)  # the job's line names its traceback file
                print(f"train: the run failed ({type(exc).__name__}: {str(exc)[:200]}); restarting from its "
                      f"last checkpoint ({attempt + 1}/{cfg.max_failures})", flush=True)
    finally:  # the loop set the job's threads and seeded its generators
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
    return session.last
