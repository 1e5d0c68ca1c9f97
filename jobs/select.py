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
from engine.errors import ConfigError, DataError
from engine.select import SELECTORS, check_selector_params
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


DEFAULT_COLUMN = {"geda": "gradnorm_init", "craig": "grad_embedding", "gradmatch": "grad_embedding"}
EMBEDDING_SELECTORS = ("craig", "gradmatch")


def run_select(scores: str, selector: str, fraction: float, out: str, column: Optional[str] = None,
               offset: Optional[float] = None, seed: int = 0, global_: bool = False,
               embeddings: Optional[str] = None, **params) -> Path:
    """Read the score table (and embeddings), run the selector, write the manifest atomically.
    ``params`` are the selector's own (solver, nodes, time_limit, lam, tol, quantiles); None values
    are dropped so each selector keeps its defaults."""
    fn = SELECTORS[selector]
    fraction = check_fraction(fraction)
    params = {k: v for k, v in {**params, "offset": offset}.items() if v is not None}
    check_selector_params(selector, {**params, "seed": seed})  # before any file is read
    table, score_meta = artifacts.read_scores(scores)
    column = column or DEFAULT_COLUMN.get(selector)
    ids = table.column("sample_id").to_numpy()
    labels = table.column("label").to_numpy()
    if selector in EMBEDDING_SELECTORS:
        values, source = _embeddings(embeddings or str(Path(scores).parent / "embeddings.parquet"), column, ids)
    else:
        values, source = _score_column(table, column, scores), scores
    if selector == "geda" and params.get("solver", "exact") != "exact":
        params["mapper"] = _class_mapper()
    sel = fn(values, np.zeros_like(labels) if global_ else labels, fraction, seed=seed, **params)
    params.pop("mapper", None)
    meta = {"kind": "manifest", "selector": selector, "fraction": fraction, "column": column, "seed": seed,
            "global": global_, "params": params, "scores": str(scores), "scores_hash": artifacts.file_hash(scores),
            "values_from": str(source), "scores_config": score_meta.get("config"), "selected": int(len(sel.index)),
            "of": int(len(ids)), "info": sel.info, "environment": artifacts.environment()}
    path = Path(out)
    artifacts.write_manifest(path, ids[sel.index], sel.weight, meta)
    by = f"{selector} on {column}" if column else selector
    print(f"selected {len(sel.index)} of {len(ids)} samples ({by}, fraction {fraction}) -> {path}")
    return path


def _score_column(table, column: Optional[str], path: str):
    if column is None:
        return None
    known = artifacts.score_columns(table)
    if column not in known:
        raise ConfigError(f"--column {column!r} is not a score column of {path}; it has {', '.join(known)}")
    return table.column(column).to_numpy().astype(np.float64)


def _embeddings(path: str, column: str, ids: np.ndarray):
    """[N, d] embeddings aligned with the score table's (sorted) ids."""
    table, _ = artifacts.read_table(path, "embeddings file")
    if column not in table.column_names:
        raise ConfigError(f"--column {column!r} is not in {path}; it has {table.column_names}")
    emb_ids = table.column("sample_id").to_numpy()
    pos = np.searchsorted(emb_ids, ids)
    if len(emb_ids) < len(ids) or np.any(pos >= len(emb_ids)) or not np.array_equal(emb_ids[np.minimum(pos, len(emb_ids) - 1)], ids):
        raise DataError(f"embeddings file {path!r} does not hold a row for every sample_id of the score table")
    col = table.column(column).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
    return values[pos].astype(np.float64), path


def _class_mapper():
    """Solve classes in parallel as Ray tasks when Ray is running (in-process or RAY_ADDRESS);
    the builtin map otherwise."""
    import os

    from engine.distributed import runtime

    if runtime.ray_running() or os.environ.get("RAY_ADDRESS"):
        return runtime.task_map
    return map


def main(argv: Sequence[str]) -> None:
    a = build_parser().parse_args(argv)
    from engine.storage import check_output, staged_file

    embeddings = a.embeddings or str(Path(a.scores).parent / "embeddings.parquet")
    scores_size = Path(a.scores).stat().st_size if Path(a.scores).is_file() else 0
    check_output(a.out, "--out", file=True, inputs=(a.scores, embeddings), need_bytes=scores_size)

    with staged_file(a.out) as local:
        run_select(a.scores, a.selector, a.fraction, local, a.column, a.offset, a.seed, a.global_, a.embeddings,
                   solver=a.solver if a.selector == "geda" else None,
                   nodes=a.nodes if a.selector == "geda" else None,
                   time_limit=a.time_limit if a.selector == "geda" else None,
                   lam=a.lam, tol=a.tol, quantiles=a.quantiles)


if __name__ == "__main__":
    entry("jobs.select", main)
