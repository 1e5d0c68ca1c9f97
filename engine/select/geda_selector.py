"""The ``geda`` selector: problem P per class (``engine.select.geda``) with a choice of solver."""
from __future__ import annotations

from typing import Callable

from engine.errors import ConfigError
from engine.params import Rule, at_least, positive
from engine.registry import Registry
from engine.select import Selection, selector
from engine.select import geda as G
from engine.select.basic import check_scores, per_class

# solver name -> solve(problem, time_limit, rng) -> G.Solution
GEDA_SOLVERS: Registry = Registry("GEDA solver")
GEDA_SOLVERS.register("exact")(lambda problem, time_limit, rng: G.solve_exact(problem, seed=int(rng.integers(2**31))))
GEDA_SOLVERS.register("highs")(lambda problem, time_limit, rng: G.solve_highs(problem, time_limit))
GEDA_SOLVERS.register("pulp")(lambda problem, time_limit, rng: G.solve_pulp(problem, "highs", time_limit))
GEDA_SOLVERS.register("pulp-cbc")(lambda problem, time_limit, rng: G.solve_pulp(problem, "cbc", time_limit))
SOLVERS = tuple(GEDA_SOLVERS.names())


@selector("geda", column="gradnorm_init",
          params={"nodes": ("nodes N of the trapezoid rule over the ECDFs", at_least(2)),
                  "solver": ("exact (the closed form), highs (the MILP with HiGHS), pulp or pulp-cbc (the MILP "
                             "through PuLP)", Rule(choices=SOLVERS)),
                  "time_limit": ("seconds per class for the MILP solvers", positive())})
def geda(scores, labels, fraction, *, seed: int = 0, nodes: int = 5, solver: str = "exact",
         time_limit: float = 60.0, mapper: Callable = map, **params) -> Selection:
    """GEDA: per class, the subset whose ECDF of ``scores`` (default column gradnorm_init) best
    matches the class's at ``nodes`` − 1 nodes. ``solver``: exact (closed form, default),
    highs (problem P with HiGHS), pulp (PuLP + HiGHS), pulp-cbc (PuLP + CBC); ``time_limit``
    seconds per class for the MILP solvers. Each class's objective, status and solve time
    are recorded in ``Selection.info["classes"]``."""
    if params:
        raise ConfigError(f"selector 'geda' takes no parameter(s) {sorted(params)}")
    if solver not in SOLVERS:
        raise ConfigError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    scores = check_scores(scores, labels, "geda")
    pick = _Pick(int(nodes), solver, float(time_limit))
    if int(nodes) < 2:
        raise ConfigError(f"--nodes must be at least 2, got {nodes}")
    sel = per_class(scores, labels, fraction, seed, pick, mapper=mapper)
    sel.info.update({"nodes": int(nodes), "solver": solver})
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


class _Pick:
    """Picklable per-class solve (it may run in a Ray task)."""

    def __init__(self, nodes: int, solver: str, time_limit: float):
        self.nodes, self.solver, self.time_limit = nodes, solver, time_limit

    def __call__(self, s, n, k, rng):
        problem = G.build(s, k, self.nodes)
        sol = GEDA_SOLVERS[self.solver](problem, self.time_limit, rng)
        info = {"objective": sol.objective, "status": sol.status, "seconds": round(sol.seconds, 4),
                "n": int(n), "k": int(k)}
        if self.solver != "exact":
            # the closed form costs microseconds: record how far the MILP answer is from the
            # proven optimum (CBC has been seen to report "optimal" 0.1 % above it)
            info["gap_to_optimum"] = sol.objective - G.solve_exact(problem).objective
        return sol.index, info
