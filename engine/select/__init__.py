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

__all__ = ["SELECTORS", "Selection", "class_quotas", "total_quota"]
