"""Per-class baseline selectors: stratified random, top-k with offset, lowest."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from engine.errors import ConfigError, DataError
from engine.select import SELECTORS, Selection
from engine.select.quota import check_fraction, class_quotas

# fn(class_scores or None, n_c, k_c, rng) -> k_c positions within the class
ClassPicker = Callable[[Optional[np.ndarray], int, int, np.random.Generator], np.ndarray]


def check_scores(scores: Optional[np.ndarray], labels: np.ndarray, name: str) -> np.ndarray:
    """Validate a score vector for selector ``name``: present, finite, aligned with labels."""
    if scores is None:
        raise ConfigError(f"selector {name!r} ranks by a score column: pass --column")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != labels.shape:
        raise DataError(f"scores have shape {scores.shape} but labels {labels.shape}")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise DataError(f"{int(bad.sum())} score(s) are NaN or infinite (first at row {int(np.flatnonzero(bad)[0])})")
    return scores


def per_class(
    scores: Optional[np.ndarray], labels: np.ndarray, fraction: float, seed: int, pick: ClassPicker
) -> Selection:
    """Apply ``pick`` to each class with its quota; class c draws from rng([seed, c]) so a
    class's choice does not depend on the other classes."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise DataError("the score table has no rows")
    classes, counts = np.unique(labels, return_counts=True)
    quotas = class_quotas(counts, fraction)
    chosen = []
    for c, k in zip(classes, quotas):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([int(seed), int(c)])
        local = pick(None if scores is None else scores[members], len(members), int(k), rng)
        chosen.append(members[np.asarray(local, dtype=np.int64)])
    index = np.sort(np.concatenate(chosen))
    info = {"quota": {int(c): int(k) for c, k in zip(classes, quotas)}}
    return Selection(index=index, weight=np.ones(len(index)), info=info)


def ranked(scores: np.ndarray, descending: bool) -> np.ndarray:
    """Stable ranking; ties keep input order (that is, smaller sample_id first)."""
    key = -scores if descending else scores
    return np.argsort(key, kind="stable")


@SELECTORS.register("random")
def random(scores, labels, fraction, *, seed: int = 0, **params) -> Selection:
    """Stratified uniform sampling without replacement; ignores scores."""
    _no_params("random", params)
    return per_class(None, labels, fraction, seed, lambda s, n, k, rng: rng.choice(n, k, replace=False))


@SELECTORS.register("topk")
def topk(scores, labels, fraction, *, seed: int = 0, offset: float = 0.0, **params) -> Selection:
    """Data Diet pruning: per class, rank by score descending, skip the top ``offset``
    fraction (the noisiest, most often mislabelled samples) and keep the next k_c."""
    _no_params("topk", params)
    scores = check_scores(scores, labels, "topk")
    offset = _check_offset(offset, fraction)

    def pick(s, n, k, rng):
        skip = min(int(np.floor(round(offset * len(s), 9) + 0.5)), len(s) - k)
        return ranked(s, descending=True)[skip : skip + k]

    sel = per_class(scores, labels, fraction, seed, pick)
    sel.info["offset"] = offset
    return sel


@SELECTORS.register("lowest")
def lowest(scores, labels, fraction, *, seed: int = 0, **params) -> Selection:
    """SLo-Curves: per class keep the k_c samples with the lowest score (e.g. curvature)."""
    _no_params("lowest", params)
    scores = check_scores(scores, labels, "lowest")
    return per_class(scores, labels, fraction, seed, lambda s, n, k, rng: ranked(s, descending=False)[:k])


def _check_offset(offset: float, fraction: float) -> float:
    offset = float(offset)
    if not 0.0 <= offset < 1.0:
        raise ConfigError(f"--offset must be in [0, 1), got {offset}")
    if offset + check_fraction(fraction) > 1.0 + 1e-12:
        raise ConfigError(f"--offset {offset} + --fraction {fraction} exceeds 1: nothing left to keep")
    return offset


def _no_params(name: str, params: dict) -> None:
    if params:
        raise ConfigError(f"selector {name!r} takes no parameter(s) {sorted(params)}")
