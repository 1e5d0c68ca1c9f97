"""Per-class baseline selectors: stratified random, top-k with offset, lowest."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from engine.errors import ConfigError, DataError
from engine.params import Rule, at_least
from engine.select import Selection, selector
from engine.select.quota import check_fraction, class_quotas

# fn(class_scores or None, n_c, k_c, rng) -> k_c positions within the class
ClassPicker = Callable[[Optional[np.ndarray], int, int, np.random.Generator], np.ndarray]


def check_scores(scores: Optional[np.ndarray], labels: np.ndarray, name: str, matrix: bool = False) -> np.ndarray:
    """Validate a score vector for selector ``name``: present, finite, aligned with labels.
    With ``matrix=True`` the scores are per-sample embeddings [N, d]."""
    if scores is None:
        raise ConfigError(f"selector {name!r} ranks by a score column: pass --column")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[:1] != labels.shape or scores.ndim != (2 if matrix else 1):
        want = "[N, d] embeddings" if matrix else "one score per row"
        raise DataError(f"selector {name!r} needs {want}; got shape {scores.shape} for {labels.shape[0]} rows")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise DataError(f"{int(bad.sum())} score(s) are NaN or infinite (first at row {int(np.flatnonzero(bad)[0])})")
    return scores


def per_class(
    scores: Optional[np.ndarray], labels: np.ndarray, fraction: float, seed: int, pick: ClassPicker,
    mapper: Callable = map,
) -> Selection:
    """Apply ``pick`` to each class with its quota; class c draws from rng([seed, c]) so a
    class's choice does not depend on the other classes. ``pick`` returns positions, or
    (positions, info dict) to record per-class details (e.g. a solver's status).
    ``mapper`` (default the builtin ``map``) may run the classes in parallel, e.g. as Ray tasks."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise DataError("the score table has no rows")
    classes, counts = np.unique(labels, return_counts=True)
    quotas = class_quotas(counts, fraction)
    # one stable sort instead of a scan of all rows per class (1,000 classes x 1.28M rows)
    # (radix sort when the labels fit in 16 bits)
    small = labels.min() >= 0 and labels.max() < 2**16
    members = np.split(np.argsort(labels.astype(np.uint16) if small else labels, kind="stable"),
                       np.cumsum(counts)[:-1])
    jobs = [(pick, None if scores is None else scores[m], len(m), int(k), int(seed), int(c))
            for m, k, c in zip(members, quotas, classes)]
    results = list(mapper(_run_pick, jobs))
    chosen, weights, details = [], [], {}
    for m, c, res in zip(members, classes, results):
        local, info, w = (tuple(res) + (None, None))[:3] if isinstance(res, tuple) else (res, None, None)
        local = np.asarray(local, dtype=np.int64)
        chosen.append(m[local])
        weights.append(np.ones(len(local)) if w is None else np.asarray(w, dtype=np.float64))
        if info is not None:
            details[int(c)] = info
    # positions are unique, so scatter into a row mask instead of sorting them
    index = np.concatenate(chosen)
    weight = np.zeros(labels.size)
    weight[index] = np.concatenate(weights)
    mask = np.zeros(labels.size, dtype=bool)
    mask[index] = True
    if mask.sum() != index.size:
        raise RuntimeError("a selector picked the same sample twice")  # a bug, not bad input
    index = np.flatnonzero(mask)
    info = {"quota": {int(c): int(k) for c, k in zip(classes, quotas)}}
    if details:
        info["classes"] = details
    return Selection(index=index, weight=weight[index], info=info)


def _run_pick(job):
    pick, s, n, k, seed, c = job
    return pick(s, n, k, np.random.default_rng([seed, c]))


def ranked(scores: np.ndarray, descending: bool) -> np.ndarray:
    """Stable ranking; ties keep input order (that is, smaller sample_id first)."""
    key = -scores if descending else scores
    return np.argsort(key, kind="stable")


@selector("random", reads="nothing")
def random(scores, labels, fraction, *, seed: int = 0, **params) -> Selection:
    """Stratified uniform sampling without replacement; ignores scores."""
    _no_params("random", params)
    return per_class(None, labels, fraction, seed, lambda s, n, k, rng: rng.choice(n, k, replace=False))


@selector("topk", params={"offset": ("skip this fraction of each class's highest scores first (Data Diet's "
                                                "offset: the noisiest samples)", Rule(lo=0, hi=1, hi_open=True))})
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


@selector("lowest")
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


@selector("evenly_spaced")
def evenly_spaced(scores, labels, fraction, *, seed: int = 0, **params) -> Selection:
    """GEDA thesis §5.3 baseline: per class, every j-th sample of the ranking by score (the
    centres of k_c equal slices of the sorted class), ties in input order."""
    from engine.select.geda import spread

    _no_params("evenly_spaced", params)
    scores = check_scores(scores, labels, "evenly_spaced")
    return per_class(scores, labels, fraction, seed, lambda s, n, k, rng: ranked(s, False)[spread(n, k)])


@selector("random_quantile", params={"quantiles": ("number of score quantiles drawn from", at_least(1))})
def random_quantile(scores, labels, fraction, *, seed: int = 0, quantiles: int = 4, **params) -> Selection:
    """GEDA thesis §5.3 baseline: per class, split the ranking by score into ``quantiles``
    equal groups (quartiles by default) and draw uniformly within each, the class's quota
    apportioned to the groups by size (largest remainder)."""
    _no_params("random_quantile", params)
    scores = check_scores(scores, labels, "random_quantile")
    if int(quantiles) < 1:
        raise ConfigError(f"quantiles must be at least 1, got {quantiles}")

    def pick(s, n, k, rng):
        groups = np.array_split(ranked(s, False), int(quantiles))
        sizes = np.array([len(g) for g in groups])
        share = k * sizes / n
        take = np.floor(share).astype(int)
        for g in np.lexsort((np.arange(len(groups)), -(share - take)))[: k - take.sum()]:
            take[g] += 1
        return np.concatenate([rng.choice(g, t, replace=False) for g, t in zip(groups, take) if t] or [np.zeros(0, int)])

    return per_class(scores, labels, fraction, seed, pick)
