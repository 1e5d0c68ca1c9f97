"""Offline against adaptive selection on full Fashion-MNIST, with what each run cost (issue 37's
accuracy-and-cost acceptance): ``tune_configs/adaptive.yaml`` narrowed to a grid a 2-core
machine runs in about an hour, then a table per (selection, fraction) over the seeds.

    python bench/adaptive_study.py --out runs/adaptive_study            # run the sweep, then the table
    python bench/adaptive_study.py --out runs/adaptive_study --table    # the table of a finished sweep

The grid (``--set`` overrides of the shipped YAML, printed before it starts): GRAD-MATCH (per
batch of 32), CRAIG, GEDA and random at 10 % and 30 %, offline (R = 0) and adaptive with R = 5
from a cold start and from the offline GEDA subset (``warm_start: geda``; for GEDA itself that
is online GEDA after an offline GEDA start), InfoBatch (prune_ratio 0.5, delta 0.875) and the
full-data run, seeds 0 and 1, ``--epochs`` passes each, the recomputation in bf16. The table:
test accuracy (mean ± std over seeds), total seconds (training + selection), selection seconds,
samples seen against the full-data run's and the mean relative gradient-matching error of the
adaptive runs' reselections (GRAD-MATCH's Err; online GEDA's weight fit).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def overrides(epochs: int, seeds: str) -> list:
    sets = {"param_space.selector": '[full, gradmatch, craig, "geda:gradnorm_init", random, infobatch]',
            "param_space.fraction": "[0.1, 0.3]", "param_space.seed": f"[{seeds}]",
            "param_space.reselect_every": "[0, 5]", "param_space.warm_start": "[none, geda]",
            "train.epochs": str(epochs), "train.adaptive.precision": "bf16",
            "score.gpus_per_actor": "0", "resources.gpus_per_trial": "0", "resources.cpus_per_trial": "0.95",
            "resources.max_concurrent_trials": "0"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def table(out: Path) -> str:
    import numpy as np
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "results.parquet").to_pylist()
    full = [r for r in rows if r["selector"] == "full"]
    ref = np.mean([r["samples_seen"] for r in full]) if full else np.nan
    groups: dict = {}
    for r in rows:
        m = json.loads((out / r["trial_dir"] / "metrics.json").read_text())
        errs = [x["match_error"] for x in m.get("reselections", []) if "match_error" in x]
        r["match_error"] = float(np.mean(errs)) if errs else np.nan
        groups.setdefault((r["label"], r["fraction"]), []).append(r)
    lines = ["| selection | fraction | seeds | test accuracy | total s | selection s | samples / full | match error |",
             "|---|---|---|---|---|---|---|---|"]
    for (label, frac), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = np.array([r["test_accuracy"] for r in g])
        std = f" ± {acc.std(ddof=1):.4f}" if len(acc) > 1 else ""
        me = np.nanmean([r["match_error"] for r in g]) if any(np.isfinite(r["match_error"]) for r in g) else None
        lines.append(f"| {label} | {frac:g} | {len(g)} | {acc.mean():.4f}{std} | "
                     f"{np.mean([r['cost_s'] for r in g]):.1f} | {np.mean([r['selection_time_s'] for r in g]):.1f} | "
                     f"{np.mean([r['samples_seen'] for r in g]) / ref:.3f} | "
                     f"{'' if me is None else f'{me:.3f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0, 1")
    p.add_argument("--table", action="store_true", help="only print the table of a finished sweep")
    a = p.parse_args()
    out = Path(a.out)
    if not a.table:
        cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(ROOT / "tune_configs" / "adaptive.yaml"),
               "--out", str(out), *overrides(a.epochs, a.seeds)]
        print(" ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=ROOT)
        if code:
            sys.exit(code)
    print(table(out))


if __name__ == "__main__":
    main()
