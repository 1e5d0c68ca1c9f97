"""Retraining on Ray Train: a ``TorchTrainer`` over a plain training function."""
from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from engine.artifacts import atomic_write_bytes
from engine.config import TrainConfig
from engine.data import load_source


def _train_loop(loop_cfg: dict) -> None:
    """Runs in every Ray Train worker: load the data, take this worker's share of each global
    batch, train, and report test accuracy with a checkpoint every epoch (rank 0)."""
    from engine.models import build_model
    from engine.train import evaluate, make_optimizer, seed_everything, shuffled_batches, train_epoch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own line per epoch is enough
    cfg: TrainConfig = loop_cfg["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.gpus:
        torch.set_num_threads(max(1, int(loop_cfg.get("threads", 1))))
    source = load_source(cfg.data)
    info = source.info()
    train = source.arrays("train")
    weight = None
    if loop_cfg.get("ids") is not None:
        train = train.subset(loop_cfg["ids"])
        weight = loop_cfg["weight"] / loop_cfg["weight"].mean()
    test = source.arrays("test") if rank == 0 else None

    seed_everything(cfg.seed)
    model = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    global_batch = cfg.optim.batch_size * world
    steps = cfg.epochs * math.ceil(len(train) / global_batch)
    opt, sched = make_optimizer(model, cfg.optim, steps)
    train_time = 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        mine = [b[rank * cfg.optim.batch_size:(rank + 1) * cfg.optim.batch_size]
                for b in shuffled_batches(len(train), global_batch, cfg.seed, epoch)]
        mine = [b for b in mine if len(b)]
        loss, _ = train_epoch(model, opt, sched, train, info, mine, device, weight)
        train_time += time.time() - t0
        metrics = {"epoch": epoch, "train_loss": loss, "train_time_s": train_time,
                   "samples_seen": epoch * len(train)}
        if rank == 0:
            metrics["test_accuracy"] = evaluate(model, test, info, device)
            print(f"train: epoch {epoch}/{cfg.epochs} loss {loss:.4f} test-acc {metrics['test_accuracy']:.4f}")
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(_unwrap(model).state_dict(), os.path.join(tmp, "model.pt"))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def fit_on_ray(cfg: TrainConfig, ids: Optional[np.ndarray], weight: Optional[np.ndarray]) -> dict:
    """Train ``cfg.model`` with ``cfg.workers`` Ray Train workers on the manifest's subset
    (``ids``/``weight``) or the whole training split. Returns the last epoch's metrics plus
    wall time; the final weights are saved to ``{cfg.out}/model.pt``."""
    out = Path(cfg.out).resolve()
    # Each run starts fresh: Ray Train would otherwise find the previous run's checkpoints
    # under the same name (resuming an interrupted run is a separate, explicit feature).
    shutil.rmtree(out / "ray_train", ignore_errors=True)
    threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.workers)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "ids": ids, "weight": weight, "threads": threads},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=bool(cfg.gpus),
                                     resources_per_worker={"CPU": threads, **({"GPU": cfg.gpus} if cfg.gpus else {})}),
        run_config=RunConfig(storage_path=str(out / "ray_train"), name="run"),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "model.pt"), map_location="cpu")
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    metrics["wall_time_s"] = wall
    return metrics
