"""Select a subset from a score table and write manifest.parquet (no scoring, no Ray).

    python -m jobs.select --scores runs/score/scores.parquet --selector topk --column el2n \\
        --fraction 0.5 --offset 0.1 --seed 0 --out runs/select/manifest.parquet

prints ``selected 3000 of 6000 samples (topk on el2n, fraction 0.5) -> runs/select/manifest.parquet``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from engine.config import SelectConfig
from engine.select import SELECTORS
from jobs._cli import Parser, entry


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.select", description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="scores.parquet written by jobs.score")
    p.add_argument("--selector", required=True, help=f"selector name: {', '.join(SELECTORS.names())}")
    p.add_argument("--fraction", required=True, type=float, help="fraction of the samples to keep, in (0, 1]")
    p.add_argument("--column", default=None, help="score column that ranks samples (topk, lowest)")
    p.add_argument("--offset", type=float, default=None,
                   help="topk only: skip this fraction of each class's highest scores first (Data Diet)")
    p.add_argument("--seed", type=int, default=0, help="seed for random choices and tie-breaks")
    p.add_argument("--global", dest="global_", action="store_true",
                   help="rank across all classes instead of per class (class balance not kept)")
    g = p.add_argument_group("GEDA")
    g.add_argument("--solver", default="exact", help="geda solver: exact (default), highs, pulp, pulp-cbc")
    g.add_argument("--nodes", type=int, default=5, help="geda: nodes N of the trapezoid rule (default 5)")
    g.add_argument("--time-limit", type=float, default=60.0, help="geda highs/pulp: seconds per class")
    g = p.add_argument_group("CRAIG / GRAD-MATCH")
    g.add_argument("--embeddings", default=None,
                   help="embeddings.parquet from jobs.score --embeddings (default: beside --scores)")
    g.add_argument("--lam", type=float, default=None, help="gradmatch: ridge regulariser (default 0.5)")
    g.add_argument("--tol", type=float, default=None,
                   help="gradmatch: stop OMP at this relative residual and fill at random (default 1e-4)")
    g = p.add_argument_group("random_quantile")
    g.add_argument("--quantiles", type=int, default=None, help="number of score quantiles (default 4)")
    p.add_argument("--out", required=True, help="manifest.parquet to write")
    return p


def config_from(argv: Sequence[str]) -> SelectConfig:
    a = build_parser().parse_args(argv)
    geda = a.selector == "geda"
    params = {"solver": a.solver if geda else None, "nodes": a.nodes if geda else None,
              "time_limit": a.time_limit if geda else None, "lam": a.lam, "tol": a.tol, "quantiles": a.quantiles,
              "offset": a.offset}
    cfg = SelectConfig(scores=a.scores, selector=a.selector, fraction=a.fraction, out=a.out, column=a.column,
                       seed=a.seed, global_rank=a.global_, embeddings=a.embeddings,
                       params={k: v for k, v in params.items() if v is not None})  # None: the selector's default
    cfg.validate()
    return cfg


def main(argv: Sequence[str]) -> None:
    cfg = config_from(argv)
    from engine.stages import select_stage
    from engine.stages.select import embeddings_path
    from engine.storage import check_output, staged_file

    scores_size = Path(cfg.scores).stat().st_size if Path(cfg.scores).is_file() else 0
    check_output(cfg.out, "--out", file=True, inputs=(cfg.scores, embeddings_path(cfg)), need_bytes=scores_size)
    with staged_file(cfg.out) as local:
        print(select_stage(replace(cfg, out=local)).summary)


if __name__ == "__main__":
    entry("jobs.select", main)
