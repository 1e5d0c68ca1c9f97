"""A sweep's grid as explicit trials, and each trial's TrainConfig.

A trial is a plain dict (it travels to Tune as the grid's value and shows in Tune's tables as
``trial/<field>``): ``selector``, ``column``, ``label`` (as written in the YAML), ``fraction``,
``seed``, ``curvature_lambda``, ``variant`` and ``key``, the trial's directory name.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import List

from engine.config import TrainConfig
from engine.sweep.config import SweepConfig, parse_selection


def trial_key(t: dict) -> str:
    head = t["label"].replace(":", "-") if t["selector"] != "full" else "full"
    frac = "" if t["selector"] == "full" else f"-f{t['fraction']:g}"
    lam = f"-l{t['curvature_lambda']:g}" if t["curvature_lambda"] else ""
    var = "" if t["variant"] == "standard" else f"-{t['variant']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{head}{frac}-s{t['seed']}{lam}{var}")


def manifest_name(t: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{t['label'].replace(':', '-')}-f{t['fraction']:g}-s{t['seed']}") + ".parquet"


def expand_trials(cfg: SweepConfig) -> List[dict]:
    """The grid as explicit trials; the full-data baseline once per (seed, λ, variant)."""
    ps, trials, seen = cfg.param_space, [], set()
    for sel in ps.selector:
        name, column = parse_selection(sel)
        for frac in ps.fraction:
            f = 1.0 if name == "full" else float(frac)
            for seed in ps.seed:
                for lam in ps.curvature_lambda:
                    for var in ps.variant:
                        t = {"selector": name, "column": column, "label": str(sel), "fraction": f,
                             "seed": int(seed), "curvature_lambda": float(lam), "variant": str(var)}
                        t["key"] = trial_key(t)
                        if t["key"] not in seen:
                            seen.add(t["key"])
                            trials.append(t)
    return trials


def trial_train_config(cfg: SweepConfig, base: TrainConfig, t: dict, out: Path) -> TrainConfig:
    """``base`` (the YAML's train section) for trial ``t``: its manifest, seed, λ, variant,
    resources and run directory ``OUT/trials/<key>``."""
    r = cfg.resources
    workers = int(r.workers_per_trial)
    manifest = None if t["selector"] == "full" else str(out / "manifests" / manifest_name(t))
    tc = replace(base, manifest=manifest, seed=t["seed"], curvature_lambda=t["curvature_lambda"], workers=workers,
                 gpus=float(r.gpus_per_trial) / workers, cpus_per_worker=float(r.cpus_per_trial) / workers,
                 out=str(out / "trials" / t["key"]), **cfg.variants[t["variant"]].options())
    tc.validate()
    return tc
