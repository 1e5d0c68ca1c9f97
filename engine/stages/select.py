"""The selection stage: a score table (and, for CRAIG and GRAD-MATCH, embeddings) in, a
manifest out, with its provenance. No Ray unless a GEDA MILP solver runs its classes as Ray
tasks on a Ray that is already up."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from engine import artifacts
from engine.config import SelectConfig
from engine.errors import ConfigError, DataError
from engine.select import SELECTORS


@dataclass(frozen=True)
class SelectResult:
    path: Path          # the manifest written
    selected: int       # samples kept
    of: int             # samples in the score table
    summary: str        # the line a job prints
    seconds: float = 0.0  # the selector's own (not in the manifest, which stays byte-deterministic)


def select_stage(cfg: SelectConfig) -> SelectResult:
    """Read the score table (and embeddings), run the selector, write the manifest atomically.
    ``cfg.params`` are the selector's own (solver, nodes, time_limit, lam, tol, quantiles,
    offset), already checked against what it declares (``SelectConfig.validate``)."""
    cfg.validate()
    fn = SELECTORS[cfg.selector]
    table, score_meta = artifacts.read_scores(cfg.scores)
    column = None if fn.reads == "nothing" else cfg.column or fn.column
    ids = table.column("sample_id").to_numpy()
    labels = table.column("label").to_numpy()
    if fn.reads == "embeddings":
        values, source = _embeddings(embeddings_path(cfg), column, ids)
    else:
        values, source = _score_column(table, column, cfg.scores), cfg.scores
    params = {**{p.name: p.default for p in fn.params}, **cfg.params}  # recorded with the defaults filled in
    call = dict(params)
    for p in fn.params:  # a parameter naming a score column gets that column's values
        if p.column:
            what = f"{cfg.selector} parameter {p.name}"
            call[p.name] = _score_column(table, params[p.name], cfg.scores, what) if params.get(p.name) else None
    if cfg.selector == "geda" and params.get("solver", "exact") != "exact":
        call["mapper"] = _class_mapper()
    if fn.reads == "score" and cfg.embeddings and "embeddings" in inspect.signature(fn.fn).parameters:
        # a score selector that also weighs by gradient embeddings (GEDA: online GEDA's weights at R = 0)
        call["embeddings"], source = _embeddings(cfg.embeddings, "grad_embedding", ids)[0], \
            f"{source} + {cfg.embeddings}"
    t0 = time.time()
    sel = fn(values, np.zeros_like(labels) if cfg.global_rank else labels, cfg.fraction, seed=cfg.seed, **call)
    select_s = time.time() - t0
    meta = {"kind": "manifest", "selector": cfg.selector, "fraction": cfg.fraction, "column": column,
            "seed": cfg.seed, "global": cfg.global_rank, "params": params, "scores": str(cfg.scores),
            "scores_hash": artifacts.file_hash(cfg.scores), "values_from": str(source),
            "scores_config": score_meta.get("config"), "selected": int(len(sel.index)), "of": int(len(ids)),
            "info": sel.info, "environment": artifacts.environment()}
    path = Path(cfg.out)
    artifacts.write_manifest(path, ids[sel.index], sel.weight, meta)
    by = f"{cfg.selector} on {column}" if column else cfg.selector
    return SelectResult(path, int(len(sel.index)), int(len(ids)),
                        f"selected {len(sel.index)} of {len(ids)} samples ({by}, fraction {cfg.fraction}) -> {path}",
                        select_s)


def embeddings_path(cfg: SelectConfig) -> str:
    """``--embeddings``, by default embeddings.parquet beside the score table."""
    return cfg.embeddings or str(Path(cfg.scores).parent / "embeddings.parquet")


def _score_column(table, column: Optional[str], path: str, what: str = "--column"):
    if column is None:
        return None
    known = artifacts.score_columns(table)
    if column not in known:
        raise ConfigError(f"{what} {column!r} is not a score column of {path}; it has {', '.join(known)}")
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


__all__ = ["SelectResult", "embeddings_path", "select_stage"]
