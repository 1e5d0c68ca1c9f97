"""GEDA (Gradient norms Empirical Distribution Approximation; master's thesis 2022, ch. 4):
per class, the k-subset whose ECDF of scores (gradient norms at initialisation) best matches
the full class's ECDF at N−1 equally spaced nodes.

Problem P (thesis §4.1). For a class with scores X_1..X_n, m = min, M = max, nodes
t_k = m + k(M − m)/N, k = 1..N−1, c_ik = 1{X_i ≤ t_k}, choose δ ∈ {0,1}^n with Σδ = κ to

    minimise (M − m)/N · Σ_k | (1/n) Σ_i c_ik − (1/κ) Σ_i δ_i c_ik |.

(The thesis's trapezoid rule also has the end term f(m)/2, which it drops as zero; it is not
zero when several samples share the minimum, but we follow problem P as written.)

The problem is built once (``build``) and solved by any of three solvers:

* ``exact`` — no MILP needed. Sort samples into the bins B_0 = (−∞, t_1], B_j = (t_j, t_{j+1}],
  B_{N−1} = (t_{N−1}, ∞) with counts n_j, and let C_k = n_0 + … + n_{k−1} (so
  Σ_i c_ik = C_k). A subset enters the objective only through S_k = Σ_i δ_i c_ik, the number
  of chosen samples in bins 0..k−1; the objective is Σ_k |C_k/n − S_k/κ|. Any integers
  0 = S_0 ≤ S_1 ≤ … ≤ S_N = κ with 0 ≤ S_k − S_{k−1} ≤ n_{k−1} are realisable (choose
  S_k − S_{k−1} samples from bin k−1), and every term is minimised on its own by
  S_k = round(T_k), T_k = κ C_k / n. These roundings are feasible: T_k − T_{k−1} =
  κ n_{k−1}/n lies in [0, n_{k−1}] because κ ≤ n, and rounding (half up) is monotone and
  commutes with adding integers, so round(T_k) − round(T_{k−1}) lies in [0, n_{k−1}] too (the
  same argument with T_N = κ covers the last bin). A feasible point that minimises every term
  separately minimises the sum: it is optimal. Cost O(n log n) for the sort, O(N) after.
  Problem P fixes only how many samples each bin gets, x_j = S_{j+1} − S_j; which ones is
  free and does not change the objective. ``within="even"`` (default) spreads them evenly over
  the bin's rank order (ties in score broken by a seeded permutation), which keeps the subset's
  shape inside the bin close to the class's and makes GEDA close to ``evenly_spaced``;
  ``within="random"`` draws them uniformly at random inside the bin (seeded), nearer to what
  the thesis's CBC returned: whatever its branch-and-cut left, nothing inside a bin preferred.
* ``highs`` — problem P as written (one binary per sample, one continuous Z_k per node) solved
  by HiGHS through ``highspy``, with a time limit whose expiry is reported as the status.
* ``pulp`` — the same model through PuLP, with PuLP's HiGHS or CBC backend; PuLP reports
  "Optimal" after a time-out, so the status is read from the solution status instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from engine.errors import ConfigError


@dataclass(frozen=True)
class GedaProblem:
    """Problem P for one class: ``bins`` int [n] (bin of each sample, 0..N−1), ``k`` samples to
    choose, ``nodes`` N, and the scale (M − m)/N of the objective."""

    scores: np.ndarray
    bins: np.ndarray
    k: int
    nodes: int
    scale: float

    @property
    def n(self) -> int:
        return len(self.scores)

    def full_cdf(self) -> np.ndarray:
        """(1/n) Σ_i c_ik for k = 1..N−1."""
        counts = np.bincount(self.bins, minlength=self.nodes)
        return np.cumsum(counts)[:-1] / self.n

    def objective(self, chosen: np.ndarray) -> float:
        """(M − m)/N Σ_k |F_full(t_k) − F_subset(t_k)| of a set of positions."""
        sub = np.bincount(self.bins[chosen], minlength=self.nodes)
        return float(self.scale * np.abs(self.full_cdf() - np.cumsum(sub)[:-1] / len(chosen)).sum())


@dataclass
class GedaSolution:
    index: np.ndarray      # chosen positions within the class
    objective: float
    status: str            # "optimal", "time_limit", ...
    seconds: float


def build(scores: np.ndarray, k: int, nodes: int = 5) -> GedaProblem:
    """Problem P for one class's scores (float [n]) and subset size k (1 ≤ k ≤ n)."""
    scores = np.asarray(scores, dtype=np.float64)
    if nodes < 2:
        raise ConfigError(f"--nodes must be at least 2, got {nodes}")
    if not 1 <= k <= len(scores):
        raise ConfigError(f"GEDA subset size {k} is outside 1..{len(scores)}")
    m, M = float(scores.min()), float(scores.max())
    t = m + np.arange(1, nodes) * (M - m) / nodes                 # t_1..t_{N−1}
    bins = np.searchsorted(t, scores, side="left").astype(np.int64)  # X ≤ t_k  <=>  bin < k
    return GedaProblem(scores, bins, int(k), int(nodes), (M - m) / nodes)


WITHIN = ("even", "random")


def solve_exact(p: GedaProblem, seed: int = 0, within: str = "even") -> GedaSolution:
    """The closed-form optimum (see the module docstring for the proof); ``within`` ("even" or
    "random") chooses the samples inside each bin."""
    if within not in WITHIN:
        raise ConfigError(f"GEDA within must be one of {', '.join(WITHIN)}, got {within!r}")
    t0 = time.perf_counter()
    counts = np.bincount(p.bins, minlength=p.nodes)
    cum = np.concatenate([[0], np.cumsum(counts)])                # C_0..C_N
    targets = np.floor(p.k * cum / p.n + 0.5).astype(np.int64)   # S_k = round(T_k), S_N = κ
    take = np.diff(targets)                                      # chosen per bin
    # by bin, then score, then a seeded tie-break. Bins are monotone in the score, so sorting by
    # score sorts by bin; the tie-break permutation is drawn only when scores do tie (the order,
    # and so the choice, is the same whatever the tie-break when there are none).
    order = np.argsort(p.scores, kind="stable")
    if (np.diff(p.scores[order]) == 0).any():
        tie = np.random.default_rng(seed).permutation(p.n)
        order = np.lexsort((tie, p.scores))
    chosen = []
    rng = np.random.default_rng([seed, 1]) if within == "random" else None
    for j in range(p.nodes):
        members = order[cum[j]:cum[j + 1]]
        if rng is None:
            chosen.append(members[spread(len(members), int(take[j]))])
        else:
            chosen.append(rng.choice(members, int(take[j]), replace=False))
    index = np.sort(np.concatenate(chosen))
    return GedaSolution(index, p.objective(index), "optimal", time.perf_counter() - t0)


def spread(n: int, k: int) -> np.ndarray:
    """k of the positions 0..n−1, evenly spaced (centres of k equal slices), increasing."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.floor((np.arange(k) + 0.5) * n / k).astype(np.int64)


def solve_highs(p: GedaProblem, time_limit: Optional[float] = 60.0) -> GedaSolution:
    """Problem P with HiGHS (highspy): variables δ_1..δ_n (binary) and Z_1..Z_{N−1}."""
    import highspy

    t0 = time.perf_counter()
    n, K, kk = p.n, p.nodes - 1, p.k
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    if time_limit:
        h.setOptionValue("time_limit", float(time_limit))
    inf = highspy.kHighsInf
    # columns: δ (n) then Z (K); objective scale·ΣZ
    cost = np.concatenate([np.zeros(n), np.full(K, p.scale)])
    lower = np.zeros(n + K)
    upper = np.concatenate([np.ones(n), np.full(K, inf)])
    h.addVars(n + K, lower, upper)
    h.changeColsCost(n + K, np.arange(n + K, dtype=np.int32), cost)
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.full(n, highspy.HighsVarType.kInteger))
    full = p.full_cdf()
    for k in range(1, p.nodes):
        members = np.flatnonzero(p.bins < k).astype(np.int32)   # c_ik = 1
        z = np.int32(n + k - 1)
        idx = np.concatenate([members, [z]])
        # F_full − (1/κ)Σδc ≤ Z   <=>   (1/κ)Σδc + Z ≥ F_full
        h.addRow(full[k - 1], inf, len(idx), idx, np.concatenate([np.full(len(members), 1 / kk), [1.0]]))
        # −F_full + (1/κ)Σδc ≤ Z  <=>   (1/κ)Σδc − Z ≤ F_full
        h.addRow(-inf, full[k - 1], len(idx), idx, np.concatenate([np.full(len(members), 1 / kk), [-1.0]]))
    h.addRow(kk, kk, n, np.arange(n, dtype=np.int32), np.ones(n))
    h.run()
    status = h.getModelStatus()
    names = {highspy.HighsModelStatus.kOptimal: "optimal", highspy.HighsModelStatus.kTimeLimit: "time_limit"}
    label = names.get(status, h.modelStatusToString(status).lower().replace(" ", "_"))
    sol = np.asarray(h.getSolution().col_value[:n]) if h.getInfo().primal_solution_status else np.zeros(n)
    index = np.sort(np.argsort(-sol, kind="stable")[:kk])        # round the incumbent to exactly κ
    return GedaSolution(index, p.objective(index), label, time.perf_counter() - t0)


def solve_pulp(p: GedaProblem, backend: str = "highs", time_limit: Optional[float] = 60.0) -> GedaSolution:
    """Problem P through PuLP (``backend`` "highs" via highspy, or "cbc", PuLP's bundled CBC)."""
    import pulp

    t0 = time.perf_counter()
    prob = pulp.LpProblem("geda", pulp.LpMinimize)
    d = [pulp.LpVariable(f"d{i}", cat="Binary") for i in range(p.n)]
    z = [pulp.LpVariable(f"z{k}") for k in range(1, p.nodes)]
    prob += p.scale * pulp.lpSum(z)
    full = p.full_cdf()
    for k in range(1, p.nodes):
        sel = pulp.lpSum(d[i] for i in np.flatnonzero(p.bins < k)) * (1.0 / p.k)
        prob += full[k - 1] - sel <= z[k - 1]
        prob += -full[k - 1] + sel <= z[k - 1]
    prob += pulp.lpSum(d) == p.k
    if backend == "highs":
        solver = pulp.HiGHS(msg=False, timeLimit=time_limit)
    elif backend == "cbc":
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit)
    else:
        raise ConfigError(f"PuLP backend must be 'highs' or 'cbc', got {backend!r}")
    prob.solve(solver)
    # PuLP maps a time-out with an incumbent to status "Optimal"; sol_status tells them apart
    label = {pulp.LpSolutionOptimal: "optimal", pulp.LpSolutionIntegerFeasible: "time_limit"}.get(
        prob.sol_status, pulp.LpStatus[prob.status].lower())
    vals = np.array([v.value() or 0.0 for v in d])
    index = np.sort(np.argsort(-vals, kind="stable")[:p.k])
    return GedaSolution(index, p.objective(index), label, time.perf_counter() - t0)
