"""Retraining on Ray Train: a ``TorchTrainer`` over a plain training function.

Each worker loads the data itself (an in-memory ``ArraySplit``; only the manifest's ids and
weights travel), takes its share of every global batch, and trains. Rank 0 evaluates on the
test split, and after each pass over the subset reports a checkpoint holding the model,
optimizer, scheduler and counters. From that checkpoint a failed worker group restarts
(``FailureConfig``) and a rerun of the same command resumes (the checkpoints live under
``RUN/_partial/`` until the run succeeds). The shuffling order is a function of (seed, pass),
so a resumed run takes exactly the steps an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from engine import hooks
from engine.artifacts import load_tensors, save_tensors
from engine.config import TrainConfig, to_dict
from engine.data import load_source
from engine.data.base import StreamedSplit
from engine.distributed.in_process import resolve_executor
from engine.distributed.runtime import require_resources
from engine.errors import ConfigError, DamagedFileError, RunFailedError, user_error

PARTIAL = "_partial"

# Fields that change what is trained; the evaluation and failure settings do not.
# fields that do not change the trained weights: a run differing only in these resumes
_EVAL_ONLY = {"out", "executor", "geometry", "pgd_eps", "pgd_steps", "pgd_step_size", "eval_samples", "max_failures",
              "cpus_per_worker", "checkpoint_storage"}


def run_fingerprint(cfg: TrainConfig, manifest_hash: Optional[str]) -> str:
    """What the checkpoints of a run depend on: the training config and the manifest."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _EVAL_ONLY}
    d["manifest_hash"] = manifest_hash
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


class RayTrainSession:
    """What the training loop asks of its runner, in a Ray Train worker: rank and world size,
    the device, the model wrapped for data parallelism, the checkpoint to resume from, and
    ``report`` (metrics, with a checkpoint directory from rank 0) to the controller, which
    persists the checkpoint and restarts the worker group from it on a failure.
    ``engine.distributed.in_process.InProcessSession`` is the same for one worker in the job's
    own process."""

    in_process = False

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _train_loop(loop_cfg: dict, session=None) -> None:
    """Runs in every Ray Train worker (or, given ``session``, in the job's process): the passes
    from the last checkpoint on, rank 0 evaluating and checkpointing after each."""
    from engine.models import build_model
    from engine.train import make_optimizer, seed_everything
    from engine.train.adaptive import adaptive_plan, warm_passes

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own line per pass is enough
    cfg: TrainConfig = loop_cfg["cfg"]
    session = session or RayTrainSession()
    rank, world = session.rank, session.world
    timing = hooks.fire if rank == 0 else (lambda *a, **k: None)
    timing("train.timing", phase="loop_start", epoch=None)
    if not cfg.gpus:
        torch.set_num_threads(max(1, int(loop_cfg.get("threads", 1))))
    source = load_source(cfg.data)
    info = source.info()
    data = _worker_data(cfg, loop_cfg, source, rank)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0], **cfg.model_options)
    model = session.prepare(model)
    device = session.device()
    passes, total_steps = adaptive_plan(data["rows"], cfg.optim.batch_size * world, cfg.epochs, cfg.budget,
                                        data["full_rows"], warm_passes(cfg.adaptive.warm_start))
    opt, sched = make_optimizer(model, cfg.optim, total_steps)
    penalty = _penalty(cfg, info)
    checkpoint = session.checkpoint()
    state = _restore(checkpoint, model, opt, sched, rank, passes)
    if device.type == "cuda" and not data["stream"] and data["transform"] == "none" and not cfg.adaptive.every:
        # augmentation runs on the host; an adaptive run's subsets are taken from the host's split
        data["train"] = _to_device(data["train"], device)
        _warm_up(model, data["train"], info, device, penalty)
    run = dict(session=session, cfg=cfg, source=source, info=info, model=model, opt=opt, sched=sched, device=device, penalty=penalty,
               rank=rank, world=world, passes=passes, total_steps=total_steps, timing=timing, **data)
    timing("train.timing", phase="ready", epoch=None)
    start = state["epoch"] + 1
    run["started"] = (time.time(), start)
    if state.get("selections"):  # resumed: the subset of the last selection before the checkpoint
        _use_selection(run, state["selections"][-1])
    for epoch in range(start, passes + 1):
        if cfg.adaptive.every:
            _maybe_reselect(run, state, epoch)
        timing("train.timing", phase="pass_start", epoch=epoch)
        t0 = time.time()
        steps, seen, loss = _one_pass(run, epoch, total_steps - state["steps"])
        if "infobatch_pos" in run:
            _infobatch_after(run, state, steps)
        timing("train.timing", phase="trained", epoch=epoch)
        state["train_time_s"] += time.time() - t0
        state["steps"] += steps
        state["samples_seen"] += seen
        state["epoch"] = epoch
        _after_pass(run, state, epoch, loss, Path(loop_cfg["work_dir"]))
    if state["epoch"] == passes and checkpoint is not None and start == passes + 1:
        _report_again(run, state)
    timing("train.timing", phase="loop_end", epoch=None)


def _report_again(run: dict, state: dict) -> None:
    """The run resumed from its last pass's checkpoint (it died after it): report the final
    metrics again."""
    if run["rank"] != 0:
        run["session"].report({"final": True})
        return
    from engine.train import evaluate

    # rank 0 evaluates alone: through DDP's wrapper each forward would broadcast the BatchNorm
    # buffers to workers that are not evaluating, and wait for them for ever
    model, test, info, device = _unwrap(run["model"]), run["test"], run["info"], run["device"]
    acc = evaluate(model, test, info, device)
    _report_with_checkpoint(run["session"], _final_metrics(run["cfg"], model, test, info, device, state, run["passes"],
                                                           acc), model, run["opt"], run["sched"], state)


def _maybe_reselect(run: dict, state: dict, epoch: int) -> None:
    """Adaptive selection (``engine.train.adaptive``): before the passes it is due for, choose
    the subset again on the current model and train on it from this pass on; the selection is
    kept in ``state`` (and so in the checkpoints: a resumed run trains on the same subsets)."""
    from engine.train.adaptive import due, reselect, warm_passes, warm_selection

    cfg = run["cfg"]
    if not due(cfg.adaptive.every, epoch, run["from_manifest"], warm_passes(cfg.adaptive.warm_start)):
        return
    if cfg.adaptive.selector == "infobatch":
        return _infobatch_select(run, state, epoch)
    previous = state["selections"][-1]["ids"].numpy() if state["selections"] else \
        (np.asarray(run["train"].sample_id) if run["from_manifest"] else None)
    if run["world"] > 1:  # each worker recomputes its share of the input; rank 0 selects, everyone trains on it
        how = {"gather": _Gather(run["rank"], run["world"]), "solve": run["rank"] == 0}
    else:  # alone: the selector's classes as Ray tasks on the CPUs this process leaves idle meanwhile
        from engine.distributed.runtime import task_map

        # not inside a sweep trial: its placement group holds the trial's CPUs, and they are busy here
        alone = run["session"].in_process and ray.is_initialized() and \
            ray.get_runtime_context().get_placement_group_id() is None
        how = {"mapper": task_map if alone else map}
    which = warm_selection(cfg.adaptive, epoch)
    r = reselect(_unwrap(run["model"]), run["full"], run["info"], run["device"], which, cfg.seed, epoch,
                 previous, batch_size=cfg.optim.batch_size, weigh=which is cfg.adaptive, **how)
    if r is not None and which is not cfg.adaptive:
        r.record.update(selector="geda (warm start)", params={})
    if run["world"] > 1:  # rank 0's selection is everyone's, whatever each worker's floating-point luck
        box = [r]
        torch.distributed.broadcast_object_list(box, src=0)
        r = box[0]
    chosen = {"epoch": epoch, "ids": torch.as_tensor(r.ids), "weight": torch.as_tensor(r.weight)}
    state["selections"].append(chosen)
    state["reselections"].append(r.record)
    _use_selection(run, chosen)
    if run["rank"] == 0:
        overlap = "" if r.record["overlap"] is None else f", {r.record['overlap']:.0%} kept"
        print(f"train: selected {len(r.ids)} of {len(run['full'])} samples before pass {epoch} ({r.record['selector']}; "
              f"scoring {r.record['scoring_s']:.1f} s, solving {r.record['solving_s']:.1f} s{overlap})", flush=True)


class _Gather:
    """Data-parallel workers exchange their shares of the selector's input (gloo/NCCL
    all_gather of Python objects; the shares are small next to the images)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, positions: np.ndarray, values):
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, (positions, values))
        if parts[0][1] is None:
            return None
        n = sum(len(p) for p, _ in parts)
        out = np.empty((n, *np.shape(parts[0][1])[1:]), dtype=np.float64)
        for p, v in parts:
            out[p] = v
        return out


def _use_selection(run: dict, chosen: dict) -> None:
    """Train on ``chosen`` from now on, its weights normalised as a manifest's (``_worker_data``),
    or as they are for InfoBatch's (``raw``: its 1 / keep ratio is the point)."""
    run["train"] = run["full"].subset(chosen["ids"].numpy())
    weight = chosen["weight"].numpy().astype(np.float64)
    run["weight"] = weight if chosen.get("raw") else weight / weight.mean()


def _infobatch_select(run: dict, state: dict, epoch: int) -> None:
    """InfoBatch (``engine.train.infobatch``) before pass ``epoch``: the rows it trains on and
    their loss weights, from the latest losses (``state["scores"]``, in sample_id order; kept
    in the checkpoints, so a resumed run prunes as the first one would have)."""
    from engine.train import infobatch as ib
    from engine.train.adaptive import selection_seed

    cfg, t0 = run["cfg"], time.time()
    if "infobatch" not in run:  # once per run: its parameters and the full split's ids in score order
        run["infobatch"] = (ib.check_params(cfg.adaptive.params), np.sort(np.asarray(run["full"].sample_id)))
    p, ids = run["infobatch"]
    if "scores" not in state:
        state["scores"] = torch.full((len(ids),), ib.INITIAL_SCORE, dtype=torch.float64)
    if ib.prunes(epoch, run["passes"], p["delta"]):
        pos, w = ib.prune(state["scores"].numpy(), p["prune_ratio"], np.random.default_rng(selection_seed(cfg.seed, epoch)))
    else:
        pos, w = np.arange(len(ids)), np.ones(len(ids))
    previous = state["selections"][-1]["ids"].numpy() if state["selections"] else None
    chosen = {"epoch": epoch, "ids": torch.as_tensor(ids[pos]), "weight": torch.as_tensor(w), "raw": True}
    record = {"epoch": epoch, "selector": "infobatch", "size": int(len(pos)), "scoring_s": 0.0,
              "solving_s": round(time.time() - t0, 4), "pruned": int(len(ids) - len(pos)),
              "rescaled": int((w != 1).sum()), "scored": int((state["scores"] != ib.INITIAL_SCORE).sum()),
              "overlap": None if previous is None else float(np.isin(ids[pos], previous).mean())}
    state["selections"] = [chosen]  # the current one only: the next is drawn from the scores the checkpoint holds
    state["reselections"].append(record)
    _use_selection(run, chosen)
    run["infobatch_pos"] = pos  # the full split's positions (sample_id order) of the rows trained on in this pass
    if run["rank"] == 0:
        print(f"train: infobatch before pass {epoch}: {len(pos)} of {len(ids)} samples ({record['pruned']} pruned, "
              f"{record['rescaled']} rescaled)", flush=True)


def _infobatch_after(run: dict, state: dict, steps: int) -> None:
    """After an InfoBatch pass: every worker's per-sample losses, gathered by position, become
    the scores of the samples they saw; the learning-rate schedule moves on by a full pass's
    steps, so the rate at each pass is the full-data run's."""
    pos, seen = run["infobatch_pos"], run.pop("pass_losses").cpu().numpy()
    visited = ~np.isnan(seen)
    parts = [(pos[visited], seen[visited])]
    if run["world"] > 1:
        parts = [None] * run["world"]
        torch.distributed.all_gather_object(parts, (pos[visited], seen[visited]))
    for where, values in parts:
        state["scores"][torch.as_tensor(where)] = torch.as_tensor(values)
    full_pass = math.ceil(len(state["scores"]) / (run["cfg"].optim.batch_size * run["world"]))
    for _ in range(max(0, full_pass - steps)):
        run["sched"].step()


def _worker_data(cfg: TrainConfig, loop_cfg: dict, source, rank: int) -> dict:
    """This worker's training rows (in memory, or None when streamed from its Ray Data
    shard), their count, the full split's count, the normalised manifest weights, the test
    split (rank 0 only; streamed by partition when the training rows are) and the transform."""
    stream = loop_cfg["stream"]
    weight = None
    if stream:  # rows arrive from this worker's Ray Data shard; counts come from the driver
        train, n_rows, full_n = None, loop_cfg["rows"], loop_cfg["full_rows"]
    else:
        train = full = source.arrays("train")
        full_n = len(train)
        if loop_cfg.get("ids") is not None:
            train = train.subset(loop_cfg["ids"])
            weight = np.asarray(loop_cfg["weight"], dtype=np.float64)
            weight = weight / weight.mean()
        n_rows = len(train)
        if cfg.adaptive.every and loop_cfg.get("ids") is None and cfg.adaptive.selector == "infobatch":
            n_rows = full_n  # the steps are planned for full passes (engine.train.infobatch)
        elif cfg.adaptive.every and loop_cfg.get("ids") is None:  # chosen before pass 1: its planned size
            from engine.select.quota import class_quotas

            n_rows = int(class_quotas(np.bincount(np.asarray(full.label)), cfg.adaptive.fraction).sum())
    test = None if rank != 0 else StreamedSplit(source, "test") if stream else source.arrays("test")
    return {"stream": stream, "train": train, "rows": n_rows, "full_rows": full_n, "weight": weight, "test": test,
            "transform": cfg.train_transform or source.info().train_transform,
            "full": None if stream or not cfg.adaptive.every else full,
            "from_manifest": loop_cfg.get("ids") is not None}


def _restore(checkpoint, model, opt, sched, rank: int, passes: int) -> dict:
    """The run's counters, with model, optimizer, scheduler and RNG loaded from ``checkpoint``
    (a restart or a rerun), or fresh ones."""
    if checkpoint is None:
        return {"epoch": 0, "steps": 0, "samples_seen": 0, "train_time_s": 0.0, "history": [], "restarts": 0,
                "selections": [], "reselections": []}
    saved = _load_training_state(checkpoint, rank)
    _unwrap(model).load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    state = {"selections": [], "reselections": [], **saved["counters"], "restarts": saved["counters"].get("restarts", 0) + 1}
    if rank == 0:
        print(f"train: resuming after pass {state['epoch']}/{passes} from its checkpoint", flush=True)
    return state


def _one_pass(run: dict, epoch: int, steps_left: int) -> tuple:
    """One pass over this worker's rows: (global steps, global rows, this worker's mean loss)."""
    from engine.train import shuffled_batches, train_epoch, weighted_batches

    cfg, source, transform = run["cfg"], run["source"], run["transform"]
    if run["stream"]:
        return _stream_pass(run["model"], run["opt"], run["sched"], run["info"], run["device"], run["penalty"], cfg,
                            epoch, steps_left, run["rows"], run["world"],
                            _stream_augment(source, transform, cfg.seed, epoch))
    B, weight, train = cfg.optim.batch_size, run["weight"], run["train"]
    if weight is not None and cfg.weighting == "sampling":
        batches = weighted_batches(weight, B * run["world"], cfg.seed, epoch)
    else:
        batches = shuffled_batches(len(train), B * run["world"], cfg.seed, epoch)
    batches = batches[:steps_left]
    mine = [b[run["rank"] * B:(run["rank"] + 1) * B] for b in batches]
    sample_w = weight if cfg.weighting == "loss" else None
    losses = None
    if "infobatch_pos" in run:  # InfoBatch: this pass's per-sample losses become the scores (NaN: another worker's rows)
        losses = run["pass_losses"] = torch.full((len(train),), float("nan"), dtype=torch.float64, device=run["device"])
    loss, _ = train_epoch(run["model"], run["opt"], run["sched"], train, run["info"], [b for b in mine if len(b)],
                          run["device"], sample_w, run["penalty"], _array_augment(source, train, transform, cfg.seed, epoch),
                          losses)
    return len(batches), int(sum(len(b) for b in batches)), loss


def _after_pass(run: dict, state: dict, epoch: int, loss: float, work_dir: Path) -> None:
    """Report the pass: rank 0 evaluates, checkpoints (with the final metrics after the last
    pass) and prints a line; the others report their counters."""
    from engine.train import evaluate

    passes = run["passes"]
    metrics = {"epoch": epoch, "passes": passes, "train_loss": loss, **{k: state[k] for k in
               ("steps", "samples_seen", "train_time_s", "restarts")}}
    if run["rank"] != 0:
        run["session"].report(metrics)
        return
    # rank 0 evaluates alone: through DDP's wrapper each forward would broadcast the BatchNorm
    # buffers to workers that are not evaluating, and wait for them for ever
    model, test, info, device = _unwrap(run["model"]), run["test"], run["info"], run["device"]
    metrics["test_accuracy"] = evaluate(model, test, info, device)
    state["history"].append({"epoch": epoch, "train_loss": loss, "test_accuracy": metrics["test_accuracy"]})
    t0, first = run["started"]
    left = (time.time() - t0) / (epoch - first + 1) * (passes - epoch)
    print(f"train: pass {epoch}/{passes} loss {loss:.4f} test-acc {metrics['test_accuracy']:.4f}"
          + (f" (about {left:.0f} s left)" if epoch < passes else ""), flush=True)
    if epoch == passes:  # Result.metrics are those of the last checkpoint: the final ones ride on it
        metrics.update(_final_metrics(run["cfg"], model, test, info, device, state, passes, metrics["test_accuracy"]))
    run["timing"]("train.timing", phase="evaluated", epoch=epoch)
    _report_with_checkpoint(run["session"], metrics, model, run["opt"], run["sched"], state)
    run["timing"]("train.timing", phase="reported", epoch=epoch)
    hooks.fire("train.checkpointed", work_dir=str(work_dir), epoch=epoch, in_process=run["session"].in_process)


def _array_augment(source, train, transform: str, seed: int, epoch: int):
    """``positions -> images`` of one pass over an in-memory split, or None (no transform).
    Draws depend on (seed, pass, sample_id) only: a resumed run, another worker count or
    another batch size sees the same augmented image of a sample in a pass."""
    if transform == "none":
        return None
    return lambda idx: source.augment(train.image[idx], train.sample_id[idx], transform, seed, epoch)


def _stream_augment(source, transform: str, seed: int, epoch: int):
    """The same for streamed batches (which carry their ``sample_id``; for ``rrc-flip`` on
    encoded images, the files' bytes instead of images: decoded here, so no process holds them)."""
    if transform == "none":
        return None
    from engine.distributed.proxies import decode_augment

    return lambda batch: decode_augment(batch, source.spec, transform, seed, epoch)["image"]


def _stream_pass(model, opt, sched, info, device, penalty, cfg: TrainConfig, epoch: int, steps_left: int,
                 n_rows: int, world: int, augment=None) -> tuple:
    """One pass over this worker's Ray Data shard (rows shuffled within a local buffer, seeded
    by seed and pass). Returns (global steps, global rows, this worker's mean loss). Every
    worker's shard has the same number of rows (Ray Train splits with ``equal=True``), so they
    take the same number of steps; a full pass must deliver every manifest row once, which is
    checked against the driver's count."""
    from engine.train import train_stream_epoch

    B = cfg.optim.batch_size
    shard = ray.train.get_dataset_shard("train")
    if augment is None:
        batches = shard.iter_torch_batches(batch_size=B, local_shuffle_buffer_size=max(8 * B, 2048),
                                           local_shuffle_seed=cfg.seed * 100_003 + epoch)
    else:  # the transform works on numpy images and needs each row's sample_id
        batches = shard.iter_batches(batch_size=B, batch_format="numpy", local_shuffle_buffer_size=max(8 * B, 2048),
                                     local_shuffle_seed=cfg.seed * 100_003 + epoch)
    loss, rows, steps = train_stream_epoch(model, opt, sched, batches, info, device, penalty, steps_left, augment)
    counts = torch.tensor([rows, steps], dtype=torch.int64, device=device)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
        steps_total = int(counts[1]) // world  # every worker took the same steps
    else:
        steps_total = int(counts[1])
    rows_total = int(counts[0])
    full_pass = steps_left >= math.ceil((n_rows // world) / B)  # the budget allowed a whole pass
    if full_pass and not n_rows - world < rows_total <= n_rows:  # an equal split drops fewer than `world` rows
        raise RuntimeError(f"the Ray Data shard(s) delivered {rows_total} rows in pass {epoch}, expected {n_rows}")
    return steps_total, rows_total, loss


def _encoded_rows(source, transform: str) -> bool:
    """Whether streamed rows carry encoded bytes (rrc-flip crops the original of an image file)."""
    from engine.data.images import EncodedImages

    return transform == "rrc-flip" and isinstance(source, EncodedImages) and source.encoded


def train_dataset(source, ids: Optional[np.ndarray], weight: Optional[np.ndarray], encoded: bool = False):
    """The training split of ``source`` as a Ray Dataset read in parallel from its partitions,
    restricted to the manifest's ids with their weights (normalised to mean 1) as a
    ``weight`` column; all rows with weight 1 without a manifest. ``encoded``: image files'
    rows carry their bytes (``read_source``)."""
    from engine.distributed.datasource import read_source

    ds = read_source(source, "train", encoded=encoded)
    if ids is None:
        return ds.map_batches(_with_unit_weight, batch_format="numpy")
    order = np.argsort(ids)
    w = np.asarray(weight, dtype=np.float64)
    return ds.map_batches(_subset_rows, batch_format="numpy",
                          fn_kwargs={"ids": np.asarray(ids, dtype=np.int64)[order],
                                     "weight": (w / w.mean())[order].astype(np.float32)})


def _with_unit_weight(batch: dict) -> dict:
    return {**batch, "weight": np.ones(len(batch["label"]), dtype=np.float32)}


def _subset_rows(batch: dict, ids: np.ndarray, weight: np.ndarray) -> dict:
    """The rows whose sample_id is in ``ids`` (sorted), with their weight."""
    sid = np.asarray(batch["sample_id"], dtype=np.int64)
    pos = np.clip(np.searchsorted(ids, sid), 0, len(ids) - 1)
    keep = ids[pos] == sid
    return {**{k: np.asarray(v)[keep] for k, v in batch.items()}, "weight": weight[pos[keep]]}


def _to_device(train, device: torch.device, limit_bytes: int = 2 << 30):
    """The training split's uint8 images and labels moved to the GPU once (when they fit in
    ``limit_bytes``): batches are then gathered there, with no host copy per step."""
    if train.image.nbytes > limit_bytes:
        return train
    from engine.data import ArraySplit

    return ArraySplit(train.sample_id, torch.as_tensor(train.image).to(device),
                      torch.as_tensor(train.label).to(device))


def _warm_up(model, train, info, device, penalty) -> None:
    """One forward and backward pass of a throwaway copy of the model on one batch: CUDA's
    lazy initialisation and cuDNN's algorithm search happen here, outside the timed passes
    (``train_time_s``), and the real model, optimizer and random state are untouched."""
    import copy

    from engine.train import batch_to_input

    rng = torch.get_rng_state()
    shadow = copy.deepcopy(_unwrap(model)).train()
    idx = np.arange(min(len(train), 128))
    x = batch_to_input(train.image[idx], info, device)
    y = torch.as_tensor(train.label[idx], device=device)
    loss = torch.nn.functional.cross_entropy(shadow(x), y, reduction="none")
    if penalty is not None:
        loss = loss + penalty(shadow, x, y)
    loss.mean().backward()
    torch.cuda.synchronize(device)
    del shadow
    torch.set_rng_state(rng)


def _report_with_checkpoint(session, metrics: dict, model, opt, sched, state: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                    "counters": state}, os.path.join(tmp, "state.pt"))
        torch.save(_unwrap(model).state_dict(), os.path.join(tmp, "model.pt"))
        session.report(metrics, tmp)


def _final_metrics(cfg, model, test, info, device, state, passes, accuracy) -> dict:
    final = {"final": True, "passes": passes, "test_accuracy": accuracy, "history": list(state["history"]),
             **{k: state[k] for k in ("steps", "samples_seen", "train_time_s", "restarts")}}
    if cfg.adaptive.every:
        final["reselections"] = list(state["reselections"])  # the stage adds up the bill
    final.update(_final_eval(cfg, _unwrap(model), test, info, device))
    return final


def _penalty(cfg: TrainConfig, info):
    """λ·Curv + μ·GradReg per sample, or None. ``curvature_eps`` is in pixel units; the
    model sees normalised inputs, so the step is divided by the data's (mean) std."""
    if not cfg.curvature_lambda and not cfg.gradreg:
        return None
    from engine.train.regularizers import build_penalty
    from engine.units import input_units

    return build_penalty(curvature_lambda=cfg.curvature_lambda, gradreg_mu=cfg.gradreg,
                         curvature_eps=input_units(cfg.curvature_eps, tuple(info.std)))


def _final_eval(cfg: TrainConfig, model, test, info, device) -> dict:
    """The LCNN paper's geometry table and ℓ2 PGD robust accuracy on the test split (first
    ``eval_samples`` rows), when asked for."""
    out = {}
    if not cfg.geometry and not cfg.pgd_eps:
        return out
    from engine.evaluation import geometry_metrics, robust_accuracy

    n = cfg.eval_samples or None
    if isinstance(test, StreamedSplit):
        test = test.head(n)
    model.eval()
    if cfg.geometry:
        t0 = time.time()
        out["geometry"] = geometry_metrics(model, test, info, device, max_samples=n)
        print(f"eval: geometry {json.dumps(out['geometry'])} ({time.time() - t0:.1f}s)", flush=True)
    if cfg.pgd_eps:
        t0 = time.time()
        acc = robust_accuracy(model, test, info, device, eps_list=tuple(cfg.pgd_eps), steps=cfg.pgd_steps,
                              step_size=cfg.pgd_step_size, max_samples=n)
        out["robust_accuracy"] = {f"{float(k):g}": float(v) for k, v in acc.items()}
        print(f"eval: l2 PGD accuracy {json.dumps(out['robust_accuracy'])} ({time.time() - t0:.1f}s)", flush=True)
    return out


def _raise_run_failed(exc: BaseException, cfg: TrainConfig, work: Path,
                      logs: Optional[str] = "the Ray session's logs/train/"):
    """A user error raised inside a worker keeps its message; a worker that died more often
    than ``max_failures`` allows becomes one ``RunFailedError`` line naming the first error."""
    err = user_error(exc)
    if err is not None:
        raise err from exc
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "Error" in ln and "Training failed" not in ln and "Snippet" not in ln),
                  lines[0] if lines else type(exc).__name__)
    raise RunFailedError(f"training failed after {cfg.max_failures} restart(s) ({detail[:300]}); "
                         f"checkpoints are kept in {work}: rerun the same command to resume"
                         + (f" (worker logs: {logs})" if logs else "")) from exc


STATE = "the training state of a training checkpoint"


def _load_training_state(checkpoint, rank: int) -> dict:
    """The training state saved in ``checkpoint``; if its file is damaged (a crash while it was
    written), the newest older checkpoint of the same run that reads back (Ray Train keeps two).
    A planted file is refused (``RefusedFileError``) and never falls back."""
    with checkpoint.as_directory() as d:
        try:
            return load_tensors(os.path.join(d, "state.pt"), STATE)
        except DamagedFileError as e:
            damaged = e
    here = Path(checkpoint.path)
    older = [p for p in reversed(_checkpoint_dirs(here.parent)) if p.name < here.name] \
        if "://" not in str(checkpoint.path) and here.is_dir() else []
    for prev in older:
        try:
            saved = load_tensors(prev / "state.pt", STATE)
        except DamagedFileError:
            continue
        if rank == 0:
            print(f"train: {damaged}; resuming from the previous checkpoint {prev.name}", flush=True)
        return saved
    raise damaged


def check_checkpoints(storage: str, name: str) -> None:
    """Before a run resumes, read every file of its local checkpoints as data (tensors only),
    before any worker starts. A planted file anywhere stops the job with one line naming it.
    Damaged files are reported; the job stops only if no checkpoint reads back whole (the
    workers fall back to the newest one that does). Checkpoints on a remote
    ``--checkpoint-storage`` are checked by the workers when they load them."""
    if "://" in storage:
        return
    run = Path(storage, name)
    damaged, good = [], []
    for ckpt in _checkpoint_dirs(run):
        try:
            for path in sorted(ckpt.glob("*.pt")):
                load_tensors(path, "a file of a training checkpoint")
            good.append(ckpt)
        except DamagedFileError as e:
            damaged.append(e)
    if damaged and not good:
        raise DamagedFileError(f"{damaged[-1]}; no checkpoint of this run reads back: rerun with --fresh (or delete {run}) "
                               f"to start over")
    for e in damaged:
        print(f"train: {e}; the run resumes from the newest checkpoint that reads back", flush=True)


def checkpoint_root(checkpoint_storage: str, out: str | Path) -> str:
    """The directory of one output's runs under ``--checkpoint-storage``."""
    return checkpoint_storage.rstrip("/") + "/" + Path(out).resolve().name


def _checkpoint_dirs(run: Path) -> list:
    """A run's checkpoint directories, oldest first (not Ray's snapshot .json beside them, nor
    one the in-process runner was writing when it stopped)."""
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir() and not p.name.endswith(".tmp"))


def _storage_path(cfg: TrainConfig, work: Path) -> str:
    """Where Ray Train keeps checkpoints: ``checkpoint_storage`` (a URI or shared path; runs
    are told apart by the fingerprinted name, under the output directory's name) or local."""
    if cfg.checkpoint_storage:
        return checkpoint_root(cfg.checkpoint_storage, cfg.out)
    return str(work / "ray_train")


def fit_on_ray(cfg: TrainConfig, ids: Optional[np.ndarray], weight: Optional[np.ndarray],
               manifest_hash: Optional[str] = None, work_dir: Optional[Path] = None,
               callbacks: Sequence = (), reporters: Sequence = ()) -> dict:
    """Train ``cfg.model`` with ``cfg.workers`` Ray Train workers on the manifest's subset
    (``ids``/``weight``) or the whole training split. Checkpoints go under
    ``work_dir`` (default ``{cfg.out}/_partial``) in a run named by the config's
    fingerprint, so a rerun of the same command resumes; a different config starts afresh.
    Returns the final metrics plus wall time; the final weights are saved to
    ``{cfg.out}/model.pt``. ``callbacks``: Ray Train ``UserCallback``s (a sweep passes Tune's
    ``TuneReportCallback`` so every pass's metrics reach Tune); ``reporters``: functions that
    get every pass's metrics of a run in this process (``--executor``, whose ``auto`` picks
    this process for one worker on the job's own machine unless ``callbacks`` are given)."""
    out = Path(cfg.out).resolve()
    work = Path(work_dir).resolve() if work_dir else out / PARTIAL
    name = f"run-{run_fingerprint(cfg, manifest_hash)}"
    _drop_other_runs(work, name)
    source = load_source(cfg.data)  # listed once here (an image folder on S3 is a long listing)
    stream = resolve_loader(cfg, ids, source) == "ray-data"
    total_cpus = int(ray.cluster_resources().get("CPU", 1))
    # the ray-data loader's read tasks need CPUs of their own: leave one free
    cpus = cfg.cpus_per_worker or max(1, (total_cpus - (1 if stream else 0)) // cfg.workers)
    loop_cfg, datasets = _loop_inputs(cfg, source, ids, weight, stream, max(1, int(cpus)), work)
    if not callbacks and resolve_executor(cfg, stream) == "in-process":
        return _fit_here(cfg, loop_cfg, work, name, reporters)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_cfg, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=bool(cfg.gpus),
                                     resources_per_worker={"CPU": cpus, **({"GPU": cfg.gpus} if cfg.gpus else {})}),
        run_config=RunConfig(storage_path=_storage_path(cfg, work), name=name, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    require_resources(f"--workers {cfg.workers} with --gpus {cfg.gpus:g} and {cpus:g} CPU(s) per worker",
                      {"GPU": cfg.gpus, "CPU": cpus}, cfg.workers)
    check_checkpoints(_storage_path(cfg, work), name)
    # Ray Train's fit() replaces the process's SIGINT handler with its own "graceful abort",
    # which ends in sys.exit and exit status 1 with no word. Keep the job's own (jobs._cli: one
    # "interrupted" line, exit 130, checkpoints kept; shutting Ray down stops the workers).
    trainer._register_sigint_handler = lambda controller: None
    t0 = time.time()
    hooks.fire("train.timing", phase="fit_start", epoch=None)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        _raise_run_failed(exc, cfg, work)
    wall = time.time() - t0
    hooks.fire("train.timing", phase="fit_end", epoch=None)
    if result.error:
        _raise_run_failed(result.error, cfg, work)
    metrics = dict(result.metrics or {})
    with result.checkpoint.as_directory() as d:
        keep_outputs(Path(d), out, cfg)
    metrics["wall_time_s"] = wall
    metrics["loader"] = "ray-data" if stream else "memory"
    metrics["executor"] = "ray-train"
    return metrics


def _fit_here(cfg: TrainConfig, loop_cfg: dict, work: Path, name: str, reporters: Sequence = ()) -> dict:
    """``fit_on_ray``'s in-process path (``engine.distributed.in_process``)."""
    from engine.distributed.in_process import SUBDIR, fit_in_process

    storage = checkpoint_root(cfg.checkpoint_storage, cfg.out) + "/" + SUBDIR if cfg.checkpoint_storage \
        else str(work / SUBDIR)
    print(f"train: one worker in this process (--executor {cfg.executor}; checkpoints in {storage})", flush=True)
    t0 = time.time()
    hooks.fire("train.timing", phase="fit_start", epoch=None)
    metrics, checkpoint_dir = fit_in_process(cfg, loop_cfg, storage, name, work, reporters)
    hooks.fire("train.timing", phase="fit_end", epoch=None)
    keep_outputs(checkpoint_dir, Path(cfg.out).resolve(), cfg)
    return {**metrics, "wall_time_s": time.time() - t0, "loader": "memory", "executor": "in-process"}


def keep_outputs(checkpoint_dir: Path, out: Path, cfg: TrainConfig) -> None:
    """From a run's final checkpoint: ``OUT/model.pt``, and for an adaptive run each selection
    as a manifest ``OUT/selections/pass-NNN.parquet`` (the subset trained on from that pass)."""
    save_tensors(out / "model.pt", load_tensors(checkpoint_dir / "model.pt", "the trained model"))
    if not cfg.adaptive.every:
        return
    from engine import artifacts

    counters = load_tensors(checkpoint_dir / "state.pt", STATE)["counters"]
    records = {r["epoch"]: r for r in counters["reselections"]}
    for chosen in counters["selections"]:  # (InfoBatch keeps its last pass's only)
        record = records[int(chosen["epoch"])]
        meta = {"kind": "manifest", "adaptive": True, "params": cfg.adaptive.params, **record,
                "fraction": cfg.adaptive.fraction, "seed": cfg.seed, "environment": artifacts.environment()}
        artifacts.write_manifest(out / "selections" / f"pass-{record['epoch']:03d}.parquet", chosen["ids"].numpy(),
                                 chosen["weight"].numpy(), meta)


def _drop_other_runs(work: Path, name: str) -> None:
    """Checkpoints of another config cannot be resumed: drop them; make ``work``."""
    if work.is_dir():
        for child in [*work.glob("ray_train/run-*"), *work.glob("in_process/run-*")]:
            if child.name != name:
                shutil.rmtree(child, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)


def _loop_inputs(cfg: TrainConfig, source, ids, weight, stream: bool, threads: int, work: Path) -> tuple:
    """(the workers' loop config, the Ray Datasets they stream or None): in memory, the
    manifest's ids and weights travel in the config; streamed, only counts do."""
    loop_cfg = {"cfg": cfg, "ids": ids, "weight": weight, "threads": threads, "work_dir": str(work), "stream": stream}
    if not stream:
        return loop_cfg, None
    full = source.num_rows("train")
    loop_cfg.update(ids=None, weight=None, rows=full if ids is None else len(ids), full_rows=full)
    transform = cfg.train_transform or source.info().train_transform
    return loop_cfg, {"train": train_dataset(source, ids, weight, encoded=_encoded_rows(source, transform))}


def resolve_loader(cfg: TrainConfig, ids: Optional[np.ndarray], source) -> str:
    """``--loader auto``: ray-data when the (sub)set's decoded images exceed the streaming
    threshold (``engine.distributed.proxies.too_large_for_memory``), else memory. Weighted
    sampling needs the in-memory loader: refused on data that large."""
    if cfg.loader != "auto":
        return cfg.loader
    from engine.distributed.proxies import too_large_for_memory

    large = too_large_for_memory(source, None if ids is None else len(ids))
    if large and cfg.weighting == "sampling":
        raise ConfigError("--weighting sampling needs the in-memory loader, and the training images are over the "
                          "streaming threshold (1 GiB decoded, WINNOW_STREAM_BYTES): use --weighting loss, or "
                          "--loader memory where the workers have the memory")
    return "ray-data" if large else "memory"
