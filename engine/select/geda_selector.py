"""The ``geda`` selector: problem P per class (``engine.select.geda``) with a choice of solver."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from engine.errors import ConfigError
from engine.params import Rule, at_least, positive
from engine.registry import Registry
from engine.select import Selection, selector
from engine.select import geda as G
from engine.select.basic import check_scores, per_class

GEDA_SOLVERS: Registry = Registry("GEDA solver")
# solver name -> solve(problem, time_limit, rng, within) -> G.Solution; the MILP solvers keep
# the within-bin choice their branch-and-bound leaves (``within`` applies to the exact solver)
GEDA_SOLVERS.register("exact")(lambda problem, time_limit, rng, within: G.solve_exact(
    problem, seed=int(rng.integers(2**31)), within=within))
GEDA_SOLVERS.register("highs")(lambda problem, time_limit, rng, within: G.solve_highs(problem, time_limit))
GEDA_SOLVERS.register("pulp")(lambda problem, time_limit, rng, within: G.solve_pulp(problem, "highs", time_limit))
GEDA_SOLVERS.register("pulp-cbc")(lambda problem, time_limit, rng, within: G.solve_pulp(problem, "cbc", time_limit))
SOLVERS = tuple(GEDA_SOLVERS.names())


@selector("geda", column="gradnorm_init",
          params={"nodes": ("nodes N of the trapezoid rule over the ECDFs", at_least(2)),
                  "solver": ("exact (the closed form), highs (the MILP with HiGHS), pulp or pulp-cbc (the MILP "
                             "through PuLP)", Rule(choices=SOLVERS)),
                  "time_limit": ("seconds per class for the MILP solvers", positive()),
                  "within": ("which samples inside each ECDF bin (the objective fixes only how many): even (spread "
                             "over the bin's ranking, close to evenly_spaced) or random (uniform in the bin, as "
                             "a MILP solver's choice); --solver exact only", Rule(choices=G.WITHIN)),
                  "lam": ("online GEDA (given gradient embeddings: jobs.train --reselect-every, or jobs.select "
                          "--embeddings): ridge of the subset's weights, the thesis's Algorithm 6.1", at_least(0))})
def geda(scores, labels, fraction, *, seed: int = 0, nodes: int = 5, solver: str = "exact",
         time_limit: float = 60.0, within: str = "even", lam: float = 0.5, mapper: Callable = map, embeddings=None,
         **params) -> Selection:
    """GEDA: per class, the subset whose ECDF of ``scores`` (default column gradnorm_init) best
    matches the class's at ``nodes`` − 1 nodes. ``solver``: exact (closed form, default),
    highs (problem P with HiGHS), pulp (PuLP + HiGHS), pulp-cbc (PuLP + CBC); ``time_limit``
    seconds per class for the MILP solvers. ``within``: which samples of each bin the exact
    solver keeps, even (spread over the bin's ranking) or random (uniform in the bin; the
    objective is the same optimum either way). Each class's objective, status and solve time
    are recorded in ``Selection.info["classes"]``. Given ``embeddings`` [N, d] (the adaptive
    loop recomputes them with the gradient norms), the subset is weighted as online GEDA
    does (``err_weights``, ridge ``lam``); without them every weight is 1, as the thesis's
    offline GEDA."""
    if params:
        raise ConfigError(f"selector 'geda' takes no parameter(s) {sorted(params)}")
    if solver not in SOLVERS:
        raise ConfigError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if within not in G.WITHIN:
        raise ConfigError(f"geda within must be one of {', '.join(G.WITHIN)}, got {within!r}")
    if within != "even" and solver != "exact":
        raise ConfigError(f"geda within={within} chooses inside the bins for --solver exact; the MILP solver "
                          f"{solver} keeps its own choice")
    if lam < 0:
        raise ConfigError(f"geda lam must be >= 0, got {lam}")
    scores = check_scores(scores, labels, "geda")
    if embeddings is not None:  # the class's rows carry their norm and their embedding to the pick
        scores = np.column_stack([scores, check_scores(embeddings, labels, "geda (online)", matrix=True)])
    pick = _Pick(int(nodes), solver, float(time_limit), None if embeddings is None else float(lam), within)
    if int(nodes) < 2:
        raise ConfigError(f"--nodes must be at least 2, got {nodes}")
    sel = per_class(scores, labels, fraction, seed, pick, mapper=mapper)
    sel.info.update({"nodes": int(nodes), "solver": solver, "within": within if solver == "exact" else "solver"})
    if embeddings is not None:
        sel.info["lam"] = float(lam)
    import warnings

    classes = sel.info["classes"]
    bad = {c: v["status"] for c, v in classes.items() if v["status"] != "optimal"}
    if bad:
        warnings.warn(f"GEDA: {len(bad)} class(es) not solved to optimality: {bad}", stacklevel=2)
    worse = {c: v["gap_to_optimum"] for c, v in classes.items()
             if v["status"] == "optimal" and v.get("gap_to_optimum", 0.0) > 1e-9 * max(1.0, v["objective"])}
    if worse:
        warnings.warn(f"GEDA: solver {solver} reported 'optimal' for {len(worse)} class(es) whose objective is above "
                      f"the exact optimum (gaps {worse}); use --solver exact for the true optimum", stacklevel=2)
    return sel


def err_weights(g: np.ndarray, picks: np.ndarray, lam: float) -> tuple:
    """Online GEDA's weights (the GEDA thesis, section 6.2, Algorithm 6.1) for one class:
    w = argmin_{w >= 0} ||Σ_{i in picks} w_i g_i − Σ_j g_j||² + lam ||w||², the gradient-matching
    error Err of GRAD-MATCH (its section 3.2.1: the subset's weighted gradient against the
    class's) with a ridge term, on the rows ``g`` [n, d] of the class (gradient embeddings).
    The thesis states the problem over all real w; Winnow keeps w >= 0, as GRAD-MATCH does:
    a negative weight would turn that sample's step into gradient ascent, and manifests hold
    non-negative weights. Returns (w [k], Err / ||Σ_j g_j||, the same ratio for the weights
    n / k that the unweighted subset stands for)."""
    from engine.select.coreset import nnls_ridge

    g = np.asarray(g, dtype=np.float64)
    target = g.sum(0)
    A = g[np.asarray(picks, dtype=np.int64)].T
    w = nnls_ridge(A, target, lam) if A.shape[1] else np.zeros(0)
    scale = max(float(np.linalg.norm(target)), 1e-12)
    plain = np.full(A.shape[1], len(g) / max(A.shape[1], 1))
    return w, float(np.linalg.norm(A @ w - target) / scale), float(np.linalg.norm(A @ plain - target) / scale)


class _Pick:
    """Picklable per-class solve (it may run in a Ray task). With ``lam`` set, each row is
    (gradient norm, gradient embedding...) and the subset gets online GEDA's weights."""

    def __init__(self, nodes: int, solver: str, time_limit: float, lam: Optional[float] = None, within: str = "even"):
        self.nodes, self.solver, self.time_limit, self.lam, self.within = nodes, solver, time_limit, lam, within

    def __call__(self, s, n, k, rng):
        g = None
        if self.lam is not None:
            s, g = s[:, 0], s[:, 1:]
        problem = G.build(s, k, self.nodes)
        sol = GEDA_SOLVERS[self.solver](problem, self.time_limit, rng, self.within)
        info = {"objective": sol.objective, "status": sol.status, "seconds": round(sol.seconds, 4),
                "n": int(n), "k": int(k)}
        if self.solver != "exact":
            # the closed form costs microseconds: record how far the MILP answer is from the
            # proven optimum (CBC has been seen to report "optimal" 0.1 % above it)
            info["gap_to_optimum"] = sol.objective - G.solve_exact(problem).objective
        if g is None:
            return sol.index, info
        w, info["relative_error"], info["unweighted_error"] = err_weights(g, sol.index, self.lam)
        info["zero_weights"] = int((w <= 0).sum())  # the subset is GEDA's (Algorithm 6.1, step 1), zeros and all
        return sol.index, info, w
