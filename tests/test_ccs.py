"""CCS (coverage-centric coreset selection, Zheng et al., ICLR 2023) against a plain
transcription of its Algorithm 1, its budget and its direction."""
from __future__ import annotations

import numpy as np
import pytest

from engine.select import SELECTORS, class_quotas, total_quota


def table(n_per_class=(50, 30, 17), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    return rng.normal(size=len(labels)), labels[rng.permutation(len(labels))]


def _reference_budgets(counts, k):
    """Algorithm 1 as the reference code writes it (core/data/Coreset.py, bin_allocate)."""
    order = np.argsort(counts, kind="stable")
    rest, out = k, np.zeros(len(counts), dtype=np.int64)
    for i, s in enumerate(order):
        out[s] = min(int(counts[s]), rest // (len(counts) - i))
        rest -= out[s]
    return out


def _brute_ccs_counts(score, hard, k, beta, strata):
    """Per-stratum counts of CCS on one class by a plain transcription: drop the int(beta*n)
    hardest (never below k left), equal-width strata, Algorithm 1, then the remainder."""
    n = len(score)
    drop = min(int(beta * n), n - k)
    kept = sorted(range(n), key=lambda i: (-hard[i], i))[drop:]
    lo, hi = min(score[i] for i in kept), max(score[i] for i in kept)
    which = {i: 0 if hi == lo else min(int((score[i] - lo) / (hi - lo) * strata), strata - 1) for i in kept}
    counts = np.bincount(list(which.values()), minlength=strata)
    take = _reference_budgets(counts, k)
    while take.sum() < k:  # the remainder: most room first, ties to the lower stratum
        room = counts - take
        take[int(np.argmax(room))] += 1
    return kept, which, take


@pytest.mark.parametrize("trial", range(40))
def test_ccs_matches_a_transcription_of_algorithm_1(trial):
    from engine.select.ccs import budgets

    rng = np.random.default_rng(trial)
    n = int(rng.integers(5, 60))
    k = int(rng.integers(1, n + 1))
    strata = int(rng.integers(1, 9))
    beta = float(rng.choice([0.0, 0.1, 0.3, 0.7]))
    score = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # rounding makes ties and edge values
    counts = rng.integers(0, 12, size=strata)
    kk = int(rng.integers(0, counts.sum() + 1))
    got = budgets(counts, kk)
    ref = _reference_budgets(counts, kk)
    assert got.sum() == kk and np.all(got <= counts) and np.all(got >= ref)
    if ref.sum() == kk:
        np.testing.assert_array_equal(got, ref)
    labels = np.zeros(n, dtype=np.int64)
    fraction = k / n
    sel = SELECTORS["ccs"](score, labels, fraction, seed=trial, beta=beta, strata=strata)
    k = total_quota(n, fraction)
    kept, which, take = _brute_ccs_counts(score, score, k, beta, strata)
    assert len(sel.index) == k and set(sel.index) <= set(kept)
    np.testing.assert_array_equal(np.bincount([which[i] for i in sel.index], minlength=strata), take)


def test_ccs_never_keeps_the_hardest_beta_and_keeps_every_class_budget():
    scores, labels = table((200, 120, 80), seed=2)
    for beta in (0.1, 0.3):
        sel = SELECTORS["ccs"](scores, labels, 0.3, seed=0, beta=beta)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            hardest = members[np.argsort(-scores[members], kind="stable")[: int(beta * len(members))]]
            assert not set(hardest) & set(sel.index)
            assert (labels[sel.index] == c).sum() == class_quotas(np.bincount(labels), 0.3)[c]
    # a mislabel column decides what is dropped; hardest=low reads it the other way round
    other = -scores
    sel = SELECTORS["ccs"](scores, labels, 0.3, seed=0, beta=0.2, mislabel=other, hardest="low")
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        lowest_other = members[np.argsort(other[members], kind="stable")[: int(0.2 * len(members))]]
        assert not set(lowest_other) & set(sel.index)


def test_ccs_edge_cases():
    scores, labels = table()
    # beta = 0 and one stratum: a uniform draw from the whole class, as random is
    sel = SELECTORS["ccs"](scores, labels, 0.4, seed=5, beta=0.0, strata=1)
    assert len(sel.index) == total_quota(len(labels), 0.4)
    # fraction 1 keeps everything, whatever beta says (never fewer than the quota remain)
    sel = SELECTORS["ccs"](scores, labels, 1.0, seed=0, beta=0.5)
    np.testing.assert_array_equal(sel.index, np.arange(len(labels)))
    # constant scores: one stratum holds them all
    sel = SELECTORS["ccs"](np.ones(len(labels)), labels, 0.3, seed=0)
    assert len(sel.index) == total_quota(len(labels), 0.3)
