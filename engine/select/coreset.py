"""Gradient-matching coresets on per-sample gradient embeddings [N, d]: CRAIG and GRAD-MATCH.

Both run per class on the proxy model's last-layer gradient embeddings (``jobs.score
--embeddings``) and return weighted subsets; retraining uses the weights.
"""
from __future__ import annotations

import heapq

import numpy as np

from engine.errors import ConfigError
from engine.select import SELECTORS, Selection
from engine.select.basic import check_scores, per_class


def pairwise_distances(g: np.ndarray) -> np.ndarray:
    """Euclidean distances [n, n] (float64, clipped at 0 against rounding)."""
    sq = np.einsum("ij,ij->i", g, g)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (g @ g.T)
    return np.sqrt(np.maximum(d2, 0.0))


def facility_location_greedy(sim: np.ndarray, k: int, lazy: bool = True) -> np.ndarray:
    """Greedy maximisation of F(S) = Σ_i max_{j∈S} sim[i, j] (sim ≥ 0), k picks, in pick order.

    ``lazy``: Minoux's lazy greedy with a heap of stale upper bounds on the marginal gains
    (valid because F is submodular); it picks exactly what the plain greedy picks (ties to the
    smaller index), usually with far fewer gain evaluations."""
    n = sim.shape[0]
    cur = np.zeros(n)
    picks: list[int] = []
    if not lazy:
        for _ in range(k):
            gains = np.maximum(sim - cur[:, None], 0.0).sum(0)
            gains[picks] = -np.inf
            j = int(np.argmax(gains))
            picks.append(j)
            cur = np.maximum(cur, sim[:, j])
        return np.array(picks, dtype=np.int64)
    heap = [(-float(g), j) for j, g in enumerate(sim.sum(0))]
    heapq.heapify(heap)
    while len(picks) < k:
        neg, j = heapq.heappop(heap)
        gain = float(np.maximum(sim[:, j] - cur, 0.0).sum())
        if not heap or gain >= -heap[0][0] - 1e-12 * max(1.0, abs(gain)):
            if heap and abs(gain - (-heap[0][0])) <= 1e-12 * max(1.0, abs(gain)) and heap[0][1] < j:
                heapq.heappush(heap, (-gain, j))  # exact tie: let the smaller index win, like argmax
                continue
            picks.append(j)
            cur = np.maximum(cur, sim[:, j])
        else:
            heapq.heappush(heap, (-gain, j))
    return np.array(picks, dtype=np.int64)


def craig_class(g: np.ndarray, k: int):
    """CRAIG for one class: medoids by greedy facility location on similarities
    ``max_dist − dist`` and weights = how many samples each medoid is nearest to."""
    dist = pairwise_distances(g)
    sim = dist.max() - dist
    picks = facility_location_greedy(sim, k)
    owner = picks[np.argmin(dist[:, picks], axis=1)]
    weight = np.array([np.sum(owner == j) for j in picks], dtype=np.float64)
    objective = float(sim[:, picks].max(1).sum())
    return picks, {"objective": objective}, weight


@SELECTORS.register("craig")
def craig(scores, labels, fraction, *, seed: int = 0, mapper=map, **params) -> Selection:
    """CRAIG (Mirzasoleiman, Bilmes & Leskovec, ICML 2020): per class, the k_c medoids of the
    gradient embeddings (``scores`` is [N, d]) chosen by lazy greedy facility location; each
    medoid's weight is the size of its cluster, so the weights of a class sum to its size."""
    if params:
        raise ConfigError(f"selector 'craig' takes no parameter(s) {sorted(params)}")
    g = check_scores(scores, labels, "craig", matrix=True)
    return per_class(g, labels, fraction, seed, _CraigPick(), mapper=mapper)


def nnls_ridge(A: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
    """argmin_{w ≥ 0} ||A w − b||² + lam ||w||² (A [d, s]) via NNLS on the stacked system."""
    from scipy.optimize import nnls

    s = A.shape[1]
    w, _ = nnls(np.vstack([A, np.sqrt(lam) * np.eye(s)]), np.concatenate([b, np.zeros(s)]))
    return w


def gradmatch_class(g: np.ndarray, k: int, lam: float, rng: np.random.Generator):
    """Orthogonal matching pursuit with non-negative ridge-regularised weights matching the sum
    of the class's gradient embeddings; returns (picks, info, weights)."""
    target = g.sum(0)
    A = g.T                                              # [d, n]
    picks: list[int] = []
    w = np.zeros(0)
    resid = target.copy()
    while len(picks) < k:
        corr = A.T @ resid
        corr[picks] = -np.inf
        j = int(np.argmax(corr))
        if corr[j] <= 0:
            break                                        # no sample reduces the residual further
        picks.append(j)
        w = nnls_ridge(A[:, picks], target, lam)
        resid = target - A[:, picks] @ w
    if len(picks) < k:                                   # fill as GRAD-MATCH does: at random, weight 1
        rest = np.setdiff1d(np.arange(len(g)), picks)
        extra = rng.choice(rest, k - len(picks), replace=False)
        picks += extra.tolist()
        w = np.concatenate([w, np.ones(len(extra))])
    err = float(np.linalg.norm(target - A[:, picks] @ w) / max(np.linalg.norm(target), 1e-12))
    return np.array(picks, dtype=np.int64), {"relative_error": err}, w


@SELECTORS.register("gradmatch")
def gradmatch(scores, labels, fraction, *, seed: int = 0, lam: float = 0.5, mapper=map, **params) -> Selection:
    """GRAD-MATCH (Killamsetty et al., ICML 2021), per class: OMP picks samples whose weighted
    gradient embeddings (weights ≥ 0, ridge ``lam``, the paper's regulariser; default 0.5 as in
    its reference code) match the class's summed gradient; a sample weight of 0 is kept as 0."""
    if params:
        raise ConfigError(f"selector 'gradmatch' takes no parameter(s) {sorted(params)}")
    if lam < 0:
        raise ConfigError(f"gradmatch lam must be >= 0, got {lam}")
    g = check_scores(scores, labels, "gradmatch", matrix=True)
    return per_class(g, labels, fraction, seed, _GradMatchPick(float(lam)), mapper=mapper)


class _CraigPick:
    """Picklable per-class step (classes may run in other processes or Ray tasks)."""

    def __call__(self, s, n, k, rng):
        return craig_class(s, k)


class _GradMatchPick:
    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, s, n, k, rng):
        return gradmatch_class(s, k, self.lam, rng)
