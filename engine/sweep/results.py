"""A sweep's results: a row per finished trial (its metrics.json), the tables written from them,
the accuracy summary printed at the end, and the fingerprint that ties a directory to one sweep."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine import artifacts
from engine.errors import ConfigError
from engine.sweep.trials import manifest_name, offline

SELECT_SECONDS = "seconds.json"  # OUT/manifests/seconds.json: each manifest's selector seconds


def collect(trials: Sequence[dict], out: Path, scores: Optional[str] = None) -> list:
    """A row per finished trial (its metrics.json), in the grid's order. An offline trial's
    selection seconds are those of its subset: the score table's (``scores``: its proxy
    training and scoring, shared by the sweep's offline trials but what one such run pays
    alone; not for a selector that reads nothing, such as random) and its selector's
    (OUT/manifests/seconds.json)."""
    from engine.select import SELECTORS

    table_s = artifacts.score_seconds(artifacts.read_scores(scores)[1]) if scores else 0.0
    seconds_file = out / "manifests" / SELECT_SECONDS
    select_s = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    rows = []
    for t in trials:
        path = out / "trials" / t["key"] / "metrics.json"
        if path.is_file():
            reads = offline(t) and SELECTORS[t["selector"]].reads != "nothing"
            selection_s = table_s * reads + float(select_s.get(manifest_name(t), 0.0)) if offline(t) else None
            rows.append(result_row(t, json.loads(path.read_text()), selection_s))
    return rows


def result_row(t: dict, m: dict, selection_s: Optional[float] = None) -> dict:
    """A trial's row; ``selection_s``: an offline trial's selection seconds (an adaptive run's
    are in its metrics)."""
    g = m.get("geometry") or {}
    if selection_s is not None:
        m = {**m, "selection_time_s": selection_s, "cost_s": float(m.get("train_time_s") or 0.0) + selection_s}
    row = {"trial_id": t["key"], "selector": t["selector"], "column": t["column"], "label": t["label"],
           "fraction": float(t["fraction"]), "seed": int(t["seed"]),
           "curvature_lambda": float(t["curvature_lambda"]), "gradreg": float(m["config"]["gradreg"]),
           "model_options": json.dumps(m.get("model_options") or {}, sort_keys=True), "variant": t["variant"],
           "budget": m["budget"], "test_accuracy": float(m["test_accuracy"]), "train_size": int(m["train_size"]),
           "steps": int(m["steps"]), "samples_seen": int(m["samples_seen"]),
           "train_time_s": float(m.get("train_time_s") or np.nan), "wall_time_s": float(m["wall_time_s"]),
           "grad_norm": float(g.get("grad_norm", np.nan)), "hessian_norm": float(g.get("hessian_norm", np.nan)),
           "normalized_curvature": float(g.get("normalized_curvature", np.nan)),
           "manifest": f"manifests/{manifest_name(t)}" if offline(t) else None,
           "reselect_every": int(t.get("reselect_every", 0)), "warm_start": t.get("warm_start", "none"),
           "selection_time_s": float(m.get("selection_time_s") or 0.0),
           "cost_s": float(m.get("cost_s") or m.get("train_time_s") or np.nan),
           "trial_dir": f"trials/{t['key']}"}
    for eps, acc in (m.get("robust_accuracy") or {}).items():
        if eps != "0":
            row[f"pgd_{eps}"] = float(acc)
    return row


def write_results(rows: list, out: Path) -> None:
    """OUT/results.parquet and results.csv, the pgd_* columns last."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    cols = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("pgd_"), list(rows[0]).index(k)
                                                               if k in rows[0] else 99, k))
    table = pa.table({c: [r.get(c, np.nan if c.startswith("pgd_") else None) for r in rows] for c in cols})
    artifacts.write_table(out / "results.parquet", table, {"kind": "sweep_results"})
    buf = pa.BufferOutputStream()
    pacsv.write_csv(table, buf)
    artifacts.atomic_write_bytes(out / "results.csv", buf.getvalue().to_pybytes())


def summary(rows: list) -> str:
    """Mean ± std of test accuracy per (label, variant, λ, fraction) over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["label"], r["variant"], r["curvature_lambda"], r["fraction"]), []).append(r["test_accuracy"])
    from engine.tables import markdown_table

    cells = []
    for (label, var, lam, frac), accs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0])):
        a = np.asarray(accs)
        cells.append((label, var, f"{lam:g}", f"{frac:.2f}",
                      f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f}", len(a)))
    return markdown_table(("selector", "variant", "λ", "fraction", "test accuracy (mean ± std)", "seeds"), cells)


def as_dict(cfg) -> dict:
    """The SweepConfig as JSON-friendly nested dicts (recorded in sweep.json)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def fingerprint(cfg, trials: Sequence[dict]) -> str:
    d = {k: v for k, v in as_dict(cfg).items() if k not in ("resources", "description")}
    return hashlib.sha256(json.dumps([d, list(trials)], sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_sweep(out: Path, fp: str) -> None:
    """A sweep directory belongs to one sweep: resuming a different grid into it would mix
    results (and Tune would restore the old grid)."""
    mark = out / "_partial" / "sweep-fingerprint"
    if mark.is_file() and mark.read_text().strip() != fp:
        raise ConfigError(f"--out {str(out)!r} holds a different sweep (another YAML or --smoke-test); "
                          f"use another --out or delete it")
    mark.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(mark, fp.encode())
