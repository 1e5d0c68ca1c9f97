"""GEDA against brute force and HiGHS; CRAIG against exhaustive search; GRAD-MATCH's error;
the thesis baselines; weighted manifests."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.select import SELECTORS
from engine.select import geda as G
from engine.select.coreset import craig_class, facility_location_greedy, gradmatch_class, pairwise_distances


def instances(count, seed=0, max_n=9):
    rng = np.random.default_rng(seed)
    for t in range(count):
        n = int(rng.integers(1, max_n))
        k = int(rng.integers(1, n + 1))
        kind = t % 4
        if kind == 0:
            s = rng.random(n)
        elif kind == 1:
            s = rng.integers(0, 3, n).astype(float)         # many ties
        elif kind == 2:
            s = np.full(n, 0.7)                              # all scores equal
        else:
            s = np.round(rng.exponential(size=n), 1)         # skewed with ties
        yield s, k, int(rng.integers(2, 7))


def brute(p):
    return min(p.objective(np.array(c)) for c in itertools.combinations(range(p.n), p.k))


def test_exact_equals_brute_force_on_tiny_classes():
    for s, k, nodes in instances(400, seed=1):
        p = G.build(s, k, nodes)
        sol = G.solve_exact(p, seed=0)
        assert len(sol.index) == k and len(np.unique(sol.index)) == k
        assert sol.objective == pytest.approx(brute(p), abs=1e-12), (s, k, nodes)


def test_exact_equals_highs_on_random_classes():
    rng = np.random.default_rng(2)
    for t in range(300):
        n = int(rng.integers(1, 60))
        k = int(rng.choice([1, n, int(rng.integers(1, n + 1))]))  # k = 1 and k = n included
        s = rng.random(n) if t % 3 else rng.integers(0, 5, n).astype(float)
        if t % 17 == 0:
            s = np.zeros(n)
        p = G.build(s, k, 5)
        ex, hs = G.solve_exact(p), G.solve_highs(p, time_limit=30)
        assert hs.status == "optimal"
        assert ex.objective == pytest.approx(hs.objective, abs=1e-9), (t, n, k)


@pytest.mark.parametrize("backend", ["highs", "cbc"])
def test_pulp_matches_exact(backend):
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = rng.random(80)
        p = G.build(s, 23, 5)
        sol = G.solve_pulp(p, backend, time_limit=30)
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(G.solve_exact(p).objective, abs=1e-9)


def test_objective_is_the_thesis_formula():
    s = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 10.0])
    p = G.build(s, 2, 5)                   # nodes at 2, 4, 6, 8
    chosen = np.array([0, 5])              # subset ECDF: 1/2 at every inner node
    full = np.array([3, 5, 5, 5]) / 6
    assert p.objective(chosen) == pytest.approx(2.0 * np.abs(full - 0.5).sum())


def test_exact_is_deterministic_and_spreads_within_bins():
    s = np.linspace(0, 1, 101)
    p = G.build(s, 10, 5)
    a, b = G.solve_exact(p, seed=4), G.solve_exact(p, seed=4)
    np.testing.assert_array_equal(a.index, b.index)
    assert np.diff(s[a.index]).min() > 0.05  # spread out, not the first ten of each bin


def _bin_counts(p, index):
    return np.bincount(p.bins[index], minlength=p.nodes)


def test_geda_within_even_spreads_over_each_bins_ranking():
    """within="even": each bin's chosen samples are the centres of equal slices of the bin's
    rank order (by score), the counts being the closed-form optimum's."""
    rng = np.random.default_rng(5)
    s = rng.gamma(2.0, 1.0, 300)
    p = G.build(s, 41, 5)
    sol = G.solve_exact(p, seed=3, within="even")
    order = np.argsort(s, kind="stable")
    for j, x in enumerate(_bin_counts(p, sol.index)):
        members = order[p.bins[order] == j]
        np.testing.assert_array_equal(np.sort(members[G.spread(len(members), int(x))]),
                                      np.sort(np.intersect1d(sol.index, members)))
    assert sol.objective == pytest.approx(brute_free_optimum(p), abs=1e-12)


def brute_free_optimum(p):
    """The optimum from the bin counts alone (S_k = round(k C_k / n)), computed independently."""
    counts = np.bincount(p.bins, minlength=p.nodes)
    C = np.cumsum(counts)[:-1]
    S = np.floor(p.k * C / p.n + 0.5)
    return float(p.scale * np.abs(C / p.n - S / p.k).sum())


def test_geda_within_random_draws_uniformly_inside_each_bin():
    """within="random": the same per-bin counts and objective as "even" (the optimum), the
    samples drawn uniformly inside each bin: over 3000 seeds every member of bin j is chosen
    with frequency x_j / n_j (within 5 binomial standard deviations); seeded and reproducible."""
    rng = np.random.default_rng(6)
    s = np.round(rng.exponential(size=120), 1)  # ties too
    p = G.build(s, 25, 5)
    even = G.solve_exact(p, seed=0, within="even")
    take, sizes = _bin_counts(p, even.index), np.bincount(p.bins, minlength=p.nodes)
    hits = np.zeros(p.n)
    draws = 3000
    for seed in range(draws):
        sol = G.solve_exact(p, seed=seed, within="random")
        np.testing.assert_array_equal(_bin_counts(p, sol.index), take)
        assert sol.objective == pytest.approx(even.objective, abs=1e-12)
        hits[sol.index] += 1
    q = (take / np.maximum(sizes, 1))[p.bins]
    sd = np.sqrt(draws * q * (1 - q))
    assert np.all(np.abs(hits - draws * q) <= 5 * sd + 1e-9)
    np.testing.assert_array_equal(G.solve_exact(p, 7, "random").index, G.solve_exact(p, 7, "random").index)
    assert not np.array_equal(G.solve_exact(p, 7, "random").index, G.solve_exact(p, 8, "random").index)
    with pytest.raises(ConfigError, match="within"):
        G.solve_exact(p, within="sideways")


def test_geda_selector_within_choice():
    """The selector's ``within``: random keeps every class's optimum, picks other samples than
    even, and is further from evenly_spaced than even is; recorded; exact solver only."""
    rng = np.random.default_rng(7)
    scores, labels = rng.gamma(2.0, 1.0, 3000), np.repeat(np.arange(3), 1000)
    even = SELECTORS["geda"](scores, labels, 0.2, seed=0)
    rand = SELECTORS["geda"](scores, labels, 0.2, seed=0, within="random")
    spaced = SELECTORS["evenly_spaced"](scores, labels, 0.2, seed=0)
    assert even.info["within"] == "even" and rand.info["within"] == "random"
    for c in range(3):
        assert rand.info["classes"][c]["objective"] == pytest.approx(even.info["classes"][c]["objective"], abs=1e-12)
    overlap = lambda a, b: len(np.intersect1d(a.index, b.index)) / len(a.index)
    assert overlap(rand, even) < 0.5
    assert overlap(even, spaced) > overlap(rand, spaced) + 0.3
    with pytest.raises(ConfigError, match="exact"):
        SELECTORS["geda"](scores, labels, 0.2, solver="highs", within="random")
    from engine.select import check_selector_params

    with pytest.raises(ConfigError, match="within"):
        check_selector_params("geda", {"within": "sideways"})


def test_geda_selector_records_objective_and_status():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(90), np.repeat([0, 1, 2], 30)
    sel = SELECTORS["geda"](scores, labels, 0.3, seed=0, solver="highs", time_limit=10)
    assert set(sel.info["classes"]) == {0, 1, 2}
    assert all(c["status"] == "optimal" and c["k"] == 9 for c in sel.info["classes"].values())
    ex = SELECTORS["geda"](scores, labels, 0.3, seed=0)
    for c in range(3):
        assert ex.info["classes"][c]["objective"] == pytest.approx(sel.info["classes"][c]["objective"], abs=1e-9)


def test_milp_answer_is_compared_with_the_proven_optimum(monkeypatch):
    rng = np.random.default_rng(1)
    scores, labels = rng.random(120), np.repeat([0, 1], 60)
    sel = SELECTORS["geda"](scores, labels, 0.25, seed=0, solver="highs", time_limit=10)
    assert all(abs(c["gap_to_optimum"]) < 1e-9 for c in sel.info["classes"].values())

    def optimal_in_name_only(p, time_limit=None):  # a solver that claims optimality for the first k
        idx = np.arange(p.k)
        return G.GedaSolution(idx, p.objective(idx), "optimal", 0.0)

    monkeypatch.setattr(G, "solve_highs", optimal_in_name_only)
    with pytest.warns(UserWarning, match="above the exact optimum"):
        sel = SELECTORS["geda"](scores, labels, 0.25, seed=0, solver="highs")
    assert max(c["gap_to_optimum"] for c in sel.info["classes"].values()) > 1e-3


def test_highs_time_limit_is_reported():
    rng = np.random.default_rng(0)
    p = G.build(rng.random(3000), 1500, 5)
    sol = G.solve_highs(p, time_limit=1e-6)
    assert sol.status != "optimal"
    with pytest.warns(UserWarning, match="not solved to optimality"):
        SELECTORS["geda"](rng.random(3000), np.zeros(3000, np.int64), 0.5, solver="highs", time_limit=1e-6)


def test_craig_greedy_against_exhaustive_search():
    rng = np.random.default_rng(5)
    for _ in range(30):
        g = rng.normal(size=(8, 3))
        k = int(rng.integers(1, 5))
        dist = pairwise_distances(g)
        sim = dist.max() - dist
        f = lambda S: sim[:, list(S)].max(1).sum()
        best = max(f(S) for S in itertools.combinations(range(8), k))
        lazy = facility_location_greedy(sim, k, lazy=True)
        plain = facility_location_greedy(sim, k, lazy=False)
        np.testing.assert_array_equal(lazy, plain)          # lazy evaluation changes nothing
        assert f(lazy) >= (1 - 1 / np.e) * best - 1e-9      # the greedy guarantee
        if k == 1:
            assert f(lazy) == pytest.approx(best)           # greedy is exact for one medoid


def test_craig_weights_are_cluster_sizes():
    rng = np.random.default_rng(6)
    g = rng.normal(size=(40, 4))
    picks, info, w = craig_class(g, 7)
    assert w.sum() == 40 and np.all(w >= 1) and len(np.unique(picks)) == 7
    labels = np.repeat([0, 1], 20)
    sel = SELECTORS["craig"](g, labels, 0.25, seed=0)
    for c in (0, 1):
        assert sel.weight[labels[sel.index] == c].sum() == 20


def test_gradmatch_error_decreases_with_k():
    rng = np.random.default_rng(8)
    g = rng.normal(size=(60, 10)) + 0.3
    errors = [gradmatch_class(g, k, 0.5, np.random.default_rng(0), tol=0)[1]["relative_error"]
              for k in (1, 3, 6, 12, 24)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    picks, info, w = gradmatch_class(g, 12, 0.5, np.random.default_rng(0), tol=0)
    assert np.all(w > 0) and len(np.unique(picks)) == 12 and info["random_fill"] == 0


def test_gradmatch_stops_at_tolerance_and_fills_at_random():
    rng = np.random.default_rng(9)
    g = rng.normal(size=(200, 6)) + 1.0   # 6 dimensions: a few atoms match the sum closely
    picks, info, w = gradmatch_class(g, 50, 0.01, np.random.default_rng(0), tol=1e-3)
    assert info["relative_error"] <= 1e-3 and info["omp_picks"] < 50
    assert info["omp_picks"] + info["random_fill"] == 50 == len(np.unique(picks))
    np.testing.assert_array_equal(w[info["omp_picks"]:], 1.0)
    with pytest.raises(ConfigError, match="tol"):
        SELECTORS["gradmatch"](g, np.zeros(200, np.int64), 0.1, tol=1.5)


def test_gradmatch_per_batch_picks_whole_batches_and_matches_better_than_random_batches():
    from engine.select.coreset import gradmatch_batches

    rng = np.random.default_rng(12)
    g = rng.normal(size=(203, 8)) + rng.normal(size=8)      # 203 rows: the last batch of 10 is short
    k, batch = 47, 10
    rows, info, w = gradmatch_batches(g, k, 0.5, np.random.default_rng(0), 0, batch)
    assert len(rows) == len(np.unique(rows)) == k and np.all(w > 0) and info["batch"] == batch
    # the batches are the rows in one random order cut every 10: rebuild them and check that
    # the picks are whole batches (the last one cut to fit) sharing one weight each
    order = np.random.default_rng(0).permutation(len(g))
    batch_of = np.empty(len(g), np.int64)
    batch_of[order] = np.arange(len(g)) // batch
    picked = batch_of[rows]
    assert len(np.unique(picked)) == info["batches"] == 5
    for b in np.unique(picked):
        assert len(np.unique(w[picked == b])) == 1
    full = [b for b in np.unique(picked) if (picked == b).sum() == (batch_of == b).sum()]
    assert len(full) >= 4
    target = g.sum(0)
    err = np.linalg.norm(target - g[rows].T @ w) / np.linalg.norm(target)
    # random batches of the same count, least-squares-scaled: OMP's are better
    rand = []
    for s in range(20):
        pick = np.random.default_rng(100 + s).choice(int(batch_of.max()) + 1, 5, replace=False)
        A = np.stack([g[batch_of == b].sum(0) for b in pick], 1)
        coef, *_ = np.linalg.lstsq(A, target, rcond=None)
        rand.append(np.linalg.norm(target - A @ np.clip(coef, 0, None)) / np.linalg.norm(target))
    assert err < np.median(rand), (err, np.median(rand))


def test_gradmatch_batch_one_is_per_sample_and_batch_is_checked():
    rng = np.random.default_rng(13)
    g = rng.normal(size=(120, 6)) + 0.5
    labels = np.repeat([0, 1, 2], 40)
    a = SELECTORS["gradmatch"](g, labels, 0.25, seed=3)
    b = SELECTORS["gradmatch"](g, labels, 0.25, seed=3, batch=1)
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_array_equal(a.weight, b.weight)
    pb = SELECTORS["gradmatch"](g, labels, 0.25, seed=3, batch=4)
    assert np.bincount(labels[pb.index]).tolist() == [10, 10, 10]
    assert all(pb.info["classes"][c]["batches"] == 3 for c in range(3))
    with pytest.raises(ConfigError, match="batch"):
        SELECTORS["gradmatch"](g, labels, 0.25, batch=2.5)


@pytest.mark.parametrize("lam", [0.0, 0.5, 20.0])
def test_online_geda_weights_solve_algorithm_6_1(lam):
    """err_weights against a direct solver of the same objective (bounded L-BFGS-B from
    several starts) on small instances."""
    from scipy.optimize import minimize

    from engine.select.geda_selector import err_weights

    rng = np.random.default_rng(int(lam * 10) + 1)
    for trial in range(4):
        g = rng.normal(size=(40, 6)) + rng.normal(size=6)
        picks = rng.choice(40, 9, replace=False)
        w, err, plain = err_weights(g, picks, lam)
        A, t = g[picks].T, g.sum(0)

        def f(v):
            return np.sum((A @ v - t) ** 2) + lam * np.sum(v ** 2)

        best = min((minimize(f, x0, jac=lambda v: 2 * A.T @ (A @ v - t) + 2 * lam * v, method="L-BFGS-B",
                             bounds=[(0, None)] * 9, options={"ftol": 1e-15, "gtol": 1e-12})
                    for x0 in (np.zeros(9), np.full(9, 40 / 9), rng.uniform(0, 10, 9))), key=lambda r: r.fun)
        assert np.all(w >= 0) and f(w) <= best.fun * (1 + 1e-7) + 1e-9, (trial, f(w), best.fun)
        assert err == pytest.approx(np.linalg.norm(A @ w - t) / np.linalg.norm(t))
        assert plain == pytest.approx(np.linalg.norm(A @ np.full(9, 40 / 9) - t) / np.linalg.norm(t))
        if lam == 0:
            assert err <= plain + 1e-12       # n / k per sample is feasible: the fit can only match better


def test_geda_given_embeddings_keeps_its_subset_and_weights_it():
    from engine.select.geda_selector import err_weights

    rng = np.random.default_rng(14)
    labels = np.repeat([0, 1], 50)
    norms = rng.gamma(2.0, size=100)
    emb = rng.normal(size=(100, 5)) + norms[:, None]
    plain = SELECTORS["geda"](norms, labels, 0.2, seed=1)
    online = SELECTORS["geda"](norms, labels, 0.2, seed=1, embeddings=emb, lam=0.1)
    np.testing.assert_array_equal(plain.index, online.index)
    np.testing.assert_array_equal(plain.weight, 1.0)
    for c in (0, 1):
        rows = np.flatnonzero(labels == c)
        local = np.searchsorted(rows, online.index[labels[online.index] == c])
        w, err, _ = err_weights(emb[rows], local, 0.1)
        np.testing.assert_allclose(online.weight[labels[online.index] == c], w)
        assert online.info["classes"][c]["relative_error"] == pytest.approx(err)
    assert online.info["lam"] == 0.1 and "lam" not in plain.info


def test_random_quantile_draws_from_every_quartile():
    scores = np.arange(100, dtype=float)
    sel = SELECTORS["random_quantile"](scores, np.zeros(100, np.int64), 0.2, seed=1)
    counts = np.bincount(scores[sel.index].astype(int) // 25, minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]


def test_evenly_spaced_takes_every_jth():
    scores = np.arange(100, dtype=float)[::-1].copy()
    sel = SELECTORS["evenly_spaced"](scores, np.zeros(100, np.int64), 0.1, seed=0)
    np.testing.assert_array_equal(np.sort(scores[sel.index]), np.arange(5, 100, 10))


def test_global_ranking_ignores_classes():
    scores = np.concatenate([np.zeros(50), np.ones(50)])
    labels = np.repeat([0, 1], 50)
    sel = SELECTORS["topk"](scores, np.zeros_like(labels), 0.5, seed=0)   # what --global passes
    assert set(labels[sel.index]) == {1}


@pytest.mark.parametrize("lam", [0.5, 0.0, 5.0])
def test_incremental_nnls_matches_scipy_at_every_step(lam, monkeypatch):
    from engine.select.coreset import IncrementalNNLS, nnls_ridge

    removals = []
    remove = IncrementalNNLS._remove
    monkeypatch.setattr(IncrementalNNLS, "_remove", lambda self, gone: (removals.append(1), remove(self, gone)))
    rng = np.random.default_rng(11)
    for trial in range(6):
        d, n = 12, 40
        base = rng.normal(size=(d, 3))
        A = base @ rng.normal(size=(3, n)) + 0.3 * rng.normal(size=(d, n))  # correlated: weights hit 0
        b = A[:, :20].sum(1) + rng.normal(size=d)
        order = rng.permutation(n)[:25]
        inc = IncrementalNNLS(A, b, lam, capacity=25)
        for s, j in enumerate(order, 1):
            w = inc.add(int(j))
            ref = nnls_ridge(A[:, order[:s]], b, max(lam, 1e-12))
            f = lambda v: np.sum((A[:, order[:s]] @ v - b) ** 2) + lam * np.sum(v ** 2)
            assert np.all(w >= 0)
            assert f(w) <= f(ref) + 1e-7 * max(1.0, f(ref)), (trial, s)
    assert len(removals) >= 10  # the correlated design drives weights to 0 (the removal path)


def test_gradmatch_keeps_exactly_k_when_nnls_brings_atoms_back(monkeypatch):
    # on this instance one NNLS step reactivates several zero-weight atoms at once, which used
    # to return more than k samples (5,008 instead of 5,000 in bench/selection.py coreset)
    import engine.select.coreset as C

    built = []
    init = C.IncrementalNNLS.__init__

    def counting_init(self, *a, **kw):
        built.append(1)
        init(self, *a, **kw)

    monkeypatch.setattr(C.IncrementalNNLS, "__init__", counting_init)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(300, 16)) * 2 + rng.normal(size=16)
    picks, info, w = gradmatch_class(g, 30, 0.5, np.random.default_rng(0))
    assert len(built) == 2                    # the trimming refit ran
    assert len(picks) == len(np.unique(picks)) == 30 and np.all(w > 0)
