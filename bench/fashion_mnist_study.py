"""The full Fashion-MNIST study (issue 38): ``tune_configs/fashion_mnist_cpu.yaml`` run to
completion, then its tables, its figure and the seeds' claims read against it.

    python bench/fashion_mnist_study.py --out runs/fashion_mnist_cpu            # run the sweep, then read it
    python bench/fashion_mnist_study.py --out runs/fashion_mnist_cpu --read     # read a finished sweep
    python bench/fashion_mnist_study.py --out runs/fashion_mnist_cpu --read --figure docs/fashion_mnist_accuracy.png

Prints (markdown): test accuracy per selection and fraction (mean ± std over the seeds; the
epochs budget, λ = 0), the adaptive runs and InfoBatch, the steps budget beside the epochs one,
the SLo-Curves λ rows, the Spearman correlation between the score columns (all samples and
within class, from the sweep's score table) and, per claim of the seeds, the numbers that
decide it and whether it reproduces. A difference counts only beyond the noise: twice the
standard error of the difference of two means over seeds (``noise``), or 0.005 when there is
one seed. ``--figure`` draws the report's accuracy-vs-fraction figure for the offline selections
(epochs budget, λ = 0) with the full-data line.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "tune_configs" / "fashion_mnist_cpu.yaml"
SCORE_BASED = ("topk:el2n", "topk:forgetting", "topk:gradnorm_init", "topk:input_norm", "lowest:curvature",
               "ccs:el2n")


def stats(g: pd.DataFrame) -> tuple:
    a = np.asarray(g["test_accuracy"], dtype=float)
    return (float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)) if len(a) else (np.nan, np.nan, 0)


def fmt(m: float, s: float, n: int) -> str:
    return "–" if not n else f"{m:.4f} ± {s:.4f}" if n > 1 else f"{m:.4f}"


def noise(a: tuple, b: tuple) -> float:
    """Twice the standard error of the difference of two means (0.005 without a spread)."""
    if a[2] < 2 or b[2] < 2:
        return 0.005
    return 2.0 * float(np.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2]))


def compare(a: tuple, b: tuple) -> str:
    d, tol = a[0] - b[0], noise(a, b)
    word = "above" if d > tol else "below" if d < -tol else "tied with"
    return f"{word} ({d:+.4f}, noise ±{tol:.4f})"


def cell(df: pd.DataFrame, label: str, frac: float, budget: str = "epochs", lam: float = 0.0) -> tuple:
    return stats(df[(df["label"] == label) & np.isclose(df["fraction"], frac) & (df["budget"] == budget)
                    & np.isclose(df["curvature_lambda"], lam)])


def accuracy_table(df: pd.DataFrame, labels: list, fracs: list) -> str:
    lines = ["| selection | " + " | ".join(f"{f:g}" for f in fracs) + " |", "|---" * (len(fracs) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(fmt(*cell(df, label, f)) for f in fracs) + " |")
    return "\n".join(lines)


def steps_table(df: pd.DataFrame) -> str:
    lines = ["| selection | fraction | epochs budget | steps budget | steps: samples / full |", "|---|---|---|---|---|"]
    full_seen = df[df["label"] == "full"]["samples_seen"].mean()
    for label in sorted({lab[:-len(" (steps)")] for lab in df["label"] if lab.endswith(" (steps)")}):
        for f in sorted(df[df["label"] == f"{label} (steps)"]["fraction"].unique()):
            st = df[(df["label"] == f"{label} (steps)") & np.isclose(df["fraction"], f)]
            lines.append(f"| {label} | {f:g} | {fmt(*cell(df, label, f))} | {fmt(*cell(df, f'{label} (steps)', f, 'steps'))}"
                         f" | {st['samples_seen'].mean() / full_seen:.2f} |")
    return "\n".join(lines)


def correlation(out: Path) -> tuple:
    """(markdown table, overall ρ frame) from the sweep's score table."""
    from engine import artifacts
    from engine.report.build import CORRELATION_FIRST, spearman

    table = artifacts.read_table(out / "scores" / "scores.parquet", "scores")[0]
    cols = sorted(artifacts.score_columns(table), key=lambda c: (CORRELATION_FIRST + (c,)).index(c))
    values = pd.DataFrame({c: np.asarray(table.column(c).to_numpy(), dtype=float) for c in cols})
    overall, within = spearman(values), spearman(values, table.column("label").to_numpy())
    lines = ["| ρ (upper: all samples; lower: within class) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, a in enumerate(cols):
        row = ["1" if i == j else f"{(overall if j > i else within).loc[a, b]:.3f}" for j, b in enumerate(cols)]
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines), overall, within


def claims(df: pd.DataFrame, overall: pd.DataFrame, within: pd.DataFrame) -> str:
    full = stats(df[df["label"] == "full"])
    out = []
    el2n, rnd = cell(df, "topk:el2n", 0.5), cell(df, "random", 0.5)
    out.append(f"- Data Diet (keeping the hardest 50 % by EL2N costs little): topk:el2n at 0.5 {fmt(*el2n)} is "
               f"{compare(el2n, full)} the full data {fmt(*full)}; {compare(el2n, rnd)} random at 0.5 {fmt(*rnd)}. "
               f"Reproduces if within 0.01 of full data: {'yes' if full[0] - el2n[0] <= 0.01 else 'no'}.")
    low, rnd1 = cell(df, "lowest:curvature", 0.1), cell(df, "random", 0.1)
    offline = [lab for lab in df["label"].unique() if lab != "full" and "R=" not in lab and lab != "infobatch"
               and not lab.endswith("(steps)")]
    ranks = sorted(offline, key=lambda lab: -cell(df, lab, 0.1)[0])
    lams = ", ".join(f"λ={lam:g}: {fmt(*cell(df, 'lowest:curvature', 0.1, lam=lam))}"
                     for lam in sorted(df[df["label"] == "lowest:curvature"]["curvature_lambda"].unique()))
    out.append(f"- SLo-Curves (the lowest-curvature subset wins at small fractions): lowest:curvature at 0.1 "
               f"{fmt(*low)} is {compare(low, rnd1)} random; rank {ranks.index('lowest:curvature') + 1} of "
               f"{len(ranks)} offline selections at 0.1 (best: {ranks[0]} {fmt(*cell(df, ranks[0], 0.1))}); with the "
               f"regulariser {lams}.")
    geda = [(f, cell(df, "geda:gradnorm_init", f), cell(df, "random", f)) for f in (0.3, 0.5)]
    ok = all(g[0] >= r[0] - noise(g, r) for _, g, r in geda)
    out.append("- GEDA (at or above random from 20 to 80 %): " + "; ".join(
        f"at {f:g} {fmt(*g)} is {compare(g, r)} random {fmt(*r)}" for f, g, r in geda)
        + f". Reproduces: {'yes' if ok else 'no'}.")
    ccs = cell(df, "ccs:el2n", 0.1)
    scored = sorted(SCORE_BASED, key=lambda lab: -cell(df, lab, 0.1)[0])
    out.append(f"- CCS (ahead at high pruning rates): ccs:el2n at 0.1 {fmt(*ccs)} is {compare(ccs, rnd1)} random, "
               f"{compare(ccs, cell(df, 'topk:el2n', 0.1))} topk:el2n; rank {scored.index('ccs:el2n') + 1} of "
               f"{len(scored)} score-based selections at 0.1.")
    rho, rho_w = overall.loc["gradnorm_init", "input_norm"], within.loc["gradnorm_init", "input_norm"]
    grand = [(f, cell(df, "topk:gradnorm_init", f), cell(df, "topk:input_norm", f), cell(df, "random", f))
             for f in (0.1, 0.3, 0.5)]
    out.append(f"- Kirsch 2023 (GraNd at initialisation ≈ input norm, no better than random): Spearman ρ = {rho:.3f} "
               f"over all samples, {rho_w:.3f} within classes (CIFAR-10: 0.96). topk:gradnorm_init against random: "
               + "; ".join(f"at {f:g} {compare(g, r)}" for f, g, _, r in grand)
               + "; against topk:input_norm: " + "; ".join(f"at {f:g} {compare(g, i)}" for f, g, i, _ in grand) + ".")
    return "\n".join(out)


def weights_and_overhead(out: Path, df: pd.DataFrame) -> str:
    """The weighted manifests' largest weight against their mean (what a weighted loss scales a
    step by), and each trial's seconds outside the optimiser loop per pass (set-up plus the
    per-pass test evaluation reported to Tune)."""
    from engine import artifacts

    lines = []
    for label in ("craig", "gradmatch"):
        for f in sorted(df[df["label"] == label]["fraction"].unique()):
            ratios = [float(w.max() / w.mean()) for m in df[(df["label"] == label) & np.isclose(df["fraction"], f)]
                      ["manifest"] for w in [artifacts.read_manifest(out / m)[1]]]
            lines.append(f"- {label} at {f:g}: largest manifest weight / mean weight {max(ratios):.1f}")
    passes = pd.to_numeric(df["samples_seen"]) / pd.to_numeric(df["train_size"])
    per_pass = (df["wall_time_s"] - df["train_time_s"]) / passes.clip(lower=1)
    outside = df["wall_time_s"] - df["train_time_s"]
    lines.append(f"- seconds outside the optimiser loop per trial: median {np.median(outside):.1f}, per pass "
                 f"median {np.median(per_pass):.2f}, {outside.sum() / 60:.0f} min in all over the {len(df)} trials")
    return "\n".join(lines)


def figure(df: pd.DataFrame, path: Path) -> None:
    from engine.report import figures as F

    keep = (df["budget"] == "epochs") & np.isclose(df["curvature_lambda"], 0) & ~df["label"].str.contains("R=") \
        & (df["label"] != "infobatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    F.save(F.accuracy_vs_fraction(df[keep]), path)


def read(out: Path, fig: Path | None) -> str:
    from engine.report.inputs import normalise_results

    df = normalise_results(pd.read_parquet(out / "results.parquet"))
    fracs = sorted(df.loc[~df["label"].isin(["full", "infobatch"]) & (df["budget"] == "epochs")
                          & ~df["label"].str.contains("R="), "fraction"].unique())
    offline = [lab for lab in dict.fromkeys(df["label"]) if lab != "full" and "R=" not in lab
               and lab != "infobatch" and not lab.endswith("(steps)")]
    adaptive = [lab for lab in dict.fromkeys(df["label"]) if "R=" in lab]
    full = stats(df[df["label"] == "full"])
    ib = df[df["label"] == "infobatch"]
    parts = [f"Full data: {fmt(*full)} ({full[2]} seeds).", "", "Offline selections (epochs budget, λ = 0):", "",
             accuracy_table(df, offline, fracs), "", "Adaptive (R = reselect every R passes) and InfoBatch:", "",
             accuracy_table(df, adaptive, [f for f in fracs if (df[df['label'].isin(adaptive)]['fraction'] == f).any()])]
    if len(ib):
        parts += ["", f"InfoBatch: {fmt(*stats(ib))}, samples seen / full data "
                      f"{ib['samples_seen'].mean() / df[df['label'] == 'full']['samples_seen'].mean():.3f}."]
    parts += ["", "Steps budget (the full-data run's optimizer steps) against the epochs budget:", "", steps_table(df)]
    table, overall, within = correlation(out)
    parts += ["", "Spearman rank correlation between the score columns:", "", table, "", "The seeds' claims:", "",
              claims(df, overall, within)]
    parts += ["", "Weights and overheads:", "", weights_and_overhead(out, df)]
    if fig is not None:
        figure(df, fig)
        parts += ["", f"figure: {fig}"]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--read", action="store_true", help="only read a finished sweep")
    p.add_argument("--figure", type=Path, help="write the accuracy-vs-fraction figure of the offline selections here")
    a = p.parse_args()
    out = Path(a.out)
    if not a.read:
        cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(CONFIG), "--out", str(out)]
        print(" ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=ROOT)
        if code:
            sys.exit(code)
    print(read(out, a.figure))


if __name__ == "__main__":
    main()
