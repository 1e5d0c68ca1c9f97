"""The report's figures: matplotlib (Agg, no pyplot state), one PNG each.

Every function takes plain arrays or a results frame and returns a ``Figure``; ``save``
writes it as a PNG without the Software text chunk (no URL ends up in the files).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

DPI = 110
MAX_CLASSES = 20        # small multiples and legends beyond this are unreadable
CURVE_POINTS = 400      # sorted-score curves and ECDFs are drawn from this many quantiles


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, facecolor="white")
    return path


def palette(n: int) -> list:
    """tab10 for up to 10 series (matplotlib's default cycle), tab20 up to 20, then viridis."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def mean_std(values) -> Tuple[float, float, int]:
    """Mean, sample std (0 for a single value) and count of the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return np.nan, np.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))


def _grid(n: int, max_cols: int = 5) -> Tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _style(ax) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)


# ---------------------------------------------------------------- 1 accuracy vs fraction


def accuracy_vs_fraction(df: pd.DataFrame) -> Figure:
    """Test accuracy vs fraction per selection label (mean ± std over seeds), the full-data
    baseline as a dashed line with its ±std band; a panel per (variant, λ): a row per variant
    and a column per λ when the grid is complete, shared y axis."""
    panels = sorted({(v, lam) for v, lam in zip(df["variant"], df["curvature_lambda"])})
    labels = sorted(set(df["label"]) - {"full"})
    colors = dict(zip(labels, palette(len(labels))))
    variants, lams = sorted({p[0] for p in panels}), sorted({p[1] for p in panels})
    if len(panels) > 1 and len(panels) == len(variants) * len(lams) and len(lams) <= 4:
        rows, cols = len(variants), len(lams)
    else:
        rows, cols = _grid(len(panels), 3)
    width = max(4.8 * cols, 7.0)
    ncols = legend_columns(["full data: 0.000 ± 0.000", *labels], width)
    fig = Figure(figsize=(width, 3.5 * rows + 0.3 * math.ceil(len(labels) / ncols + 1)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharey=True).ravel())
    handles: Dict[str, object] = {}
    fracs = sorted(set(df.loc[df["label"] != "full", "fraction"]))
    for ax, (variant, lam) in zip(axes, panels):
        sub = df[(df["variant"] == variant) & (df["curvature_lambda"] == lam)]
        full = sub[sub["label"] == "full"]
        if len(full):
            m, s, n = mean_std(full["test_accuracy"])
            h = ax.axhline(m, color="black", linestyle="--", linewidth=1.2)
            ax.axhspan(m - s, m + s, color="black", alpha=0.10, linewidth=0)
            name = f"full data: {m:.3f}" + (f" ± {s:.3f}" if n > 1 else "") if len(panels) == 1 else \
                "full data (mean ± std)"
            handles.setdefault(name, h)
        for label in labels:
            g = sub[sub["label"] == label]
            if not len(g):
                continue
            stats = [(f, *mean_std(x["test_accuracy"])) for f, x in g.groupby("fraction")]
            f, m, s, _ = (np.array(c) for c in zip(*stats))
            h = ax.errorbar(f, m, yerr=s, marker="o", markersize=4, capsize=3, linewidth=1.5,
                            color=colors[label], label=label)
            handles.setdefault(label, h)
        if fracs:
            lo, hi = min(fracs), max(fracs)
            pad = max((hi - lo) * 0.08, 0.05)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_xticks(fracs if len(fracs) <= 8 else ax.get_xticks())
        ax.set_xlabel("fraction of training data kept")
        ax.set_ylabel("test accuracy")
        ax.tick_params(labelleft=True)
        if len(panels) > 1:
            ax.set_title(f"variant {variant}, λ = {lam:g}", fontsize=10)
        _style(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(len(handles), ncols), fontsize=9, frameon=False)
    fig.suptitle("Test accuracy vs fraction kept (mean ± std over seeds)", fontsize=11)
    return fig


def legend_columns(names, width: float, most: int = 4) -> int:
    """Legend columns that fit ``width`` inches at font size 9 (about 14 characters an inch,
    a marker and gaps about 4 more per entry): long labels such as "geda:gradnorm_init R=5 warm
    geda" get fewer columns instead of a legend wider than the figure."""
    longest = max((len(str(n)) for n in names), default=1)
    return max(1, min(most, int(width * 14 // (longest + 4))))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def accuracy_vs_cost(df: pd.DataFrame) -> Figure:
    """Test accuracy against what each run cost: its total seconds (training + selection,
    log axis) and the samples it saw relative to the full-data run's; a colour per selection
    label, a marker per fraction, mean ± std over seeds in both axes; the full-data run a black
    star. Rows without a cost (results from before costs were recorded) are left out."""
    df = df[np.isfinite(df["cost_s"])]
    full = df[df["label"] == "full"]
    ref = float(full["samples_seen"].mean()) if len(full) else float(df["samples_seen"].max())
    labels = sorted(set(df["label"]) - {"full"})
    colors = dict(zip(labels, palette(len(labels))))
    fracs = sorted(set(df.loc[df["label"] != "full", "fraction"]))
    marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(fracs)}
    fig = Figure(figsize=(11.0, 4.2 + 0.3 * math.ceil((len(labels) + len(fracs) + 1) / 4)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    handles: Dict[str, object] = {}
    for ax, col, scale, name in ((axes[0], "cost_s", 1.0, "total seconds (training + selection)"),
                                 (axes[1], "samples_seen", ref, "samples seen / the full-data run's")):
        if len(full):
            (mx, sx, _), (my, sy, _) = mean_std(full[col] / scale), mean_std(full["test_accuracy"])
            h = ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], marker="*", markersize=13, color="black",
                            linestyle="none", capsize=3)
            handles.setdefault("full data", h)
        for label in labels:
            for frac, g in df[df["label"] == label].groupby("fraction"):
                (mx, sx, _), (my, sy, _) = mean_std(g[col] / scale), mean_std(g["test_accuracy"])
                h = ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], marker=marker[frac], markersize=6, capsize=2,
                                color=colors[label], linestyle="none")
                handles.setdefault(label, h)
        if col == "cost_s":
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel(name)
        ax.set_ylabel("test accuracy")
        ax.tick_params(labelleft=True)
        _style(ax)
    for f in fracs:
        handles[f"fraction {f:g}"] = axes[0].plot([], [], marker=marker[f], color="0.4", linestyle="none")[0]
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4),
               fontsize=9, frameon=False)
    fig.suptitle("Test accuracy against what the run cost (mean ± std over seeds)", fontsize=11)
    return fig


# ---------------------------------------------------------------- 2 score distributions


def class_hist(values: np.ndarray, labels: np.ndarray, classes: Sequence[int], names: Dict[int, str],
               column: str) -> Figure:
    """Histograms of one score per class (small multiples, shared bins and x axis)."""
    bins, lo, hi = hist_bins(values[np.isfinite(values)])
    colors = palette(len(classes))
    rows, cols = _grid(len(classes))
    fig = Figure(figsize=(2.6 * cols, 2.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for i, (ax, c) in enumerate(zip(axes.ravel(), classes)):
        v = values[(labels == c) & np.isfinite(values)]
        counts, _ = np.histogram(np.clip(v, lo, hi), bins=bins)
        ax.stairs(counts, bins, fill=True, color=colors[i])  # one patch, not a rectangle per bin
        ax.set_ylim(0, max(counts.max(), 1) * 1.05)
        ax.set_title(f"{names[c]} (n={len(v)})", fontsize=9)
        ax.tick_params(labelsize=8)
        _style(ax)
        if i % cols == 0:
            ax.set_ylabel("samples", fontsize=8)
        if i // cols == rows - 1 or i + cols >= len(classes):
            ax.set_xlabel(column, fontsize=8)
            ax.tick_params(labelbottom=True)
    for ax in axes.ravel()[len(classes):]:
        ax.set_visible(False)
    fig.suptitle(f"{column}: distribution per class", fontsize=11)
    return fig


def hist_bins(finite: np.ndarray, n: int = 40) -> tuple:
    """(edges, lo, hi): a bin per value when there are at most ``n`` distinct ones (counts such
    as forgetting events), else ``n`` equal bins over the 0.1-99.9 percentile range."""
    if not len(finite):
        return np.linspace(0, 1, n + 1), 0.0, 1.0
    u = np.unique(finite)
    if 1 < len(u) <= n:
        mid = (u[1:] + u[:-1]) / 2
        step = np.diff(u).min()
        edges = np.concatenate([[u[0] - step / 2], mid, [u[-1] + step / 2]])
        return edges, float(u[0]), float(u[-1])
    lo, hi = (float(x) for x in np.percentile(finite, [0.1, 99.9]))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1), lo, hi


def sorted_curves(values: np.ndarray, labels: np.ndarray, classes: Sequence[int], names: Dict[int, str],
                  column: str) -> Figure:
    """Per class, the score sorted ascending against the cumulative fraction of the class's
    samples (SLo-curves); drawn from CURVE_POINTS quantiles, exact at any size."""
    colors = palette(len(classes))
    fig = Figure(figsize=(8.2, 4.4), layout="constrained")
    ax = fig.subplots()
    q = np.linspace(0, 1, CURVE_POINTS)
    for i, c in enumerate(classes):
        v = values[(labels == c) & np.isfinite(values)]
        if len(v):
            ax.plot(q, np.quantile(v, q), color=colors[i], linewidth=1.6, label=names[c])
    ax.set_xlabel("cumulative fraction of the class's samples (sorted by score)")
    ax.set_ylabel(column)
    ax.set_xlim(0, 1)
    _style(ax)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(f"{column}: sorted score curves per class", fontsize=11)
    return fig


# ---------------------------------------------------------------- 3 GEDA ECDF


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (NaN if either is empty)."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    if not len(a) or not len(b):
        return np.nan
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, side="right") / len(a)
    fb = np.searchsorted(b, x, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ecdf_grid(values: np.ndarray, labels: np.ndarray, chosen: np.ndarray, classes: Sequence[int],
              names: Dict[int, str], column: str, title: str) -> Figure:
    """Per class: ECDF of the whole class vs the selected subset, KS distance in the title."""
    q = np.linspace(0, 1, CURVE_POINTS)
    rows, cols = _grid(len(classes))
    fig = Figure(figsize=(2.7 * cols, 2.2 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    blue, orange = palette(2)
    for i, (ax, c) in enumerate(zip(axes.ravel(), classes)):
        in_c = (labels == c) & np.isfinite(values)
        full, sub = values[in_c], values[in_c & chosen]
        if len(full):
            ax.step(np.quantile(full, q), q, where="post", color=blue, linewidth=1.8, label="whole class")
        if len(sub):
            ax.step(np.quantile(sub, q), q, where="post", color=orange, linewidth=1.4, linestyle="--",
                    label="selected subset")
        ax.set_title(f"{names[c]}  KS={ks_distance(full, sub):.3f}", fontsize=9)
        ax.tick_params(labelsize=8)
        _style(ax)
        if i % cols == 0:
            ax.set_ylabel("ECDF", fontsize=8)
        if i // cols == rows - 1 or i + cols >= len(classes):
            ax.set_xlabel(column, fontsize=8)
            ax.tick_params(labelbottom=True)
    for ax in axes.ravel()[len(classes):]:
        ax.set_visible(False)
    h, lab = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------- 4 image grids


def _tile(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC -> RGB uint8 [size, size, 3] (grey images repeated over channels)."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] != 3:
        img = img[:, :, :3] if img.shape[2] > 3 else np.repeat(img[:, :, :1], 3, axis=2)
    if img.shape[0] != size or img.shape[1] != size:
        from PIL import Image

        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BILINEAR))
    return img


def extremes_grid(images: Dict[int, Tuple[List[np.ndarray], List[np.ndarray]]], names: Dict[int, str],
                  column: str, per_class: int) -> Figure:
    """A row per class: its ``per_class`` lowest-scoring images (lowest first), a gap, then
    its highest-scoring ones (highest first)."""
    first = next(img for low, high in images.values() for img in (*low, *high))
    size = int(min(max(first.shape[0], first.shape[1]), 64))
    pad, gap = max(size // 14, 1), size
    classes = list(images)
    block = per_class * (size + pad)
    width, height = 2 * block + gap, len(classes) * (size + pad)
    mosaic = np.full((height, width, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        low, high = images[c]
        y = r * (size + pad)
        for j, img in enumerate(low):
            x = j * (size + pad)
            mosaic[y:y + size, x:x + size] = _tile(img, size)
        for j, img in enumerate(high):
            x = block + gap + j * (size + pad)
            mosaic[y:y + size, x:x + size] = _tile(img, size)
    scale = max(2.0, 36.0 / size)  # screen pixels per mosaic pixel, at least 36 px per image
    w_in, h_in = width * scale / DPI, height * scale / DPI
    left, top = 1.4, 0.45
    fig = Figure(figsize=(w_in + left + 0.2, h_in + top + 0.2))
    W, H = fig.get_size_inches()
    ax = fig.add_axes((left / W, 0.2 / H, w_in / W, h_in / H))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([r * (size + pad) + size / 2 for r in range(len(classes))], [names[c] for c in classes],
                  fontsize=9)
    ax.set_xticks([block / 2, block + gap + block / 2],
                  [f"lowest {column}  (lowest first)", f"highest {column}  (highest first)"], fontsize=10)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    return fig


# ---------------------------------------------------------------- 5 λ curve


def lambda_curve(df: pd.DataFrame) -> Figure:
    """Test accuracy (and E C_f where present) vs curvature λ, a line per (selection,
    fraction), a row per model variant; mean ± std over seeds."""
    has_curv = bool(np.isfinite(df["normalized_curvature"]).any())
    variants = sorted(set(df["variant"]))
    keys = sorted({(lab, f) for lab, f in zip(df["label"], df["fraction"])}, key=lambda k: (k[0] != "full", k))
    colors = dict(zip(keys, palette(len(keys))))
    ncols = 2 if has_curv else 1
    fig = Figure(figsize=(6.0 * ncols + 0.5, 3.4 * len(variants) + 0.3 * math.ceil(len(keys) / 4) + 0.4),
                 layout="constrained")
    axes = fig.subplots(len(variants), ncols, squeeze=False)
    lams = np.array(sorted(set(df["curvature_lambda"])))
    pos = lams[lams > 0]
    handles: Dict[str, object] = {}
    for row, variant in zip(axes, variants):
        for (label, frac), color in colors.items():
            g = df[(df["label"] == label) & (df["fraction"] == frac) & (df["variant"] == variant)]
            name = f"{label} @ {frac:g}"
            for ax, col in zip(row, ("test_accuracy", "normalized_curvature")):
                stats = [(lam, *mean_std(x[col])) for lam, x in g.groupby("curvature_lambda")]
                stats = [st for st in stats if st[3] > 0]
                if not stats:
                    continue
                x, m, sd, _ = (np.array(c) for c in zip(*stats))
                h = ax.errorbar(x, m, yerr=sd, marker="o", markersize=4, capsize=3, color=color, linewidth=1.5,
                                linestyle="--" if label == "full" else "-", label=name)
                handles.setdefault(name, h)
        for ax, ylabel in zip(row, ("test accuracy", "E C_f (normalized curvature)")):
            if len(pos) and (0 in lams or pos.max() / pos.min() > 20):
                ax.set_xscale("symlog", linthresh=float(pos.min()))
            ax.set_xticks(lams, [f"{v:g}" for v in lams])
            ax.set_xlabel("curvature regularisation λ")
            ax.set_ylabel(ylabel)
            if len(variants) > 1:
                ax.set_title(f"variant {variant}", fontsize=10)
            if not ax.has_data():
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.5")
            _style(ax)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4),
               fontsize=9, frameon=False)
    fig.suptitle("Effect of the curvature penalty λ (mean ± std over seeds; full data dashed)", fontsize=11)
    return fig
