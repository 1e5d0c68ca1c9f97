"""Train a model on a manifest's subset (or the whole training split) with Ray Train.

    python -m jobs.train --data fashion-mnist-mini --manifest runs/select/manifest.parquet \\
        --model small-cnn --epochs 10 --out runs/train

prints a line per pass and ``test accuracy 0.8xx on 3000 samples (30000 seen) in NN s``;
writes ``runs/train/metrics.json`` and ``runs/train/model.pt``.

    # SLo-Curves: CE + λ·Curv(X) (the paper sweeps λ over 0, 0.5, 1, 5, 10, 20, 50)
    python -m jobs.train --manifest runs/curv-0.3.parquet --curvature-lambda 5
    # LCNN: centered softplus, spectral norm, γ-Lipschitz BatchNorm, GradReg; geometry and PGD
    python -m jobs.train --lcnn --gradreg 0.01 --geometry --pgd-eps 0.05,0.1,0.15,0.2

Checkpoints of an unfinished run stay under ``OUT/_partial``; rerunning the same command
resumes from the last one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine import artifacts
from engine.config import TrainConfig, to_dict
from engine.data import load_source
from engine.data.transforms import transforms_of
from engine.errors import DataError
from engine.models import check_model_name
from jobs._cli import (
    Parser,
    add_data_flags,
    add_fresh_flag,
    add_optim_flags,
    add_train_transform_flag,
    data_spec,
    entry,
    float_list,
    optim_from,
    output_dir,
    report_skipped,
    start_fresh,
)


def build_parser() -> Parser:
    d = TrainConfig()
    p = Parser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=d.data, help="data source spec (as in jobs.score; default %(default)s)")
    p.add_argument("--manifest", default=None, help="manifest.parquet from jobs.select; omit to train on everything")
    p.add_argument("--model", default=d.model, help="model: small-cnn, resnet18-cifar, torchvision:NAME")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs over the (sub)set (default %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (data parallel)")
    p.add_argument("--gpus", type=float, default=d.gpus,
                   help="GPUs per worker (0 = CPU training; a fraction such as 0.25 shares one GPU)")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation and shuffling seed")
    p.add_argument("--budget", choices=["epochs", "steps"], default=d.budget,
                   help="epochs: --epochs passes over the subset; steps: as many optimizer steps as --epochs "
                        "passes over the full training split (default %(default)s)")
    p.add_argument("--loader", choices=["auto", "memory", "ray-data"], default=d.loader,
                   help="memory: every worker holds the training split (small data, exact resume); ray-data: "
                        "workers stream their shard of a Ray Dataset read in parallel and evaluation streams the "
                        "test split (memory bounded whatever the data's size; loss weighting only); auto: ray-data "
                        "above 1 GiB of decoded training images (WINNOW_STREAM_BYTES) (default %(default)s)")
    p.add_argument("--weighting", choices=["loss", "sampling"], default=d.weighting,
                   help="manifest weights as per-sample loss weights or as sampling probabilities (with "
                        "replacement, unweighted loss) (default %(default)s)")
    p.add_argument("--curvature-lambda", type=float, default=d.curvature_lambda,
                   help="SLo-Curves regulariser weight λ in CE + λ·Curv(X) (paper grid: 0, 0.5, 1, 5, 10, 20, 50)")
    p.add_argument("--curvature-eps", type=float, default=d.curvature_eps,
                   help="Curv's per-coordinate step in [0, 1] pixel units (default 8/255)")
    p.add_argument("--gradreg", type=float, default=d.gradreg, help="LCNN GradReg weight μ (default 0)")
    p.add_argument("--activation", choices=["relu", "centered_softplus"], default=d.activation,
                   help="model activation (default %(default)s)")
    p.add_argument("--beta", type=float, default=d.beta, help="centered softplus β (default: the model's)")
    p.add_argument("--spectral-norm", action="store_true", help="spectral-normalised convolutions and linear layers")
    p.add_argument("--bn-gamma", type=float, default=d.bn_gamma, help="γ-Lipschitz BatchNorm with this γ")
    p.add_argument("--lcnn", action="store_true",
                   help="the LCNN paper's network: centered softplus + spectral norm + γ-Lipschitz BatchNorm "
                        "(explicit --beta / --bn-gamma override the paper's defaults)")
    p.add_argument("--geometry", action="store_true",
                   help="metrics: E||grad f||, E||hessian f||, E C_f on the test set (the LCNN paper's table)")
    p.add_argument("--pgd-eps", type=float_list, default=d.pgd_eps,
                   help="metrics: l2 PGD robust accuracy at these radii in pixel units, e.g. 0.05,0.1,0.15,0.2")
    p.add_argument("--pgd-steps", type=int, default=d.pgd_steps, help="PGD iterations (default %(default)s)")
    p.add_argument("--pgd-step-size", type=float, default=d.pgd_step_size, help="PGD step (default 2.5·eps/steps)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="test samples for geometry and PGD (0 = all; default %(default)s)")
    p.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="restarts of the worker group from the last checkpoint (default %(default)s)")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                   help="CPUs each worker reserves (default: the cluster's CPUs / workers)")
    p.add_argument("--checkpoint-storage", default=d.checkpoint_storage,
                   help="where Ray Train keeps checkpoints: a path all nodes share or a URI such as s3://bucket/ckpt "
                        "(needed on a multi-node cluster; default OUT/_partial)")
    p.add_argument("--out", default=d.out, help="run directory for metrics.json and model.pt")
    add_optim_flags(p)
    add_fresh_flag(p)
    add_data_flags(p)
    add_train_transform_flag(p, "the training images")
    return p


def config_from(argv: Sequence[str]) -> TrainConfig:
    a = build_parser().parse_args(argv)
    activation, beta, bn_gamma = a.activation, a.beta, a.bn_gamma
    if a.lcnn:
        from engine.models.lcnn import LCNN_DEFAULTS

        activation = "centered_softplus"
        beta = LCNN_DEFAULTS["beta"] if beta is None else beta
        bn_gamma = LCNN_DEFAULTS["bn_gamma"] if bn_gamma is None else bn_gamma
    cfg = TrainConfig(data=data_spec(a), model=a.model, manifest=a.manifest, epochs=a.epochs, workers=a.workers,
                      gpus=a.gpus, seed=a.seed, budget=a.budget, weighting=a.weighting,
                      loader=a.loader, train_transform=a.train_transform,
                      curvature_lambda=a.curvature_lambda, curvature_eps=a.curvature_eps, gradreg=a.gradreg,
                      activation=activation, beta=beta, spectral_norm=a.spectral_norm or a.lcnn, bn_gamma=bn_gamma,
                      geometry=a.geometry, pgd_eps=tuple(a.pgd_eps), pgd_steps=a.pgd_steps,
                      pgd_step_size=a.pgd_step_size, eval_samples=a.eval_samples, max_failures=a.max_failures,
                      cpus_per_worker=a.cpus_per_worker, checkpoint_storage=a.checkpoint_storage,
                      optim=optim_from(a), out=a.out)
    cfg.validate()
    return cfg


def load_subset(cfg: TrainConfig):
    """Check names, data and manifest before Ray starts. Returns (ids, weight, train size,
    manifest hash) with ids/weight None for full-data training."""
    check_model_name(cfg.model)
    from engine.storage import check_output

    check_output(cfg.out, "--out", inputs=(cfg.manifest,))
    if cfg.checkpoint_storage:
        check_output(cfg.checkpoint_storage, "--checkpoint-storage")
    source = load_source(cfg.data)
    if cfg.model_options:
        from engine.models import build_model

        info = source.info()
        build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0], **cfg.model_options)
    for split in ("train", "test"):  # unique integer ids and labels in range, read without decoding an image
        source.ids_and_labels(split)
    n_train = source.num_rows("train")
    if cfg.manifest is None:
        return None, None, n_train, None
    ids, weight, _ = artifacts.read_manifest(cfg.manifest)
    known = source.sample_ids("train")  # from the listing or the id columns: no image is decoded
    absent = ids[~np.isin(ids, known)]
    if len(absent):
        raise DataError(f"manifest {cfg.manifest!r} names {len(absent)} sample_id(s) absent from the training "
                        f"split of {cfg.data!r}, e.g. {absent[:5].tolist()}")
    return ids, weight, len(ids), artifacts.file_hash(cfg.manifest)


def run_train(cfg: TrainConfig, subset: Optional[tuple] = None, callbacks: Sequence = ()) -> dict:
    """Stages: check inputs (unless ``subset`` from ``load_subset`` is given), fit on Ray
    Train, write metrics.json. Assumes a Ray session. ``callbacks`` go to Ray Train (a sweep's
    trial passes Tune's report callback)."""
    import shutil

    from engine.distributed.train import PARTIAL, fit_on_ray

    ids, weight, n, manifest_hash = subset or load_subset(cfg)
    with output_dir(cfg.out, keep=(PARTIAL,)) as out:
        (out / "metrics.json").unlink(missing_ok=True)  # a stale result must not outlive a failed rerun
        m = fit_on_ray(cfg, ids, weight, manifest_hash, callbacks=callbacks)
        source = load_source(cfg.data)
        metrics = {"test_accuracy": m["test_accuracy"], "wall_time_s": m["wall_time_s"],
                   "train_time_s": m.get("train_time_s"), "samples_seen": m["samples_seen"], "steps": m["steps"],
                   "passes": m["passes"], "train_size": n, "epochs": cfg.epochs, "budget": cfg.budget,
                   "weighting": cfg.weighting if cfg.manifest else None, "restarts": m.get("restarts", 0),
                   "loader": m.get("loader"),
                   "history": m.get("history", []), "geometry": m.get("geometry"),
                   "robust_accuracy": m.get("robust_accuracy"), "data": cfg.data,
                   "data_rows": {"train": source.num_rows("train"), "test": source.num_rows("test")},
                   "manifest": cfg.manifest, "manifest_hash": manifest_hash, "model_options": cfg.model_options,
                   "transforms": transforms_of(cfg.train_transform, source.info()),
                   "config": to_dict(cfg), "environment": artifacts.environment(),
                   **report_skipped(source, out)}
        artifacts.write_json(out / "metrics.json", metrics)
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {n} samples ({metrics['samples_seen']} seen) "
          f"in {metrics['wall_time_s']:.1f}s -> {Path(cfg.out) / 'metrics.json'}")
    return metrics


def main(argv: Sequence[str]) -> None:
    cfg = config_from(argv)
    subset = load_subset(cfg)
    from dataclasses import replace

    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.storage import staged_output

    fresh = build_parser().parse_args(argv).fresh
    with staged_output(cfg.out) as local, run_lock(local, "jobs.train"), ray_session():
        if fresh:
            start_fresh(Path(local), cfg.checkpoint_storage)
        run_train(replace(cfg, out=local), subset)


if __name__ == "__main__":
    entry("jobs.train", main)
