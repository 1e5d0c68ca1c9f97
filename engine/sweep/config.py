"""The sweep YAML as a frozen ``SweepConfig``, loaded through ``engine.config.from_dict`` like
every other config: unknown keys and wrong types are refused with the field's path
(``param_space.fraction[2]: expected a number in (0, 1]``, ``resources.cpus_per_trial must be
a finite number``), before anything runs.

Sections: ``name``, ``description``, ``data``, ``model``, ``score`` (ScoreConfig fields but
data/model/out), ``scores_path`` (an existing score table instead), ``train`` (TrainConfig
fields shared by all trials), ``param_space`` (lists to grid over), ``variants`` (name -> model
options and gradreg), ``selector_params`` (selector -> its parameters), ``resources``, ``asha``
and, in the file only, ``smoke_test`` (overrides that ``--smoke-test`` merges in).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from engine.config import BUDGETS, ScoreConfig, TrainConfig, check_types, from_dict
from engine.errors import ConfigError
from engine.params import Rule, check_value

# per-trial fields the grid sets; the YAML's `train` section must not
TRIAL_FIELDS = {"data", "model", "manifest", "seed", "curvature_lambda", "activation", "beta", "spectral_norm",
                "bn_gamma", "gradreg", "workers", "gpus", "cpus_per_worker", "out", "budget"}


@dataclass(frozen=True)
class ParamSpace:
    """The grid: every combination is a trial (the full-data baseline once per seed, λ, variant)."""

    selector: Tuple[str, ...] = ("full",)        # SELECTOR or SELECTOR:COLUMN, or "full"
    fraction: Tuple[float, ...] = (1.0,)         # fractions kept, in (0, 1]
    seed: Tuple[int, ...] = (0,)                 # selection and training seeds
    curvature_lambda: Tuple[float, ...] = (0.0,)  # SLo-Curves λ
    variant: Tuple[str, ...] = ("standard",)     # names under `variants`
    reselect_every: Tuple[int, ...] = (0,)       # R: 0 selects once before training (offline); R > 0 adaptively
    warm_start: Tuple[str, ...] = ("none",)      # adaptive trials: "none", "full:K" or "geda"
    budget: Tuple[str, ...] = ("epochs",)        # "epochs": train.epochs passes over the subset; "steps": the
    #                                              optimizer steps of train.epochs full-data passes

    def validate(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name):
                raise ConfigError(f"{f.name}: give at least one value")
        for j, frac in enumerate(self.fraction):
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                raise ConfigError(f"fraction[{j}]: expected a number in (0, 1], got {frac!r}")
        check_types(self)
        for i, s in enumerate(self.seed):
            check_value(f"seed[{i}]", s, 0, Rule(lo=0))
        for i, lam in enumerate(self.curvature_lambda):
            check_value(f"curvature_lambda[{i}]", lam, 0.0, Rule(lo=0))
        for i, r in enumerate(self.reselect_every):
            check_value(f"reselect_every[{i}]", r, 0, Rule(lo=0))
        for i, b in enumerate(self.budget):
            if b not in BUDGETS:
                raise ConfigError(f"budget[{i}]: expected one of {', '.join(BUDGETS)}, got {b!r}")
        for i, w in enumerate(self.warm_start):
            from engine.train.adaptive import warm_passes

            try:
                warm_passes(w)
            except ConfigError as e:
                raise ConfigError(f"warm_start[{i}]: {e}") from None
        for i, sel in enumerate(self.selector):
            try:
                parse_selection(sel)
            except ConfigError as e:
                raise ConfigError(f"selector[{i}]: {e}") from None


@dataclass(frozen=True)
class Variant:
    """Model options of one variant (unset: TrainConfig's); ``lcnn: true`` is LCNN's defaults."""

    activation: Optional[str] = None
    beta: Optional[float] = None
    spectral_norm: Optional[bool] = None
    bn_gamma: Optional[float] = None
    gradreg: Optional[float] = None
    lcnn: bool = False

    def validate(self) -> None:
        check_types(self)

    def options(self) -> dict:
        """TrainConfig fields this variant sets."""
        opts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lcnn" and getattr(self, f.name) is not None}
        if self.lcnn:
            from engine.models.lcnn import lcnn_options

            opts = {**lcnn_options(self.beta, self.bn_gamma), **opts}
        return opts


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1.0      # logical CPUs per trial (split over its Ray Train workers)
    gpus_per_trial: float = 0.0      # GPUs per trial
    workers_per_trial: int = 1       # Ray Train workers per trial
    max_concurrent_trials: int = 0   # 0: as many as the cluster's CPUs (GPUs) hold

    def validate(self) -> None:
        check_types(self)
        check_value("cpus_per_trial", self.cpus_per_trial, 1.0, Rule(lo=0, lo_open=True))
        check_value("gpus_per_trial", self.gpus_per_trial, 0.0, Rule(lo=0))
        check_value("workers_per_trial", self.workers_per_trial, 1, Rule(lo=1))
        check_value("max_concurrent_trials", self.max_concurrent_trials, 0, Rule(lo=0))


@dataclass(frozen=True)
class Asha:
    grace_period: int = 1            # passes before a trial may be stopped
    reduction_factor: float = 2.0    # keep 1/r of the trials at each rung

    def validate(self) -> None:
        check_types(self)
        check_value("grace_period", self.grace_period, 1, Rule(lo=1))
        check_value("reduction_factor", self.reduction_factor, 2.0, Rule(lo=1, lo_open=True))


@dataclass(frozen=True)
class SweepConfig:
    """``jobs.sweep``: selectors x fractions x seeds x λ x variants, one score table for all."""

    name: str = "sweep"
    description: Optional[str] = None
    data: str = TrainConfig.data
    model: str = TrainConfig.model
    score: dict = field(default_factory=dict)
    scores_path: Optional[str] = None
    train: dict = field(default_factory=dict)
    param_space: ParamSpace = ParamSpace()
    also: Tuple[dict, ...] = ()      # more grids, each param_space's values but those it sets; trials join once
    variants: Dict[str, Variant] = field(default_factory=lambda: {"standard": Variant()})
    selector_params: dict = field(default_factory=dict)
    resources: Resources = Resources()
    asha: Optional[Asha] = None

    def validate(self) -> None:
        from engine.select import check_selector_params

        check_types(self)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"sweep name {self.name!r}: use letters, digits, '_', '.', '-'")
        for where, grid in zip(("param_space", *(f"also[{i}]" for i in range(len(self.also)))), self.grids()):
            for v in grid.variant:
                if v not in self.variants:
                    raise ConfigError(f"{where}.variant {v!r} is not defined under variants ({sorted(self.variants)})")
        for name, params in self.selector_params.items():
            if str(name) == "infobatch":
                from engine.train.infobatch import check_params

                check_params(dict(params or {}) if isinstance(params, dict) else params)
                continue
            check_selector_params(str(name), dict(params or {}) if isinstance(params, dict) else params)
        self.base_train_config()
        if self.scores_path is None:
            self.score_config(Path("."))

    def grids(self) -> Tuple[ParamSpace, ...]:
        """``param_space`` and each ``also`` grid (a mapping of ParamSpace fields; the fields it
        does not set are param_space's), checked as param_space is."""
        out = [self.param_space]
        for i, g in enumerate(self.also):
            if not isinstance(g, dict):
                raise ConfigError(f"also[{i}] must be a mapping of param_space fields, got {g!r}")
            out.append(from_dict(ParamSpace, {**dataclasses.asdict(self.param_space), **g}, where=f"also[{i}]"))
        return tuple(out)

    def base_train_config(self) -> TrainConfig:
        clash = sorted(set(self.train) & TRIAL_FIELDS)
        if clash:
            raise ConfigError(f"train: {clash} are set per trial (top-level data/model, param_space, variants, "
                              f"resources); remove them from the train section")
        return from_dict(TrainConfig, {**self.train, "data": self.data, "model": self.model}, where="train")

    def score_config(self, out: Path) -> ScoreConfig:
        for k in ("data", "model", "out"):
            if k in self.score:
                raise ConfigError(f"score.{k}: set by the sweep (top-level data/model, OUT/scores)")
        return from_dict(ScoreConfig, {**self.score, "data": self.data, "model": self.model,
                                       "out": str(out / "scores")}, where="score")


def parse_selection(text: str) -> tuple:
    """A sweep's ``param_space.selector`` item: ``engine.select.parse_selection`` with ``full``
    and ``infobatch`` (InfoBatch's dynamic pruning: an adaptive trial with R = 1 on all the data,
    ``engine.train.infobatch``)."""
    from engine.select import parse_selection as parse
    from engine.train import infobatch

    if str(text).strip() == infobatch.NAME:
        return infobatch.NAME, None
    return parse(text, allow_full=True)


TOP_KEYS = {f.name for f in fields(SweepConfig)} | {"smoke_test"}


def parse_overrides(items: Sequence[str]) -> dict:
    """``["train.epochs=3", "param_space.seed=[0, 1]"]`` -> a nested dict of YAML values."""
    import yaml

    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is set twice")
        node[leaf] = parsed
    return out


def load_sweep(path: str, smoke: bool = False, overrides: Optional[dict] = None) -> SweepConfig:
    """Read the sweep YAML; with ``smoke`` merge its ``smoke_test`` section in, then
    ``overrides`` (from ``--set``); every field checked."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path!r}: no such file")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping at the top level")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"--config {path!r}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    if smoke:
        spec = _merge(spec, spec.get("smoke_test") or {})
    spec.pop("smoke_test", None)
    if overrides:
        unknown = sorted(set(overrides) - TOP_KEYS)
        if unknown:
            raise ConfigError(f"--set: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
        spec = _merge(spec, overrides)
    spec.setdefault("name", p.stem)
    return sweep_from_dict(spec)


def sweep_from_dict(spec: dict) -> SweepConfig:
    return from_dict(SweepConfig, {k: v for k, v in spec.items() if k != "smoke_test"})


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
