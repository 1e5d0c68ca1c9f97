"""A sweep's grid as explicit trials, and each trial's TrainConfig.

A trial is a plain dict (it travels to Tune as the grid's value and shows in Tune's tables as
``trial/<field>``): ``selector``, ``column``, ``label`` (as written in the YAML, " (steps)" added
for the steps budget), ``fraction``, ``seed``, ``curvature_lambda``, ``variant``, ``budget`` and
``key``, the trial's directory name.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List

from engine.config import TrainConfig
from engine.sweep.config import SweepConfig, parse_selection

# selectors that train on all the data (InfoBatch prunes within it): no fraction of their own
WHOLE = ("full", "infobatch")


def trial_key(t: dict) -> str:
    head = t["selection"].replace(":", "-") if t["selector"] != "full" else "full"
    frac = "" if t["selector"] in WHOLE else f"-f{t['fraction']:g}"
    lam = f"-l{t['curvature_lambda']:g}" if t["curvature_lambda"] else ""
    var = "" if t["variant"] == "standard" else f"-{t['variant']}"
    every = f"-r{t['reselect_every']}" if t.get("reselect_every") else ""
    steps = "-bsteps" if t.get("budget", "epochs") == "steps" else ""
    warm = "" if t.get("warm_start", "none") == "none" else f"-w{t['warm_start'].replace(':', '')}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{head}{every}{warm}{frac}{steps}-s{t['seed']}{lam}{var}")


def manifest_name(t: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{t['selection'].replace(':', '-')}-f{t['fraction']:g}-s{t['seed']}") + ".parquet"


def offline(t: dict) -> bool:
    """Whether trial ``t`` trains on a manifest chosen before training (not full data, not adaptive)."""
    return t["selector"] != "full" and not t.get("reselect_every")


def _adaptive_grid(name: str, ps) -> list:
    """(R, warm start) pairs of a selector: (0, "none") for the full-data baseline and for R = 0;
    InfoBatch prunes before every pass and warms up on its own: (1, "none") only."""
    if name == "full":
        return [(0, "none")]
    if name == "infobatch":
        return [(1, "none")]
    return list(dict.fromkeys((int(r), str(w) if r else "none") for r in ps.reselect_every for w in ps.warm_start))


def expand_trials(cfg: SweepConfig) -> List[dict]:
    """The grids (param_space, then each ``also``) as explicit trials, each once; the full-data
    baseline once per (seed, λ, variant)."""
    trials, seen = [], set()
    for ps in cfg.grids():
        for t in _grid_trials(ps):
            t["key"] = trial_key(t)
            if t["key"] not in seen:
                seen.add(t["key"])
                trials.append(t)
    return trials


def _grid_trials(ps) -> Iterator[dict]:
    for sel in ps.selector:
        name, column = parse_selection(sel)
        # a run on all the data takes the same steps either way (InfoBatch refuses "steps")
        budgets = ("epochs",) if name in WHOLE else ps.budget
        for every, warm in _adaptive_grid(name, ps):
            label = str(sel) if not every or name in WHOLE else \
                f"{sel} R={every}" + ("" if warm == "none" else f" warm {warm}")
            for budget, frac, seed, lam, var in itertools.product(budgets, ps.fraction, ps.seed, ps.curvature_lambda,
                                                                  ps.variant):
                yield {"selector": name, "column": column, "label": label + (" (steps)" if budget == "steps" else ""),
                       "selection": str(sel), "fraction": 1.0 if name in WHOLE else float(frac), "seed": int(seed),
                       "curvature_lambda": float(lam), "variant": str(var), "reselect_every": every,
                       "warm_start": warm, "budget": budget}


def trial_train_config(cfg: SweepConfig, base: TrainConfig, t: dict, out: Path) -> TrainConfig:
    """``base`` (the YAML's train section) for trial ``t``: its manifest, seed, λ, variant,
    resources and run directory ``OUT/trials/<key>``."""
    r = cfg.resources
    workers = int(r.workers_per_trial)
    manifest = str(out / "manifests" / manifest_name(t)) if offline(t) else None
    adaptive = base.adaptive
    if t.get("reselect_every"):
        adaptive = replace(base.adaptive, every=t["reselect_every"], selector=t["selection"], fraction=t["fraction"],
                           params=dict(cfg.selector_params.get(t["selector"]) or {}), warm_start=t["warm_start"])
    tc = replace(base, manifest=manifest, seed=t["seed"], curvature_lambda=t["curvature_lambda"], workers=workers,
                 budget=t.get("budget", "epochs"),
                 adaptive=adaptive,
                 gpus=float(r.gpus_per_trial) / workers, cpus_per_worker=float(r.cpus_per_trial) / workers,
                 out=str(out / "trials" / t["key"]), **cfg.variants[t["variant"]].options())
    tc.validate()
    return tc
