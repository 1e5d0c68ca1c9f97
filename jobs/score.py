"""Train S proxy models, score every training sample through Ray Data, write scores.parquet.

    python -m jobs.score --data fashion-mnist-mini --model small-cnn --scores el2n,forgetting \\
        --seeds 2 --epochs 4 --out runs/score

prints a line per proxy epoch, Ray Data's progress, and finally
``wrote runs/score/scores.parquet: 6000 rows, columns el2n, el2n_std, forgetting, forgetting_std``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from engine.config import ScoreConfig
from engine.params import parse_method_params
from engine.scores import HISTORY_SCORERS, SCORERS, check_params, parse_score_names
from jobs._cli import (
    Parser,
    add_data_flags,
    add_fresh_flag,
    add_optim_flags,
    add_train_transform_flag,
    data_spec,
    entry,
    int_list,
    optim_from,
    start_fresh,
)


def build_parser() -> Parser:
    d = ScoreConfig()
    p = Parser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=d.data, help="data source spec: fashion-mnist-mini, fashion-mnist[:DIR], digits, "
                   "parquet:PATH, imagefolder:PATH, synthetic:N[,HxW[,C]] (default %(default)s)")
    p.add_argument("--model", default=d.model, help="proxy model: small-cnn, resnet18-cifar, torchvision:NAME")
    p.add_argument("--scores", default=",".join(d.scores),
                   help="comma-separated score names (default %(default)s): "
                        + ", ".join(sorted([*SCORERS.names(), *HISTORY_SCORERS.names()])))
    p.add_argument("--seeds", type=int, default=d.seeds, help="number of proxies (seeds 0..S-1); scores are averaged")
    p.add_argument("--epochs", type=int, default=d.epochs, help="proxy training epochs (default %(default)s)")
    p.add_argument("--score-epochs", type=int_list, default=None,
                   help="epochs at which model scores are taken, e.g. 0,2 (0 = at init; default: the last)")
    p.add_argument("--actors", type=int, default=d.actors,
                   help="most scoring actors in the Ray Data pool; it grows to this as the backlog and the "
                        "cluster allow (default %(default)s)")
    p.add_argument("--min-actors", type=int, default=d.min_actors, help="actors started up front (default %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor,
                   help="logical CPUs per scoring actor (default %(default)s; fractions let read tasks and actors "
                        "share a small machine)")
    p.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="GPUs per scoring actor and proxy")
    p.add_argument("--score-batch-size", type=int, default=d.score_batch_size, help="rows per scoring batch")
    p.add_argument("--score-params", type=parse_method_params, default={},
                   help="scorer parameters SCORE.PARAM=VALUE, comma-separated, e.g. 'nc.iters=20,curvature.eps=0.1'. "
                        + "; ".join(f"{e.name}.{q.name}: {q.help} (default {q.default!r})"
                                    for e in SCORERS.entries() for q in e.params))
    p.add_argument("--embeddings", type=int, default=0, metavar="DIM",
                   help="also write embeddings.parquet: last-layer gradient embeddings (<= DIM dims) of seed 0's "
                        "final proxy, for the craig and gradmatch selectors (e.g. 512)")
    p.add_argument("--precision", default=d.precision,
                   help="float32 (default) or bf16: bf16 autocast for el2n, loss, grand, grand_last and gradnorm_init "
                        "(the curvature scores always run in float32)")
    p.add_argument("--out", default=d.out, help="run directory; scores.parquet is written there")
    add_optim_flags(p)
    add_fresh_flag(p)
    add_data_flags(p)
    add_train_transform_flag(p, "the proxies' training (scores are taken on the evaluation images)")
    p.add_argument("--proxy-loader", choices=("auto", "memory", "stream"), default=d.proxy_loader,
                   help="how the proxies read the training split: memory (each proxy task holds it decoded: small "
                        "data, the fastest), stream (Ray Train fits reading Ray Data streams: memory bounded "
                        "whatever the data's size), auto (stream above 1 GiB of decoded images; default)")
    p.add_argument("--proxy-workers", type=int, default=d.proxy_workers,
                   help="Ray Train workers per streamed proxy (default %(default)s)")
    return p


def config_from(argv: Sequence[str]) -> ScoreConfig:
    args = build_parser().parse_args(argv)
    cfg = ScoreConfig(data=data_spec(args), model=args.model, scores=tuple(parse_score_names(args.scores)),
                      seeds=args.seeds, epochs=args.epochs, score_epochs=args.score_epochs, actors=args.actors,
                      min_actors=args.min_actors, cpus_per_actor=args.cpus_per_actor,
                      gpus_per_actor=args.gpus_per_actor, score_batch_size=args.score_batch_size,
                      score_params=check_params(args.score_params), embedding_dim=args.embeddings,
                      precision=args.precision, train_transform=args.train_transform,
                      proxy_loader=args.proxy_loader, proxy_workers=args.proxy_workers, optim=optim_from(args),
                      out=args.out)
    cfg.validate()
    return cfg


def main(argv: Sequence[str]) -> None:
    from engine.stages.score import check_inputs, score_stage

    cfg = config_from(argv)
    source = check_inputs(cfg)
    from dataclasses import replace

    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.storage import staged_output

    fresh = build_parser().parse_args(argv).fresh
    with staged_output(cfg.out) as local, run_lock(local, "jobs.score"), \
            ray_session(log_dir=local, job="jobs.score"):
        if fresh:
            start_fresh(Path(local))
        score_stage(replace(cfg, out=local), source)


if __name__ == "__main__":
    entry("jobs.score", main)
