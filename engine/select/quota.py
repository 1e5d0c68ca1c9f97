"""How many samples each class keeps for a fraction F."""
from __future__ import annotations

import math
import warnings

import numpy as np

from engine.errors import ConfigError


def check_fraction(fraction: float) -> float:
    """Return ``fraction`` as float if it lies in (0, 1]; ConfigError otherwise."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < f <= 1.0) or math.isnan(f):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    return f


def total_quota(n: int, fraction: float) -> int:
    """round(F * n) with halves rounded up (not banker's rounding), at least 1 when n > 0."""
    k = math.floor(round(fraction * n, 9) + 0.5)
    return max(k, 1) if n > 0 else 0


def class_quotas(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Samples to keep per class so that the total is round(F·n) and each class is within one
    of F·n_c (largest-remainder apportionment; ties go to the smaller class index).

    A class with at least one sample whose share rounds to zero still keeps one sample, with a
    warning: selection must never silently drop a class. That can push the total above
    round(F·n) by the number of such classes.

    counts: int [C] samples per class. Returns int64 [C].
    """
    counts = np.asarray(counts, dtype=np.int64)
    fraction = check_fraction(fraction)
    exact = np.round(fraction * counts.astype(np.float64), 9)
    base = np.floor(exact).astype(np.int64)
    remainder = exact - base
    extra = total_quota(int(counts.sum()), fraction) - int(base.sum())
    order = np.lexsort((np.arange(len(counts)), -remainder))  # largest remainder first
    quotas = base.copy()
    for c in order[: max(extra, 0)]:
        quotas[c] += 1
    starved = (quotas == 0) & (counts > 0)
    if starved.any():
        warnings.warn(
            f"fraction {fraction} keeps no sample of class(es) {np.flatnonzero(starved).tolist()}; "
            "keeping one sample of each instead",
            stacklevel=2,
        )
        quotas[starved] = 1
    return np.minimum(quotas, counts)
