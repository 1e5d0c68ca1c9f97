"""Selector speed at ImageNet scale (issue 4).

(Named selection.py, not select.py: a bench/select.py shadows the standard library's
``select`` module for every script run from bench/, and torch imports it via subprocess.)

    python bench/selection.py geda            # exact GEDA on 1,281,167 rows / 1,000 classes, one core
    python bench/selection.py milp --classes 40 --workers 2
                                           # HiGHS vs PuLP/CBC (and PuLP/HiGHS) per class
    python bench/selection.py coreset         # CRAIG and GRAD-MATCH, 50,000 x 512, 10 classes

The table is synthetic but ImageNet-shaped: class sizes 732..1,300 (ImageNet-1k's range,
summing to 1,281,167) and log-normal scores (gradient norms are skewed like that).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before numpy: one BLAS thread per process

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from engine.select import SELECTORS
from engine.select import geda as G

N_IMAGENET, CLASSES = 1_281_167, 1000


def imagenet_table(seed: int = 0):
    """1,281,167 rows in 1,000 classes: 1,300 per class less a random shortfall spread over
    300 classes (as in ImageNet-1k, where 300-odd classes have fewer than 1,300 images)."""
    rng = np.random.default_rng(seed)
    sizes = np.full(CLASSES, 1300)
    short = rng.choice(CLASSES, 300, replace=False)
    sizes[short] -= rng.multinomial(1300 * CLASSES - N_IMAGENET, np.full(300, 1 / 300))
    assert sizes.sum() == N_IMAGENET and sizes.min() >= 732
    labels = rng.permutation(np.repeat(np.arange(CLASSES), sizes))
    return rng.lognormal(0.0, 0.6, N_IMAGENET), labels


def bench_geda(a):
    scores, labels = imagenet_table()
    for fraction in (0.1, 0.3, 0.5):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sel = SELECTORS["geda"](scores, labels, fraction, seed=0)
            times.append(time.perf_counter() - t0)
        print(f"| exact GEDA | {fraction} | {len(sel.index):,} | {min(times):.2f} s (best of 3, one core) |")


def _solve(job):
    solver, scores, k = job
    p = G.build(scores, k, 5)
    if solver == "highs":
        sol = G.solve_highs(p, time_limit=600)
    elif solver == "exact":
        sol = G.solve_exact(p)
    else:
        sol = G.solve_pulp(p, solver.split("-")[1], time_limit=600)
    return sol.seconds, sol.status, sol.objective


def bench_milp(a):
    scores, labels = imagenet_table()
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(labels))[:-1])[: a.classes]
    print(f"{a.classes} of {CLASSES} classes, fraction {a.fraction}, {a.workers} worker processes")
    print("| solver | per-class median (s) | max (s) | wall for these classes (s) | est. all 1,000 classes (s) | statuses | objective vs exact optimum |")
    print("|---|---|---|---|---|---|---|")
    exact = None
    for solver in ("exact", "highs", "pulp-highs", "pulp-cbc"):
        jobs = [(solver, scores[g], max(1, int(round(a.fraction * len(g))))) for g in groups]
        t0 = time.perf_counter()
        with ProcessPoolExecutor(a.workers) as ex:
            res = list(ex.map(_solve, jobs))
        wall = time.perf_counter() - t0
        secs = [r[0] for r in res]
        objs = np.array([r[2] for r in res])
        exact = objs if solver == "exact" else exact
        worse = objs - exact > 1e-9
        rel = (objs - exact) / np.maximum(exact, 1e-12)
        same = "equal in every class" if not worse.any() else f"{int(worse.sum())} classes above (max +{100 * rel.max():.2f} %)"
        statuses = ",".join(sorted({r[1] for r in res}))
        print(f"| {solver} | {statistics.median(secs):.3f} | {max(secs):.3f} | {wall:.1f} | "
              f"{wall * CLASSES / a.classes:.0f} | {statuses} | {same} |", flush=True)


def bench_coreset(a):
    rng = np.random.default_rng(0)
    n, d, c = 50_000, 512, 10
    labels = np.repeat(np.arange(c), n // c)
    centres = rng.normal(size=(c, d))
    emb = centres[labels] + rng.normal(size=(n, d)) * 2.0
    for name in ("craig", "gradmatch"):
        for fraction in (0.1, 0.3):
            t0 = time.perf_counter()
            with ProcessPoolExecutor(a.workers) as ex:
                sel = SELECTORS[name](emb, labels, fraction, seed=0, mapper=ex.map)
            print(f"| {name} | {fraction} | {len(sel.index):,} | {time.perf_counter() - t0:.1f} s ({a.workers} processes) |",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["geda", "milp", "coreset"])
    p.add_argument("--classes", type=int, default=40, help="milp: how many classes to solve")
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    {"geda": bench_geda, "milp": bench_milp, "coreset": bench_coreset}[a.what](a)


if __name__ == "__main__":
    main()
