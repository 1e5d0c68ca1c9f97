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
from typing import Sequence

from engine.config import AdaptiveConfig, TrainConfig
from jobs._cli import (
    Parser,
    add_data_flags,
    add_fresh_flag,
    add_optim_flags,
    add_train_transform_flag,
    config_from_args,
    data_spec,
    entry,
    optim_from,
    start_fresh,
)
from jobs._train_flags import add_adaptive_flags, add_eval_flags, add_run_flags


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
    add_eval_flags(p, d)
    add_run_flags(p, d)
    add_adaptive_flags(p, d.adaptive)
    p.add_argument("--out", default=d.out, help="run directory for metrics.json and model.pt")
    add_optim_flags(p)
    add_fresh_flag(p)
    add_data_flags(p)
    add_train_transform_flag(p, "the training images")
    return p


def config_from(argv: Sequence[str]) -> TrainConfig:
    a = build_parser().parse_args(argv)
    model = {"activation": a.activation, "beta": a.beta, "bn_gamma": a.bn_gamma, "spectral_norm": a.spectral_norm}
    if a.lcnn:
        from engine.models.lcnn import lcnn_options

        model.update(lcnn_options(a.beta, a.bn_gamma))
    adaptive = AdaptiveConfig(every=a.reselect_every, selector=a.selector, fraction=a.fraction, params=a.select_params,
                              warm_start=a.warm_start, precision=a.select_precision)
    return config_from_args(TrainConfig, a, data=data_spec(a), pgd_eps=tuple(a.pgd_eps), optim=optim_from(a),
                            adaptive=adaptive, **model)


def main(argv: Sequence[str]) -> None:
    from dataclasses import replace

    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.stages.train import load_subset, train_stage
    from engine.storage import staged_output

    cfg = config_from(argv)
    subset = load_subset(cfg)
    fresh = build_parser().parse_args(argv).fresh
    with staged_output(cfg.out) as local, run_lock(local, "jobs.train"), \
            ray_session(log_dir=local, job="jobs.train"):
        if fresh:
            start_fresh(Path(local), cfg.checkpoint_storage)
        train_stage(replace(cfg, out=local), subset)


if __name__ == "__main__":
    entry("jobs.train", main)
