"""Select a subset from a score table and write manifest.parquet (no scoring, no Ray).

    python -m jobs.select --scores runs/score/scores.parquet --selector topk --column el2n \\
        --fraction 0.5 --offset 0.1 --seed 0 --out runs/select/manifest.parquet

prints ``selected 3000 of 6000 samples (topk on el2n, fraction 0.5) -> runs/select/manifest.parquet``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine import artifacts
from engine.errors import ConfigError
from engine.select import SELECTORS
from engine.select.quota import check_fraction
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
    p.add_argument("--out", required=True, help="manifest.parquet to write")
    return p


def run_select(scores: str, selector: str, fraction: float, out: str, column: Optional[str] = None,
               offset: Optional[float] = None, seed: int = 0) -> Path:
    """Read the score table, run the selector, write the manifest atomically."""
    fn = SELECTORS[selector]
    fraction = check_fraction(fraction)
    table, score_meta = artifacts.read_scores(scores)
    values = None
    if column is not None:
        known = artifacts.score_columns(table)
        if column not in known:
            raise ConfigError(f"--column {column!r} is not a score column of {scores}; it has {', '.join(known)}")
        values = table.column(column).to_numpy().astype(np.float64)
    params = {} if offset is None else {"offset": offset}
    ids = table.column("sample_id").to_numpy()
    labels = table.column("label").to_numpy()
    sel = fn(values, labels, fraction, seed=seed, **params)
    meta = {"kind": "manifest", "selector": selector, "fraction": fraction, "column": column, "seed": seed,
            "params": params, "scores": str(scores), "scores_hash": artifacts.file_hash(scores),
            "scores_config": score_meta.get("config"), "selected": int(len(sel.index)), "of": int(len(ids)),
            "info": sel.info, "environment": artifacts.environment()}
    path = Path(out)
    artifacts.write_manifest(path, ids[sel.index], sel.weight, meta)
    by = f"{selector} on {column}" if column else selector
    print(f"selected {len(sel.index)} of {len(ids)} samples ({by}, fraction {fraction}) -> {path}")
    return path


def main(argv: Sequence[str]) -> None:
    a = build_parser().parse_args(argv)
    if Path(a.out).is_dir():
        raise ConfigError(f"--out {a.out!r} is a directory; give the manifest's file name")
    run_select(a.scores, a.selector, a.fraction, a.out, a.column, a.offset, a.seed)


if __name__ == "__main__":
    entry("jobs.select", main)
