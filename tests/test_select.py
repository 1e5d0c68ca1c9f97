"""Selector properties, parametrised over the registry, and the quota rule."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from engine.errors import ConfigError, DataError
from engine.select import SELECTORS, class_quotas
from engine.select.quota import total_quota

# what each selector reads and whether it weights samples: its registry entry says
EMBEDDING_SELECTORS = {e.name for e in SELECTORS.entries() if e.reads == "embeddings"}
WEIGHTED = {e.name for e in SELECTORS.entries() if e.weights}


def table(n_per_class=(50, 30, 17), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    perm = rng.permutation(len(labels))
    return rng.normal(size=len(labels)), labels[perm]


def inputs_for(name, scores, labels, dim=6):
    """Scores for score-ranking selectors, [N, d] embeddings for CRAIG / GRAD-MATCH."""
    if name in EMBEDDING_SELECTORS:
        rng = np.random.default_rng(7)
        return rng.normal(size=(len(labels), dim)) + labels[:, None] + scores[:, None]
    return scores


@pytest.mark.parametrize("name", SELECTORS.names())
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_sizes_uniqueness_determinism(name, fraction):
    scores, labels = table()
    scores = inputs_for(name, scores, labels)
    a = SELECTORS[name](scores, labels, fraction, seed=3)
    b = SELECTORS[name](scores, labels, fraction, seed=3)
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert len(np.unique(a.index)) == len(a.index)
    assert a.index.min() >= 0 and a.index.max() < len(labels)
    assert len(a.index) == total_quota(len(labels), fraction)
    for c in np.unique(labels):
        n_c = (labels == c).sum()
        k_c = (labels[a.index] == c).sum()
        assert abs(k_c - fraction * n_c) <= 1, (c, k_c, n_c)
    assert a.weight.shape == a.index.shape and np.all(a.weight >= 0)
    if name not in WEIGHTED:
        np.testing.assert_array_equal(a.weight, np.ones(len(a.index)))


def test_random_depends_on_seed():
    scores, labels = table()
    a = SELECTORS["random"](None, labels, 0.3, seed=0).index
    b = SELECTORS["random"](None, labels, 0.3, seed=1).index
    assert not np.array_equal(a, b)


def test_topk_keeps_highest_and_lowest_keeps_lowest():
    scores, labels = table()
    top = SELECTORS["topk"](scores, labels, 0.2, seed=0).index
    low = SELECTORS["lowest"](scores, labels, 0.2, seed=0).index
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen_top = np.intersect1d(top, members)
        chosen_low = np.intersect1d(low, members)
        rest_top = np.setdiff1d(members, chosen_top)
        rest_low = np.setdiff1d(members, chosen_low)
        assert scores[chosen_top].min() >= scores[rest_top].max()
        assert scores[chosen_low].max() <= scores[rest_low].min()


def test_topk_offset_skips_the_very_highest():
    scores = np.arange(100, dtype=float)
    labels = np.zeros(100, dtype=np.int64)
    sel = SELECTORS["topk"](scores, labels, 0.3, seed=0, offset=0.1).index
    # skip the top 10 (scores 90..99), keep the next 30 (60..89)
    np.testing.assert_array_equal(np.sort(scores[sel]), np.arange(60, 90, dtype=float))


def test_ties_break_towards_smaller_position():
    scores = np.zeros(10)
    labels = np.zeros(10, dtype=np.int64)
    np.testing.assert_array_equal(SELECTORS["topk"](scores, labels, 0.3, seed=0).index, [0, 1, 2])
    np.testing.assert_array_equal(SELECTORS["lowest"](scores, labels, 0.3, seed=0).index, [0, 1, 2])


def test_quotas_sum_and_bounds():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(500):
        counts = rng.integers(1, 200, size=rng.integers(1, 12))
        f = float(rng.uniform(0.01, 1.0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = class_quotas(counts, f)
        assert np.all(q <= counts) and np.all(q >= 1)
        if not caught:  # no class was starved: exact total, each class within one of F·n_c
            assert q.sum() == total_quota(counts.sum(), f)
            assert np.all(np.abs(q - f * counts) < 1 + 1e-9)
            checked += 1
    assert checked > 300


def test_tiny_class_keeps_one_with_warning():
    with pytest.warns(UserWarning, match="keeps no sample of class"):
        q = class_quotas(np.array([100, 2]), 0.1)
    assert q.tolist() == [10, 1]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_bad_fraction(fraction):
    scores, labels = table()
    with pytest.raises(ConfigError, match="fraction"):
        SELECTORS["random"](scores, labels, fraction, seed=0)


def test_nan_scores_and_offset_errors():
    scores, labels = table()
    scores[3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        SELECTORS["topk"](scores, labels, 0.5, seed=0)
    with pytest.raises(ConfigError, match="exceeds 1"):
        SELECTORS["topk"](np.ones_like(scores), labels, 0.8, seed=0, offset=0.3)
    with pytest.raises(ConfigError, match="--column"):
        SELECTORS["lowest"](None, labels, 0.5, seed=0)


def test_unknown_selector_lists_known():
    with pytest.raises(ConfigError, match="known: .*random"):
        SELECTORS["nope"]


@pytest.mark.parametrize("name", SELECTORS.names())
def test_each_entry_describes_its_selector(name):
    """Every keyword parameter is described with its default, a help text and (numbers and
    choices) a rule that admits the default; the entry's column is the one the selector reads."""
    import inspect

    from engine.select import READS, check_selector_params

    e = SELECTORS[name]
    assert e.reads in READS and e.summary and e.summary[0].isupper()
    sig = {n: p.default for n, p in inspect.signature(e.fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert {p.name for p in e.params} == set(sig) - {"seed", "mapper", "embeddings"}
    for prm in e.params:
        assert prm.default == sig[prm.name] and prm.help
        assert prm.rule is None or prm.rule.admits(prm.default)
    assert check_selector_params(name, {p.name: p.default for p in e.params}) is not None
    assert (e.column is None) == (e.reads != "embeddings" and name != "geda")
    if e.reads == "embeddings":
        assert e.column == "grad_embedding"


def test_readme_selector_table_matches_the_registry():
    """The README's selector table lists exactly the registered selectors, and names each
    selector's own parameters as flags."""
    import re

    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text.split("### Selectors (`--selector`)", 1)[1].split("\n### ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (.*)$", section, re.M)}
    assert set(rows) == set(SELECTORS.names())
    for e in SELECTORS.entries():
        for prm in e.params:
            assert re.search(rf"`--{prm.name.replace('_', '-')}[` ]", rows[e.name]), (e.name, prm.name)
