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
from engine.params import parse_value
from engine.select import SELECTORS
from jobs._cli import Parser, entry


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.select", description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="scores.parquet written by jobs.score")
    p.add_argument("--selector", required=True, help=f"selector name: {', '.join(SELECTORS.names())}")
    p.add_argument("--fraction", required=True, type=float, help="fraction of the samples to keep, in (0, 1]")
    p.add_argument("--column", default=None,
                   help="score column that ranks samples (default: the selector's: "
                        + ", ".join(f"{e.name} {e.column}" for e in SELECTORS.entries() if e.column)
                        + ")")
    p.add_argument("--seed", type=int, default=0, help="seed for random choices and tie-breaks")
    p.add_argument("--global", dest="global_", action="store_true",
                   help="rank across all classes instead of per class (class balance not kept)")
    p.add_argument("--embeddings", default=None,
                   help="embeddings.parquet from jobs.score --embeddings, for the selectors that read gradient "
                        "embeddings (default: beside --scores); with geda, the subset is weighted by them as "
                        "online GEDA's is (--lam)")
    add_param_flags(p)
    p.add_argument("--out", required=True, help="manifest.parquet to write")
    return p


def add_param_flags(p: Parser) -> None:
    """A flag per selector parameter (``--time-limit`` for ``time_limit``), its help from the
    registry entries of the selectors that take it."""
    uses: dict = {}
    for e in SELECTORS.entries():
        for prm in e.params:
            uses.setdefault(prm.name, []).append((e.name, prm))
    g = p.add_argument_group("selector parameters (each selector takes only its own)")
    for name, owners in sorted(uses.items()):
        g.add_argument("--" + name.replace("_", "-"), dest=f"param_{name}", type=parse_value, default=None,
                       metavar=name.upper(),
                       help="; ".join(f"{sel}: {prm.help} (default {prm.default})" for sel, prm in owners))


def config_from(argv: Sequence[str]) -> SelectConfig:
    a = build_parser().parse_args(argv)
    params = {k[len("param_"):]: v for k, v in vars(a).items() if k.startswith("param_") and v is not None}
    cfg = SelectConfig(scores=a.scores, selector=a.selector, fraction=a.fraction, out=a.out, column=a.column,
                       seed=a.seed, global_rank=a.global_, embeddings=a.embeddings, params=params)
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
