"""The flags of a training run beyond its data and optimiser (``jobs.train``): how it
executes and survives failures, and what it measures on the test set."""
from __future__ import annotations

import argparse

from engine.params import parse_params
from jobs._cli import float_list


def add_adaptive_flags(p: argparse.ArgumentParser, d) -> None:
    """Adaptive selection during training; ``d``: the AdaptiveConfig whose values are the defaults."""
    p.add_argument("--reselect-every", type=int, default=d.every, metavar="R",
                   help="adaptive selection: before pass 1, 1+R, 1+2R, ... choose the subset again on the current "
                        "model over the whole training split (with --manifest, train on it until pass 1+R); "
                        "0: off (default)")
    p.add_argument("--selector", default=d.selector,
                   help="the adaptive selector: gradmatch, craig, random, geda (online GEDA), a ranking selector with "
                        "the model scorer it recomputes, e.g. topk:el2n, ccs:el2n, or infobatch (InfoBatch's "
                        "dynamic pruning, with --reselect-every 1; prune_ratio=0.5,delta=0.875) (default %(default)s)")
    p.add_argument("--fraction", type=float, default=d.fraction,
                   help="adaptive: fraction of each class to train on (default %(default)s)")
    p.add_argument("--warm-start", default=d.warm_start, metavar="full:K|geda",
                   help="adaptive: full:K trains on the whole training split for passes 1..K, then selects before "
                        "pass K+1 (CORDS's warm start); geda trains on the offline GEDA subset of the untrained "
                        "model until pass 1+R (the GEDA thesis, 6.3) (default %(default)s)")
    p.add_argument("--select-params", type=parse_params, default={}, metavar="NAME=VALUE,...",
                   help="adaptive: the selector's own parameters, as jobs.select's flags, e.g. lam=0.5 or offset=0.1")
    p.add_argument("--select-precision", choices=["float32", "bf16"], default=d.precision,
                   help="adaptive: bf16 runs the recomputation's forward under bf16 autocast (gradient embeddings, "
                        "and the scorers jobs.score --precision bf16 allows; about 1.4x faster on a CPU with "
                        "AVX512-BF16, embeddings within 1 %%) (default %(default)s)")


def add_run_flags(p: argparse.ArgumentParser, d) -> None:
    """Where and how a training run executes and survives failures; ``d``: the TrainConfig
    whose values are the defaults."""
    p.add_argument("--executor", choices=["auto", "ray-train", "in-process"], default=d.executor,
                   help="ray-train: a TorchTrainer's worker group; in-process: one worker in this job's process "
                        "with Winnow's own checkpoints and resume (no Ray Train start-up, seconds per run); auto: "
                        "in-process for --workers 1 with the in-memory loader on the job's own machine, else "
                        "ray-train (default %(default)s)")
    p.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="restarts from the last checkpoint after a failure (default %(default)s)")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                   help="CPUs each worker reserves (default: the cluster's CPUs / workers)")
    p.add_argument("--checkpoint-storage", default=d.checkpoint_storage,
                   help="where Ray Train keeps checkpoints: a path all nodes share or a URI such as s3://bucket/ckpt "
                        "(needed on a multi-node cluster; default OUT/_partial)")


def add_eval_flags(p: argparse.ArgumentParser, d) -> None:
    """What a training run measures on the test set besides accuracy (LCNN's geometry, PGD);
    ``d``: the TrainConfig whose values are the defaults."""
    p.add_argument("--geometry", action="store_true",
                   help="metrics: E||grad f||, E||hessian f||, E C_f on the test set (the LCNN paper's table)")
    p.add_argument("--pgd-eps", type=float_list, default=d.pgd_eps,
                   help="metrics: l2 PGD robust accuracy at these radii in pixel units, e.g. 0.05,0.1,0.15,0.2")
    p.add_argument("--pgd-steps", type=int, default=d.pgd_steps, help="PGD iterations (default %(default)s)")
    p.add_argument("--pgd-step-size", type=float, default=d.pgd_step_size, help="PGD step (default 2.5·eps/steps)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="test samples for geometry and PGD (0 = all; default %(default)s)")
