"""Find and read what a run directory holds: a sweep (jobs.sweep), a pipeline run
(jobs.pipeline) or a score run (jobs.score).

Everything is normalised into one :class:`Run`: a results frame with the columns of
jobs.sweep's ``results.parquet`` (missing ones filled with defaults), the score table, the
manifests with their metadata, and the data spec the run was made from. An artifact that
cannot be read is recorded in ``Run.notes`` and left out; a directory with nothing usable
raises ConfigError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from engine import artifacts
from engine.errors import ConfigError, DataError

GEOMETRY = ("grad_norm", "hessian_norm", "normalized_curvature")
RESULT_DEFAULTS = {"selector": "full", "column": None, "label": "full", "fraction": 1.0, "seed": 0,
                   "curvature_lambda": 0.0, "gradreg": 0.0, "variant": "standard", "manifest": None,
                   "test_accuracy": np.nan, "train_size": np.nan, "cost_s": np.nan, "samples_seen": np.nan,
                   **{g: np.nan for g in GEOMETRY}}


@dataclass
class Manifest:
    path: Path
    ids: np.ndarray
    weight: np.ndarray
    meta: dict

    @property
    def selector(self) -> str:
        return str(self.meta.get("selector") or "?")

    @property
    def fraction(self) -> float:
        return float(self.meta.get("fraction", np.nan))

    @property
    def column(self) -> Optional[str]:
        col = self.meta.get("column")
        return col or ("gradnorm_init" if self.selector == "geda" else None)

    @property
    def seed(self) -> int:
        return int(self.meta.get("seed") or 0)

    @property
    def label(self) -> str:
        return f"{self.selector}:{self.column}" if self.column and self.selector != "random" else self.selector


@dataclass
class Run:
    kind: str                                  # "sweep", "pipeline" or "scores"
    root: Path
    name: str
    data: Optional[str] = None                 # data source spec the run was made from
    model: Optional[str] = None
    results: Optional[pd.DataFrame] = None     # a row per finished training run
    scores: Optional[pa.Table] = None          # sorted by sample_id
    scores_meta: dict = field(default_factory=dict)
    scores_path: Optional[Path] = None
    manifests: List[Manifest] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def discover(root: str | Path) -> Run:
    """Read the run directory ``root``; ConfigError if it is missing or holds nothing usable."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{str(root)!r}: no such directory")
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a directory; give a sweep, pipeline or score run directory")
    if (root / "results.parquet").is_file() or (root / "sweep.json").is_file():
        run = _sweep(root)
    elif (root / "score" / "scores.parquet").is_file() or (root / "select").is_dir() or _metrics_files(root):
        run = _pipeline(root)
    elif (root / "scores.parquet").is_file():
        run = Run("scores", root, root.resolve().name)
        _load_scores(run, root / "scores.parquet")
    else:
        raise ConfigError(f"{str(root)!r} holds nothing a report can use: expected results.parquet or sweep.json "
                          f"(jobs.sweep), score/ select/ train/*/metrics.json (jobs.pipeline) or scores.parquet "
                          f"(jobs.score)")
    if run.results is None and run.scores is None and not run.manifests:
        why = "; ".join(run.notes) or "no finished results, score table or manifest"
        raise ConfigError(f"{str(root)!r} ({run.kind} run) has nothing to report: {why}")
    if run.data is None and run.scores_meta:
        run.data = run.scores_meta.get("data") or (run.scores_meta.get("config") or {}).get("data")
    if run.model is None and run.scores_meta:
        run.model = run.scores_meta.get("model")
    return run


def _metrics_files(root: Path) -> list:
    return sorted((root / "train").glob("*/metrics.json")) if (root / "train").is_dir() else []


def _load_scores(run: Run, path: Path) -> None:
    try:
        run.scores, run.scores_meta = artifacts.read_scores(path)
        run.scores_path = path
    except DataError as exc:
        run.notes.append(str(exc))


def _load_manifests(run: Run, folder: Path) -> None:
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        try:
            ids, weight, meta = artifacts.read_manifest(path)
        except DataError as exc:
            run.notes.append(str(exc))
            continue
        run.manifests.append(Manifest(path, ids, weight, meta))


def _sweep(root: Path) -> Run:
    info = {}
    if (root / "sweep.json").is_file():
        try:
            info = json.loads((root / "sweep.json").read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(root / 'sweep.json')!r} is not readable JSON ({exc})") from None
    run = Run("sweep", root, str(info.get("name") or root.resolve().name), data=info.get("data"),
              model=info.get("model"))
    scores = info.get("scores")
    path = root / "scores" / "scores.parquet"
    if scores:
        p = Path(scores)
        path = p if p.is_absolute() else root / p
    if path.is_file():
        _load_scores(run, path)
    elif scores:
        run.notes.append(f"sweep.json names the score table {scores!r}, which does not exist")
    _load_manifests(run, root / "manifests")
    if (root / "results.parquet").is_file():
        try:
            table, _ = artifacts.read_table(root / "results.parquet", "results table")
            run.results = normalise_results(table.to_pandas())
        except DataError as exc:
            run.notes.append(str(exc))
    return run


def _pipeline(root: Path) -> Run:
    run = Run("pipeline", root, root.resolve().name)
    if (root / "score" / "scores.parquet").is_file():
        _load_scores(run, root / "score" / "scores.parquet")
    _load_manifests(run, root / "select")
    by_name = {m.path.name: m for m in run.manifests}
    rows = []
    for path in _metrics_files(root):
        try:
            m = json.loads(path.read_text())
            rows.append(_pipeline_row(m, path.parent.name, by_name, artifacts.score_seconds(run.scores_meta)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            run.notes.append(f"{str(path)!r} is not a readable metrics file ({type(exc).__name__}: {exc})")
            continue
        run.data = run.data or m.get("data") or (m.get("config") or {}).get("data")
        run.model = run.model or (m.get("config") or {}).get("model")
    if rows:
        run.results = normalise_results(pd.DataFrame(rows))
    return run


def _pipeline_row(m: dict, tag: str, manifests: dict, score_s: float = 0.0) -> dict:
    cfg = m.get("config") or {}
    geo = m.get("geometry") or {}
    row = {"trial_id": tag, "test_accuracy": float(m["test_accuracy"]), "train_size": m.get("train_size"),
           "seed": int(cfg.get("seed") or 0), "curvature_lambda": float(cfg.get("curvature_lambda") or 0.0),
           "gradreg": float(cfg.get("gradreg") or 0.0), "variant": _variant_name(m.get("model_options") or {}),
           "samples_seen": m.get("samples_seen", np.nan),
           "cost_s": float(m.get("cost_s") or m.get("train_time_s") or np.nan),
           **{g: float(geo[g]) if geo.get(g) is not None else np.nan for g in GEOMETRY}}
    for eps, acc in (m.get("robust_accuracy") or {}).items():
        if str(eps) != "0":
            row[f"pgd_{eps}"] = float(acc)
    manifest = cfg.get("manifest") or m.get("manifest")
    if not manifest:
        row.update(selector="full", column=None, label="full", fraction=1.0, manifest=None)
        return row
    man = manifests.get(Path(manifest).name)
    if man is not None:
        row.update(selector=man.selector, column=man.column, label=man.label, fraction=man.fraction,
                   manifest=str(man.path))
        row["cost_s"] += score_s  # what the subset's score table cost (its proxies and scoring)
    else:  # the manifest is gone: what the tag and the sizes still tell
        rows = (m.get("data_rows") or {}).get("train")
        frac = float(m["train_size"]) / rows if rows else np.nan
        row.update(selector=tag.split("-")[0], column=None, label=tag.rsplit("-", 1)[0], fraction=frac,
                   manifest=None)
    return row


def _variant_name(opts: dict) -> str:
    if not opts:
        return "standard"
    return ",".join(f"{k}={v}" for k, v in sorted(opts.items()))


def normalise_results(df: pd.DataFrame) -> Optional[pd.DataFrame]:
    """Fill missing columns with defaults and coerce types; None when no row has an accuracy."""
    df = df.copy()
    for col, default in RESULT_DEFAULTS.items():
        if col not in df.columns:
            df[col] = default
    for col in ("fraction", "curvature_lambda", "gradreg", "test_accuracy", "train_size", "cost_s", "samples_seen",
                *GEOMETRY,
                *pgd_columns(df)):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").fillna(0).astype(int)
    df["variant"] = df["variant"].fillna("standard").astype(str)
    df["selector"] = df["selector"].fillna("full").astype(str)
    df["label"] = df["label"].where(df["label"].notna(), df["selector"]).astype(str)
    df["curvature_lambda"] = df["curvature_lambda"].fillna(0.0)
    df["gradreg"] = df["gradreg"].fillna(0.0)
    df = df[np.isfinite(df["test_accuracy"])]
    return df.reset_index(drop=True) if len(df) else None


def pgd_columns(df: pd.DataFrame) -> list:
    """``pgd_<eps>`` columns ordered by eps."""
    def eps(c):
        try:
            return float(c[4:])
        except ValueError:
            return np.inf
    return sorted((c for c in df.columns if str(c).startswith("pgd_")), key=eps)
