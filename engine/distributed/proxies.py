"""Proxies trained through Ray Train from Ray Data: no process holds the training split.

Each proxy seed is a ``TorchTrainer`` fit (seeds run concurrently as the cluster's resources
allow, ``workers`` workers each, GPUs when asked for). Its pass ``e`` reads a Ray Dataset of its
own: the split's rows streamed from the source's partitions (encoded images as their bytes),
sorted by ``order_key(sample_id, seed, e)`` (Ray Data's distributed sort: memory bounded, it
spills), then decoded and given the training transform (``decode_augment``) in parallel
read-side tasks. With one worker the steps are exactly those of the in-memory path
(``fit_proxy``: the same order, the same images, the same batches), so both give the same
scores for the same seeds. Every worker keeps the correctness of each sample it trained on,
by ``sample_id``, in its pass's checkpoint (forgetting scores need it); rank 0 adds the model
at the ``--score-epochs`` and the training state, from which a rerun after a killed driver
resumes (checkpoints under ``RUN/_partial/proxy_train``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from engine.artifacts import load_tensors, save_tensors
from engine.config import ScoreConfig
from engine.data import load_source
from engine.errors import user_error

STREAM_BYTES = 1 << 30  # "auto" loaders stream above this many bytes of decoded images (WINNOW_STREAM_BYTES)


def too_large_for_memory(source, rows: Optional[int] = None) -> bool:
    """Whether ``rows`` (default: the training split's) decoded images exceed ``STREAM_BYTES``
    (or ``$WINNOW_STREAM_BYTES``): the threshold of the "auto" loaders."""
    h, w, c = source.info().image_shape
    limit = int(os.environ.get("WINNOW_STREAM_BYTES") or STREAM_BYTES)
    return (source.num_rows("train") if rows is None else rows) * h * w * c > limit


def use_stream(cfg: ScoreConfig, source) -> bool:
    """``--proxy-loader``: memory, stream, or auto (``too_large_for_memory``)."""
    if cfg.proxy_loader != "auto":
        return cfg.proxy_loader == "stream"
    return too_large_for_memory(source)


def _with_key(batch: dict, seed: int, epoch: int) -> dict:
    from engine.train.loops import order_key

    return {**batch, "key": order_key(batch["sample_id"], seed, epoch)}


_SOURCES: dict = {}


def decode_augment(batch: dict, spec: str, transform: str, seed: int, epoch: int) -> dict:
    """Rows (encoded bytes or stored images) -> ``{sample_id, image uint8 [B, S, S, C],
    label}`` with the training transform of pass ``epoch``: ``rrc-flip`` crops the decoded
    original; the others work on the evaluation transform's output, as in memory."""
    from engine.data.images import decode_eval, decode_rrc_flip
    from engine.data.transforms import augment_batch, sample_rng

    source = _SOURCES.get(spec) or _SOURCES.setdefault(spec, load_source(spec))
    ids = np.asarray(batch["sample_id"], dtype=np.int64)
    if "data" in batch:
        size, name = source.info().image_shape[0], source.info().eval_transform
        items = list(zip(batch["where"], batch["data"]))
        if transform == "rrc-flip":
            images = np.stack([decode_rrc_flip(d, str(w), size, sample_rng(seed, epoch, int(i)))
                               for i, (w, d) in zip(ids, items)]) if len(ids) else \
                np.zeros((0, size, size, 3), np.uint8)
        else:
            images = np.stack([decode_eval(d, str(w), size, name) for w, d in items]) if len(ids) else \
                np.zeros((0, size, size, 3), np.uint8)
            images = augment_batch(images, ids, transform, seed, epoch)
    else:
        images = source.augment(np.asarray(batch["image"]), ids, transform, seed, epoch)
    return {"sample_id": ids, "image": images, "label": np.asarray(batch["label"], dtype=np.int64)}


def epoch_dataset(source, transform: str, seed: int, epoch: int, ids: Optional[np.ndarray] = None):
    """The training split for pass ``epoch`` of proxy ``seed``: in ``order_key`` order, decoded
    and transformed. A source that reads rows in any order (one file per image:
    ``Source.partitions_in_order``) is read in that order directly: the order comes from the
    ids alone, and no process holds more than a partition. Any other is sorted by Ray Data."""
    from engine.distributed.datasource import STREAM_ROWS, read_source
    from engine.train.loops import order_key

    encoded = transform == "rrc-flip"
    ids = source.sample_ids("train") if ids is None else ids  # the split's ids in row order
    order = np.argsort(order_key(ids, seed, epoch), kind="stable")
    parts = source.partitions_in_order("train", order, STREAM_ROWS)
    if parts is not None:
        ds = read_source(source, "train", encoded=encoded, parts=parts)
    else:
        ds = read_source(source, "train", encoded=encoded)
        ds = ds.map_batches(_with_key, batch_format="numpy", fn_kwargs={"seed": seed, "epoch": epoch})
        ds = ds.sort("key")
    return ds.map_batches(decode_augment, batch_format="numpy",
                          fn_kwargs={"spec": source.spec, "transform": transform, "seed": seed, "epoch": epoch})


def _proxy_loop(c: dict) -> None:
    """Runs in every Ray Train worker of one proxy's fit."""
    from engine.models import build_model
    from engine.train import batch_to_input, make_optimizer, seed_everything, train_step

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg: ScoreConfig = c["cfg"]
    seed, info, epochs, keep = c["seed"], c["info"], cfg.epochs, set(c["keep"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.gpus_per_actor:
        torch.set_num_threads(max(1, int(c["threads"])))
    seed_everything(seed)
    model = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    B = cfg.optim.batch_size
    opt, sched = make_optimizer(model, cfg.optim, epochs * math.ceil(c["rows"] / B))
    start = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_tensors(os.path.join(d, "state.pt"), "a proxy's training state")
        _plain(model).load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        start = int(saved["epoch"]) + 1
        if rank == 0:
            print(f"proxy seed {seed}: resuming after epoch {start - 1}/{epochs} from its checkpoint", flush=True)
    elif 0 in keep:  # the initialisation, for scores taken at epoch 0
        _report(rank, 0, model, opt, sched, None, None, float("nan"), keep)
    for epoch in range(start, epochs + 1):
        model.train()
        t0 = time.time()
        ids, hits, total, rows = [], [], 0.0, 0
        shard = ray.train.get_dataset_shard(f"e{epoch}")
        for batch in shard.iter_batches(batch_size=max(1, B // world), batch_format="numpy"):
            x = batch_to_input(batch["image"], info, device)
            y = torch.as_tensor(batch["label"], device=device).long()
            logits, loss = train_step(model, opt, sched, x, y)
            ids.append(np.asarray(batch["sample_id"], dtype=np.int64))
            hits.append((logits.argmax(1) == y).cpu().numpy())
            total += float(loss) * len(y)
            rows += len(y)
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        hits = np.concatenate(hits) if hits else np.zeros(0, bool)
        if rank == 0:
            print(f"proxy seed {seed}: epoch {epoch}/{epochs} loss {total / max(rows, 1):.4f} train-acc "
                  f"{hits.mean() if len(hits) else 0:.3f} ({rows} rows in {time.time() - t0:.1f}s, rank 0 of {world})",
                  flush=True)
        _report(rank, epoch, model, opt, sched, ids, hits, total / max(rows, 1), keep)


def _plain(model):
    return model.module if hasattr(model, "module") else model


def _report(rank, epoch, model, opt, sched, ids, hits, loss, keep) -> None:
    """One pass's checkpoint: this worker's correctness by sample_id; rank 0 adds the model
    (at the kept epochs) and the training state."""
    with tempfile.TemporaryDirectory() as tmp:
        if ids is not None:
            save_tensors(os.path.join(tmp, f"correct-e{epoch}-r{rank}.pt"),
                         {"sample_id": torch.as_tensor(ids), "correct": torch.as_tensor(hits), "loss": float(loss)})
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in _plain(model).state_dict().items()}
            if epoch in keep:
                save_tensors(os.path.join(tmp, f"model-e{epoch}.pt"), state)
            save_tensors(os.path.join(tmp, "state.pt"), {"model": state, "optimizer": opt.state_dict(),
                                                         "scheduler": sched.state_dict(),
                                                         "torch_rng": torch.get_rng_state(), "epoch": epoch})
        ray.train.report({"epoch": epoch}, checkpoint=Checkpoint.from_directory(tmp))


def _collect(checkpoints: list, seed: int, epochs: int, keep, all_ids: np.ndarray, labels: np.ndarray):
    """A ProxyRun from the checkpoints of one proxy's fit (every pass's, as Ray Train registered
    them: a directory a killed run left half written is not among them)."""
    from engine.train import ProxyRun

    states, correct, losses = {}, np.zeros((epochs, len(all_ids)), bool), [float("nan")] * epochs
    for ckpt in checkpoints:
        for f in ckpt.glob("model-e*.pt"):
            states[int(f.stem.split("-e")[1])] = load_tensors(f, "a proxy's weights")
        for f in ckpt.glob("correct-e*-r*.pt"):
            epoch = int(f.stem.split("-e")[1].split("-r")[0])
            got = load_tensors(f, "a proxy's correctness history")
            pos = np.searchsorted(all_ids, got["sample_id"].numpy())
            correct[epoch - 1, pos] = got["correct"].numpy()
            if f.stem.endswith("-r0"):
                losses[epoch - 1] = float(got["loss"])
    missing = sorted(set(keep) - set(states))
    if missing:
        raise RuntimeError(f"proxy seed {seed}: no weights for epoch(s) {missing} in its checkpoints")
    return ProxyRun(seed, {e: states[e] for e in sorted(keep)}, correct, all_ids.copy(), losses, labels.copy())


def train_proxies_streamed(cfg: ScoreConfig, keep: tuple, work: Path, name: str, source=None) -> list:
    """Seeds 0..S-1 as Ray Train fits reading streamed Ray Datasets (see the module's text);
    returns ``ProxyRun``s in seed order. ``name``: the configuration's fingerprint (a rerun of
    the same configuration resumes; other runs' checkpoints are dropped)."""
    from engine.distributed.runtime import _alive_node_resources, require_resources, units_that_fit

    source = source if source is not None else load_source(cfg.data)
    info = source.info()
    transform = cfg.train_transform or info.train_transform
    ids, labels = source.ids_and_labels("train")
    order = np.argsort(ids, kind="stable")
    all_ids, labels = ids[order], labels[order]
    storage = work / "proxy_train"
    if storage.is_dir():
        for child in storage.iterdir():
            if not child.name.startswith(name):
                shutil.rmtree(child, ignore_errors=True)
    storage.mkdir(parents=True, exist_ok=True)
    per_worker = {"CPU": 1.0, **({"GPU": cfg.gpus_per_actor} if cfg.gpus_per_actor else {})}
    workers = cfg.proxy_workers
    require_resources(f"--proxy-workers {workers} with --gpus-per-actor {cfg.gpus_per_actor:g}", per_worker, workers)
    # Ray Data's read, sort and decode tasks need a CPU beside the training workers
    fits = max(1, min(cfg.seeds, (units_that_fit(_alive_node_resources(), per_worker) - 1) // workers))

    def fit(seed: int):
        trainer = TorchTrainer(
            _proxy_loop,
            train_loop_config={"cfg": cfg, "seed": seed, "info": info, "keep": tuple(keep), "rows": len(all_ids),
                               "threads": 1},
            datasets={f"e{e}": epoch_dataset(source, transform, seed, e, ids) for e in range(1, cfg.epochs + 1)},
            dataset_config=DataConfig(execution_options=_ordered()),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cfg.gpus_per_actor),
                                         resources_per_worker=per_worker),
            run_config=RunConfig(storage_path=str(storage), name=f"{name}-seed{seed}",
                                 failure_config=FailureConfig(max_failures=2),
                                 checkpoint_config=CheckpointConfig(num_to_keep=None)),
        )
        trainer._register_sigint_handler = lambda controller: None  # the job's own handler stays (jobs._cli)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise user_error(exc) or exc
        if result.error:
            raise user_error(result.error) or result.error
        print(f"proxy seed {seed}: {cfg.epochs} epoch(s) streamed through Ray Train ({workers} worker(s))", flush=True)
        return _collect([Path(c.path) for c, _ in result.best_checkpoints], seed, cfg.epochs, keep, all_ids, labels)

    with ThreadPoolExecutor(max_workers=fits) as pool:
        return list(pool.map(fit, range(cfg.seeds)))


def _ordered():
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


__all__ = ["decode_augment", "epoch_dataset", "train_proxies_streamed", "use_stream", "STREAM_BYTES"]
