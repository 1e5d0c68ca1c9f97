"""Gradient-matching coresets on per-sample gradient embeddings [N, d]: CRAIG and GRAD-MATCH.

Both run per class on the proxy model's last-layer gradient embeddings (``jobs.score
--embeddings``) and return weighted subsets; retraining uses the weights.
"""
from __future__ import annotations

import heapq

import numpy as np

from engine.errors import ConfigError
from engine.params import Rule, at_least
from engine.select import Selection, selector
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


@selector("craig", reads="embeddings", column="grad_embedding", weights=True)
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


class IncrementalNNLS:
    """argmin_{w ≥ 0} ||A_S w − b||² + lam ||w||² over a growing set S of columns of A [d, n].

    Lawson–Hanson's active-set method on the normal equations (G = A_SᵀA_S + lam·I, c = A_Sᵀb),
    warm-started from the previous solution each time a column joins S, with a Cholesky factor
    of G on the passive set that is extended by one row per added variable (O(s²)); when a
    weight hits zero and leaves, only the rows after it are refactored. OMP adds one column per step, so k steps cost
    O(k·(s·d + s²)) instead of a fresh NNLS (O(s³) or worse) per step. With lam = 0 a jitter of
    1e-10 × the mean squared column norm keeps G positive definite."""

    def __init__(self, A: np.ndarray, b: np.ndarray, lam: float, capacity: int):
        from scipy.linalg import cholesky, solve_triangular

        self._tri = lambda *a, **k: solve_triangular(*a, check_finite=False, **k)
        self._chol = lambda m: cholesky(m, lower=True, check_finite=False)
        self.A, self.b = A, b
        self.cols = np.empty((A.shape[0], capacity))
        self.G = np.empty((capacity, capacity))
        self.c = np.empty(capacity)
        self.lam = lam if lam > 0 else 1e-10 * max(float(np.mean(np.einsum("ij,ij->j", A, A))), 1e-300)
        self.s = 0
        self.w = np.zeros(0)
        self.passive: list[int] = []        # positions in S, in the Cholesky factor's order
        self.Lbuf = np.zeros((capacity, capacity))

    @property
    def L(self) -> np.ndarray:
        n = len(self.passive)
        return self.Lbuf[:n, :n]

    def add(self, j: int) -> np.ndarray:
        """Add column j of A to S and return the new weights (one per column of S, in order)."""
        s, a = self.s, self.A[:, j]
        self.cols[:, s] = a
        g = self.cols[:, :s].T @ a
        self.G[s, :s] = g
        self.G[:s, s] = g
        self.G[s, s] = a @ a + self.lam
        self.c[s] = a @ self.b
        self.s += 1
        self.w = np.append(self.w, 0.0)
        self._solve()
        return self.w

    def _append(self, t: int) -> None:
        P, n = self.passive, len(self.passive)
        l = self._tri(self.L, self.G[P, t], lower=True) if n else np.zeros(0)
        self.Lbuf[n, :n] = l
        self.Lbuf[n, n] = np.sqrt(max(self.G[t, t] - l @ l, 1e-300))
        P.append(t)

    def _remove(self, gone: set) -> None:
        """Drop passive variables ``gone``: rows before the first of them keep their factor;
        the rows after it are refactored from their Schur complement."""
        P = self.passive
        r0 = min(P.index(i) for i in gone)
        keep_rows = [r for r in range(r0, len(P)) if P[r] not in gone]
        L21 = self.Lbuf[keep_rows, :r0]
        newP = P[:r0] + [P[r] for r in keep_rows]
        tail = newP[r0:]
        if tail:
            S = self.G[np.ix_(tail, tail)] - L21 @ L21.T
            self.Lbuf[r0:len(newP), :r0] = L21
            self.Lbuf[r0:len(newP), r0:len(newP)] = self._chol(S)
        self.passive = newP

    def _passive_solution(self) -> np.ndarray:
        rhs = self.c[self.passive]
        return self._tri(self.L.T, self._tri(self.L, rhs, lower=True), lower=False)

    def _solve(self) -> None:
        s, w = self.s, self.w
        G, c = self.G[:s, :s], self.c[:s]
        tol = 1e-12 * max(1.0, float(np.abs(c).max()))
        for _ in range(3 * s + 10):
            grad = c - G @ w                              # minus the gradient of ½wᵀGw − cᵀw
            grad[self.passive] = -np.inf
            t = int(np.argmax(grad))
            if grad[t] <= tol:
                return
            self._append(t)
            while True:
                z = self._passive_solution()
                if (z > 0).all():
                    w[:] = 0.0
                    w[self.passive] = z
                    break
                wp = w[self.passive]
                neg = z <= 0
                alpha = np.min(wp[neg] / (wp[neg] - z[neg]))
                w[self.passive] = wp + alpha * (z - wp)
                gone = {i for i in self.passive if w[i] <= tol}
                if not gone:  # rounding left the blocking weight a hair above tol
                    gone = {self.passive[int(np.argmin(np.where(neg, w[self.passive], np.inf)))]}
                w[list(gone)] = 0.0
                self._remove(gone)
        raise RuntimeError("NNLS did not converge")  # a bug, not bad input


def gradmatch_class(g: np.ndarray, k: int, lam: float, rng: np.random.Generator, tol: float = 1e-4):
    """GRAD-MATCH for one class (g: [n, d] gradient embeddings): orthogonal matching pursuit
    picks, one at a time, the sample most correlated with the residual, then refits
    non-negative ridge weights w (``lam``) so that Σ w_i g_i matches the class's summed
    gradient (equivalently, w/n matches its mean: both problems have the same minimiser up to
    that scale). As in the authors' reference code, a sample whose weight drops to 0 leaves the
    subset, and OMP stops early once the relative residual is below ``tol`` (or no sample
    correlates positively with it); the rest of the budget is then drawn at random with
    weight 1. Returns (picks, info, weights); info has the OMP's relative matching error."""
    g = np.asarray(g, dtype=np.float64)
    n = len(g)
    target = g.sum(0)
    norm_target = float(np.linalg.norm(target))
    capacity = min(n, k + min(k, 256))       # room for atoms whose weight went back to 0
    nnls = IncrementalNNLS(g.T, target, lam, capacity=capacity)
    atoms: list[int] = []
    taken = np.zeros(n, dtype=bool)
    w = np.zeros(0)
    resid = target.copy()
    while int((w > 0).sum()) < k and len(atoms) < capacity:
        if np.linalg.norm(resid) <= tol * norm_target:
            break
        corr = g @ resid
        corr[taken] = -np.inf
        j = int(np.argmax(corr))
        if corr[j] <= 0:
            break                                        # no sample reduces the residual further
        atoms.append(j)
        taken[j] = True
        w = nnls.add(j).copy()
        resid = target - nnls.cols[:, :len(atoms)] @ w
    atoms = np.array(atoms, dtype=np.int64)
    if int((w > 0).sum()) > k:
        # one NNLS step can bring back several atoms that had dropped to 0: keep the k heaviest
        # and refit their weights
        atoms = atoms[np.argsort(-w, kind="stable")[:k]]
        refit = IncrementalNNLS(g.T, target, lam, capacity=k)
        for j in atoms:
            w = refit.add(int(j))
    keep = w > 0
    picks, weights = atoms[keep], w[keep]
    err = float(np.linalg.norm(target - g[picks].T @ weights) / max(norm_target, 1e-12))
    info = {"relative_error": err, "omp_picks": int(len(picks)), "random_fill": int(k - len(picks))}
    if len(picks) < k:
        rest = np.setdiff1d(np.arange(n), picks)
        extra = rng.choice(rest, k - len(picks), replace=False)
        picks = np.concatenate([picks, extra])
        weights = np.concatenate([weights, np.ones(len(extra))])
    return picks, info, weights


def gradmatch_batches(g: np.ndarray, k: int, lam: float, rng: np.random.Generator, tol: float, batch: int):
    """GRAD-MATCH-PB (the per-batch variant of the GRAD-MATCH paper and of CORDS's
    GradMatchPB) for one class: its rows in a random order (``rng``) cut into mini-batches of
    ``batch`` rows (the last one shorter), each batch's summed gradient embedding one atom;
    ``gradmatch_class`` picks ceil(k / batch) batches on the atoms, every row of a batch
    takes its batch's weight, and the rows are cut to k from the end (the random fill first,
    then the part of the last batch picked that does not fit). The OMP runs on n / batch
    atoms instead of n samples, and the same target (the class's summed gradient)."""
    g = np.asarray(g, dtype=np.float64)
    order = rng.permutation(len(g))
    starts = np.arange(0, len(g), batch)
    atoms = np.add.reduceat(g[order], starts, axis=0)
    groups = np.split(order, starts[1:])
    picks, info, w = gradmatch_class(atoms, min(len(atoms), -(-k // batch)), lam, rng, tol)
    rows = np.concatenate([groups[j] for j in picks])
    weight = np.concatenate([np.full(len(groups[j]), wj) for j, wj in zip(picks, w)])
    if len(rows) < k:  # a short last batch among the picks: fill at random with weight 1, as OMP does
        extra = rng.choice(np.setdiff1d(np.arange(len(g)), rows), k - len(rows), replace=False)
        rows, weight = np.concatenate([rows, extra]), np.concatenate([weight, np.ones(len(extra))])
    info = {**info, "batch": int(batch), "batches": int(len(picks))}
    return rows[:k], info, weight[:k]


@selector("gradmatch", reads="embeddings", column="grad_embedding", weights=True,
          params={"lam": ("ridge regulariser of the weights", at_least(0)),
                  "tol": ("stop OMP at this relative residual and fill the rest at random",
                          Rule(lo=0, hi=1, hi_open=True)),
                  "batch": ("1: OMP picks samples; B > 1: it picks per-class mini-batches of B samples "
                            "(GRAD-MATCH-PB, a solve on n / B atoms)", at_least(1))})
def gradmatch(scores, labels, fraction, *, seed: int = 0, lam: float = 0.5, tol: float = 1e-4, batch: int = 1,
              mapper=map, **params) -> Selection:
    """GRAD-MATCH (Killamsetty et al., ICML 2021), per class: OMP picks samples whose weighted
    gradient embeddings (weights > 0, ridge ``lam``, the paper's regulariser; default 0.5 as in
    its reference code) match the class's gradient, stopping at relative residual ``tol``
    (default 1e-4, the reference code's) and filling the budget at random with weight 1.
    ``batch`` B > 1 is the paper's per-batch variant (GRAD-MATCH-PB): the atoms are random
    per-class mini-batches of B samples, each picked batch's rows sharing its weight."""
    if params:
        raise ConfigError(f"selector 'gradmatch' takes no parameter(s) {sorted(params)}")
    if lam < 0:
        raise ConfigError(f"gradmatch lam must be >= 0, got {lam}")
    if not 0 <= tol < 1:
        raise ConfigError(f"gradmatch tol must be in [0, 1), got {tol}")
    if int(batch) != batch or batch < 1:
        raise ConfigError(f"gradmatch batch must be a whole number >= 1, got {batch}")
    g = check_scores(scores, labels, "gradmatch", matrix=True)
    return per_class(g, labels, fraction, seed, _GradMatchPick(float(lam), float(tol), int(batch)), mapper=mapper)


class _CraigPick:
    """Picklable per-class step (classes may run in other processes or Ray tasks)."""

    def __call__(self, s, n, k, rng):
        return craig_class(s, k)


class _GradMatchPick:
    def __init__(self, lam: float, tol: float, batch: int = 1):
        self.lam, self.tol, self.batch = lam, tol, batch

    def __call__(self, s, n, k, rng):
        if self.batch > 1:
            return gradmatch_batches(s, k, self.lam, rng, self.tol, self.batch)
        return gradmatch_class(s, k, self.lam, rng, self.tol)
