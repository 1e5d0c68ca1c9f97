"""Selectors: numpy in, positions (+ weights) out; no I/O, no torch, no ray.

A selector is registered as ``SELECTORS[name](scores, labels, fraction, *, seed, **params)
-> Selection``. ``scores`` is float64 [N] (or None for selectors that ignore scores),
``labels`` int64 [N]; the returned ``Selection.index`` holds positions into those arrays.
Callers sort the table by ``sample_id`` first, so positions map to ids deterministically
and ties break towards the smaller ``sample_id``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import ConfigError
from engine.params import Rule, at_least, check_kwargs, declared, positive
from engine.registry import Registry, import_submodules

SELECTORS: Registry = Registry("selector")


@dataclass
class Selection:
    """Result of a selector.

    index: int64 [k] positions into the selector's input arrays, sorted ascending.
    weight: float64 [k] per-sample training weights (all 1.0 unless the selector weights).
    info: JSON-serialisable details recorded in the manifest metadata (quotas, statuses...).
    """

    index: np.ndarray
    weight: np.ndarray
    info: dict = field(default_factory=dict)


from engine.select.quota import class_quotas, total_quota

# each module registers its selectors on import (basic, coreset, geda_selector, any new file)
import_submodules(__name__, __path__)

# ranges and choices of the selectors' parameters (their types are their defaults' types)
PARAM_RULES = {"seed": at_least(0), "nodes": at_least(2), "time_limit": positive(), "lam": at_least(0),
               "tol": Rule(lo=0, hi=1, hi_open=True), "quantiles": at_least(1),
               "offset": Rule(lo=0, hi=1, hi_open=True)}


def check_selector_params(name: str, params: dict) -> dict:
    """``params`` (seed included) checked against selector ``name``'s declared parameters:
    names, types (``nodes: 2.5`` and ``lam: nan`` are refused) and ``PARAM_RULES``' ranges;
    before any score is read. Returns the checked values."""
    from engine.select.geda_selector import SOLVERS

    fn = SELECTORS[name]
    if not isinstance(params, dict):
        raise ConfigError(f"selector {name!r}: parameters must be a mapping name -> value, got {params!r}")
    rules = {**PARAM_RULES, "solver": Rule(choices=SOLVERS)}
    return check_kwargs(f"selector {name!r}", f"{name} parameter ", params, declared(fn, skip=("mapper",)), rules)


__all__ = ["PARAM_RULES", "SELECTORS", "Selection", "check_selector_params", "class_quotas", "total_quota"]
