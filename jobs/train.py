"""Train a model on a manifest's subset (or the whole training split) with Ray Train.

    python -m jobs.train --data fashion-mnist-mini --manifest runs/select/manifest.parquet \\
        --model small-cnn --epochs 10 --out runs/train

prints a line per epoch and ``test accuracy 0.8xx on 3000 samples (30000 seen) in NN s``;
writes ``runs/train/metrics.json`` and ``runs/train/model.pt``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine import artifacts
from engine.config import TrainConfig, to_dict
from engine.data import load_source
from engine.errors import DataError
from engine.models import check_model_name
from jobs._cli import Parser, add_optim_flags, entry, optim_from, output_dir


def build_parser() -> Parser:
    d = TrainConfig()
    p = Parser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=d.data, help="data source spec (as in jobs.score; default %(default)s)")
    p.add_argument("--manifest", default=None, help="manifest.parquet from jobs.select; omit to train on everything")
    p.add_argument("--model", default=d.model, help="model: small-cnn, resnet18-cifar, torchvision:NAME")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs over the (sub)set (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (data parallel)")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per worker (0 = CPU training)")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation and shuffling seed")
    p.add_argument("--out", default=d.out, help="run directory for metrics.json and model.pt")
    add_optim_flags(p)
    return p


def config_from(argv: Sequence[str]) -> TrainConfig:
    a = build_parser().parse_args(argv)
    cfg = TrainConfig(data=a.data, model=a.model, manifest=a.manifest, epochs=a.epochs, workers=a.workers,
                      gpus=a.gpus, seed=a.seed, optim=optim_from(a), out=a.out)
    cfg.validate()
    return cfg


def load_subset(cfg: TrainConfig):
    """Check names, data and manifest before Ray starts. Returns (ids, weight, train size,
    manifest hash) with ids/weight None for full-data training."""
    check_model_name(cfg.model)
    source = load_source(cfg.data)
    n_train = source.num_rows("train")
    if cfg.manifest is None:
        return None, None, n_train, None
    ids, weight, _ = artifacts.read_manifest(cfg.manifest)
    known = source.arrays("train").sample_id
    absent = ids[~np.isin(ids, known)]
    if len(absent):
        raise DataError(f"manifest {cfg.manifest!r} names {len(absent)} sample_id(s) absent from the training "
                        f"split of {cfg.data!r}, e.g. {absent[:5].tolist()}")
    return ids, weight, len(ids), artifacts.file_hash(cfg.manifest)


def run_train(cfg: TrainConfig, subset: Optional[tuple] = None) -> dict:
    """Stages: check inputs (unless ``subset`` from ``load_subset`` is given), fit on Ray
    Train, write metrics.json. Assumes a Ray session."""
    from engine.dist.train import fit_on_ray

    ids, weight, n, manifest_hash = subset or load_subset(cfg)
    with output_dir(cfg.out) as out:
        m = fit_on_ray(cfg, ids, weight)
        metrics = {"test_accuracy": m["test_accuracy"], "wall_time_s": m["wall_time_s"],
                   "train_time_s": m.get("train_time_s"), "samples_seen": m["samples_seen"], "train_size": n,
                   "epochs": cfg.epochs, "manifest": cfg.manifest, "manifest_hash": manifest_hash,
                   "config": to_dict(cfg), "environment": artifacts.environment()}
        artifacts.write_json(out / "metrics.json", metrics)
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {n} samples ({metrics['samples_seen']} seen) "
          f"in {metrics['wall_time_s']:.1f}s -> {Path(cfg.out) / 'metrics.json'}")
    return metrics


def main(argv: Sequence[str]) -> None:
    cfg = config_from(argv)
    subset = load_subset(cfg)
    from engine.dist.runtime import ray_session

    with ray_session():
        run_train(cfg, subset)


if __name__ == "__main__":
    entry("jobs.train", main)
