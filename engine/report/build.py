"""Assemble the report: decide which sections have their inputs, draw them, write
``report.html`` (self-contained: PNGs embedded as base64, inline CSS, no URL) and the PNGs
into a fresh directory that replaces the report directory in one rename."""
from __future__ import annotations

import base64
import errno
import html
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from engine.errors import ConfigError
from engine.report import figures as F
from engine.report.inputs import GEOMETRY, Run, discover, pgd_columns


@dataclass
class Section:
    key: str
    title: str
    blocks: List[tuple] = field(default_factory=list)   # ("fig", file, caption) | ("html", text) | ("p", text)
    skipped: Optional[str] = None


@dataclass
class Options:
    data: Optional[str] = None            # data source spec override for the image grids
    columns: Optional[Sequence[str]] = None
    per_class: int = 8


class Builder:
    def __init__(self, run: Run, opts: Options, folder: Path):
        self.run, self.opts, self.folder = run, opts, folder
        self.sections: List[Section] = []
        self.names: Dict[str, int] = {}
        self._data = None          # (source, info) once loaded
        self._data_error: Optional[str] = None

    # ------------------------------------------------------------ helpers

    def figure(self, section: Section, stem: str, fig, caption: str) -> None:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)
        n = self.names.get(base, 0)
        self.names[base] = n + 1
        name = f"{base}.png" if not n else f"{base}-{n}.png"
        F.save(fig, self.folder / name)
        section.blocks.append(("fig", name, caption))

    def section(self, key: str, title: str) -> Section:
        s = Section(key, title)
        self.sections.append(s)
        return s

    def data(self):
        """(the run's data source, its DataInfo), or None with ``_data_error`` set."""
        if self._data is None and self._data_error is None:
            spec = self.opts.data or self.run.data
            if not spec:
                self._data_error = "no data source is recorded in the run (pass --data SPEC)"
            else:
                try:
                    from engine.data import load_source

                    source = load_source(spec)
                    self._data = (source, source.info())
                except Exception as exc:  # any error: any failure only skips the images
                    self._data_error = f"the data source {spec!r} could not be loaded ({type(exc).__name__}: {exc})"
        return self._data

    def class_names(self, classes) -> Dict[int, str]:
        names = {}
        info = self._data[1] if self._data else None
        for c in classes:
            cn = info.class_names if info is not None else None
            names[c] = f"{c}: {cn[c]}" if cn and 0 <= c < len(cn) else f"class {c}"
        return names

    def score_columns(self) -> List[str]:
        from engine.artifacts import score_columns

        if self.run.scores is None:
            return []
        have = score_columns(self.run.scores)
        if self.opts.columns:
            missing = [c for c in self.opts.columns if c not in have]
            if missing:
                raise ConfigError(f"--columns {missing} not in the score table {str(self.run.scores_path)!r}; "
                                  f"it has {have}")
            return list(self.opts.columns)
        return have

    def values(self, column: str) -> np.ndarray:
        return np.asarray(self.run.scores.column(column).to_pandas(), dtype=float)

    def classes(self) -> tuple:
        labels = self.run.scores.column("label").to_numpy().astype(np.int64)
        classes = [int(c) for c in np.unique(labels)]
        note = ""
        if len(classes) > F.MAX_CLASSES:
            note = f" Only the first {F.MAX_CLASSES} of {len(classes)} classes are drawn."
            classes = classes[:F.MAX_CLASSES]
        return labels, classes, note

    # ------------------------------------------------------------ sections

    def accuracy(self) -> None:
        s = self.section("accuracy", "Test accuracy vs fraction kept")
        df = self.run.results
        if df is None:
            s.skipped = "no finished training run (no results.parquet or train/*/metrics.json with an accuracy)"
            return
        self.figure(s, "accuracy_vs_fraction", F.accuracy_vs_fraction(df),
                    "Mean test accuracy over seeds against the fraction of training data kept, per selection; "
                    "error bars are ±1 std over seeds (none with one seed). Dashed line and grey band: the "
                    "full-data baseline's mean ± std." + (" A panel per model variant and λ."
                                                         if df[["variant", "curvature_lambda"]].drop_duplicates()
                                                         .shape[0] > 1 else ""))
        s.blocks.append(("html", accuracy_table(df)))

    def cost(self) -> None:
        s = self.section("cost", "Test accuracy vs what the run cost")
        df = self.run.results
        if df is None or not np.isfinite(df["cost_s"]).any():
            s.skipped = "no finished training run with its cost (results from before costs were recorded)"
            return
        self.figure(s, "accuracy_vs_cost", F.accuracy_vs_cost(df),
                    "Each selection's mean test accuracy over seeds (a colour per selection, a marker per "
                    "fraction; bars ±1 std) against the run's total seconds, training plus selection (log "
                    "axis; offline subsets: the score table's proxy training and scoring plus the solve, what one "
                    "such run pays alone; adaptive runs: every reselection's recomputation and solve), and against "
                    "the samples it saw relative to the full-data run (the black star).")

    def lambda_curve(self) -> None:
        s = self.section("lambda", "Curvature penalty λ")
        df = self.run.results
        if df is None:
            s.skipped = "no finished training run"
            return
        lams = sorted(set(df["curvature_lambda"]))
        if len(lams) < 2:
            s.skipped = f"a single curvature λ ({lams[0]:g}) in the results; the λ curve needs two or more"
            return
        has_curv = bool(np.isfinite(df["normalized_curvature"]).any())
        self.figure(s, "lambda_curve", F.lambda_curve(df),
                    "Test accuracy" + (" (left) and E C_f, the normalized curvature on the test set (right)"
                                       if has_curv else "") +
                    " against the curvature penalty λ, a line per selection and fraction; mean ± std over seeds."
                    + ("" if has_curv else " E C_f is not in the results (train with --geometry)."))

    def geometry(self) -> None:
        s = self.section("geometry", "LCNN geometry")
        df = self.run.results
        if df is None:
            s.skipped = "no finished training run"
            return
        has = df[list(GEOMETRY)].apply(np.isfinite).any(axis=1)
        if not has.any():
            s.skipped = "no geometry in the results (grad_norm, hessian_norm, normalized_curvature are all NaN; " \
                        "train with --geometry)"
            return
        s.blocks.append(("p", "Per model variant (and GradReg weight), selection, fraction and λ: mean ± std over "
                              "seeds of test accuracy, E‖∇f‖, E‖∇²f‖, E C_f and PGD robust accuracies, over the "
                              "runs that measured geometry."))
        s.blocks.append(("html", geometry_table(df[has])))

    def distributions(self) -> None:
        s = self.section("scores", "Score distributions per class")
        if self.run.scores is None:
            s.skipped = "no score table (scores.parquet)"
            return
        cols = self.score_columns()
        if not cols:
            s.skipped = f"the score table {str(self.run.scores_path)!r} has no numeric score column"
            return
        self.data()  # class names, if the data loads
        labels, classes, note = self.classes()
        names = self.class_names(classes)
        for col in cols:
            v = self.values(col)
            nan = int((~np.isfinite(v)).sum())
            nan_note = f" {nan} non-finite value(s) are left out." if nan else ""
            if nan == len(v):
                s.blocks.append(("p", f"{col}: every value is NaN; nothing to draw."))
                continue
            self.figure(s, f"hist_{col}", F.class_hist(v, labels, classes, names, col),
                        f"{col}: histogram per class (shared bins: one per value for a score with few distinct "
                        f"values, else 40 over the 0.1-99.9 percentile range with values beyond it counted in the "
                        f"edge bins).{nan_note}{note}")
            self.figure(s, f"curves_{col}", F.sorted_curves(v, labels, classes, names, col),
                        f"{col}: per class, the scores sorted ascending against the cumulative fraction of the "
                        f"class's samples (SLo-curves).{nan_note}{note}")

    def correlations(self) -> None:
        s = self.section("correlations", "Rank correlation between scores")
        if self.run.scores is None:
            s.skipped = "no score table (scores.parquet)"
            return
        cols = sorted(self.score_columns(), key=lambda c: (CORRELATION_FIRST + (c,)).index(c))
        if len(cols) < 2:
            s.skipped = f"the score table has {len(cols)} score column(s); a correlation needs two"
            return
        labels = self.run.scores.column("label").to_numpy().astype(np.int64)
        values = pd.DataFrame({c: self.values(c) for c in cols})
        overall, within = spearman(values), spearman(values, labels)
        if {"gradnorm_init", "input_norm"} <= set(cols):
            s.blocks.append(("p", "GraNd at initialisation (gradnorm_init) against the input norm (input_norm): "
                                  f"Spearman ρ = {overall.loc['gradnorm_init', 'input_norm']:.3f} over all samples, "
                                  f"{within.loc['gradnorm_init', 'input_norm']:.3f} within classes (mean over "
                                  "classes). Kirsch (2023) found ρ ≈ 0.96 on CIFAR-10 and GraNd at initialisation "
                                  "no better a pruning score than random."))
        s.blocks.append(("p", "Spearman rank correlation between every pair of score columns, over the samples "
                              "where both are finite: above the diagonal over all samples, below it the mean over "
                              "classes of the within-class correlation (what a per-class selector sees)."))
        s.blocks.append(("html", correlation_table(overall, within)))

    def geda(self) -> None:
        s = self.section("geda", "GEDA: subset ECDF vs whole class")
        mans = [m for m in self.run.manifests if m.selector == "geda"]
        if not mans:
            s.skipped = "no GEDA manifest (selector 'geda')"
            return
        if self.run.scores is None:
            s.skipped = "no score table to compare the GEDA subsets against"
            return
        self.data()
        labels, classes, note = self.classes()
        names = self.class_names(classes)
        ids = self.run.scores.column("sample_id").to_numpy()
        for column in sorted({m.column for m in mans}):
            if column not in self.run.scores.column_names:
                s.blocks.append(("p", f"GEDA manifests on {column!r}: the score table has no such column; skipped."))
                continue
            group = [m for m in mans if m.column == column]
            fracs = sorted({m.fraction for m in group})
            frac = fracs[len(fracs) // 2]
            man = min((m for m in group if m.fraction == frac), key=lambda m: (m.seed, m.path.name))
            v = self.values(column)
            chosen = np.isin(ids, man.ids)
            ks = {c: F.ks_distance(v[labels == c], v[(labels == c) & chosen]) for c in classes}
            title = f"GEDA on {column}, fraction {frac:g} (seed {man.seed}): ECDF per class"
            self.figure(s, f"geda_ecdf_{column}", F.ecdf_grid(v, labels, chosen, classes, names, column, title),
                        f"Per class, the ECDF of {column} over the whole class (solid) and over the GEDA subset "
                        f"{man.path.name} (dashed); KS = sup |F_class − F_subset| in each title. "
                        f"Mean KS over classes {np.nanmean(list(ks.values())):.4f}; max "
                        f"{np.nanmax(list(ks.values())):.4f}."
                        + (f" Fraction {frac:g} is the middle of {', '.join(f'{f:g}' for f in fracs)}."
                           if len(fracs) > 1 else "") + note)
            others = [m for m in self.run.manifests if m is not man and m.selector != "geda"
                      and abs(m.fraction - frac) < 1e-9]
            s.blocks.append(("html", ks_table(v, labels, ids, classes, names, man, others)))

    def images(self) -> None:
        per = self.opts.per_class
        s = self.section("images", f"Lowest- and highest-scoring training images ({per} per class)")
        if self.run.scores is None:
            s.skipped = "no score table"
            return
        cols = self.score_columns()
        if not cols:
            s.skipped = "no score column"
            return
        if self.data() is None:
            s.skipped = self._data_error
            return
        source, _ = self._data
        labels, classes, note = self.classes()
        names = self.class_names(classes)
        ids = self.run.scores.column("sample_id").to_numpy()
        picks = {}
        for col in cols:
            v = self.values(col)
            pc = {}
            for c in classes:
                rows = np.flatnonzero((labels == c) & np.isfinite(v))
                if not len(rows):
                    continue
                order = rows[np.argsort(v[rows], kind="stable")]
                pc[c] = (ids[order[:per]], ids[order[::-1][:per]])
            if pc:
                picks[col] = pc
        needed = np.unique(np.concatenate([np.concatenate([lo, hi]) for pc in picks.values()
                                           for lo, hi in pc.values()])) if picks else np.zeros(0, np.int64)
        try:
            sub = source.rows_of("train", needed)  # decodes only the images shown
        except Exception as exc:  # any error: the report says why these figures were skipped
            s.skipped = (f"the score table's ids do not match the data source "
                         f"{self.opts.data or self.run.data!r} ({exc})")
            return
        pos = {int(i): k for k, i in enumerate(sub.sample_id)}
        for col, pc in picks.items():
            imgs = {c: ([sub.image[pos[int(i)]] for i in lo], [sub.image[pos[int(i)]] for i in hi])
                    for c, (lo, hi) in pc.items()}
            self.figure(s, f"images_{col}", F.extremes_grid(imgs, names, col, per),
                        f"{col}: per class (rows), the {per} training images with the lowest score (left, lowest "
                        f"first) and the {per} with the highest (right, highest first). Images from "
                        f"{self.opts.data or self.run.data!r}.{note}")
        if not picks:
            s.skipped = "every score is NaN"


# ---------------------------------------------------------------- tables

CORRELATION_FIRST = ("gradnorm_init", "input_norm")  # Kirsch (2023)'s pair leads the table


def spearman(values: pd.DataFrame, labels: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Spearman ρ between every pair of columns of ``values`` (ranks with ties averaged, pairs
    where both are finite). With ``labels``, the mean over classes of the within-class ρ
    (classes where it is undefined, e.g. a constant column, left out)."""
    values = values.replace([np.inf, -np.inf], np.nan)
    if labels is None:
        return values.corr(method="spearman", min_periods=3)
    per = [g.corr(method="spearman", min_periods=3) for _, g in values.groupby(labels)]
    return pd.concat(per).groupby(level=0, sort=False).mean().loc[values.columns, values.columns]


def correlation_table(overall: pd.DataFrame, within: pd.DataFrame) -> str:
    cols = list(overall.columns)
    rows = []
    for i, a in enumerate(cols):
        cells = [a]
        for j, b in enumerate(cols):
            v = 1.0 if i == j else (overall if j > i else within).loc[a, b]
            cells.append("–" if not np.isfinite(v) else f"{v:.3f}")
        rows.append(cells)
    return _table(["ρ (upper: all samples; lower: within class)", *cols], rows, 1)


def _fmt(m: float, s: float, n: int, digits: int = 4) -> str:
    if n == 0 or not np.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], num_from: int) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td class='{'num' if i >= num_from else ''}'>{html.escape(str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _varying(df: pd.DataFrame, cols: Sequence[str]) -> List[str]:
    return [c for c in cols if df[c].nunique(dropna=False) > 1]


def accuracy_table(df: pd.DataFrame) -> str:
    extra = _varying(df, ["variant", "curvature_lambda"])
    keys = ["label", *extra, "fraction"]
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        m, s, n = F.mean_std(g["test_accuracy"])
        size = g["train_size"].dropna()
        rows.append((key, [*key[:-1], f"{key[-1]:.2f}", _fmt(m, s, n), str(n),
                           f"{size.mean():.0f}" if len(size) else "–"]))
    rows.sort(key=lambda r: (r[0][0] != "full", tuple(map(str, r[0][1:-1])), r[0][0], r[0][-1]))
    header = ["selection", *[{"variant": "variant", "curvature_lambda": "λ"}[c] for c in extra], "fraction",
              "test accuracy (mean ± std)", "seeds", "train size"]
    body = [[f"{c:g}" if isinstance(c, float) else c for c in r[1]] for r in rows]
    return _table(header, body, len(keys))


def geometry_table(df: pd.DataFrame) -> str:
    pgd = [c for c in pgd_columns(df) if np.isfinite(df[c]).any()]
    extra = _varying(df, ["label", "fraction", "curvature_lambda"])
    keys = ["variant", "gradreg", *extra]
    rows = []
    for key, g in df.groupby(keys, dropna=False):
        cells = [*key]
        for col in ("test_accuracy", *GEOMETRY, *pgd):
            cells.append(_fmt(*F.mean_std(g[col]), digits=3 if col in GEOMETRY else 4))
        cells.append(str(len(g)))
        rows.append([f"{c:g}" if isinstance(c, float) else c for c in cells])
    names = {"label": "selection", "fraction": "fraction", "curvature_lambda": "λ"}
    header = ["variant", "GradReg", *[names[c] for c in extra], "test accuracy", "E‖∇f‖", "E‖∇²f‖", "E C_f",
              *[f"PGD ε={c[4:]}" for c in pgd], "runs"]
    return _table(header, rows, len(keys))


def ks_table(v, labels, ids, classes, names, geda, others) -> str:
    """KS distance per class between the class and each subset at the GEDA fraction."""
    mans = [geda, *sorted(others, key=lambda m: (m.label, m.seed))]
    seen, cols = set(), []
    for m in mans:  # one column per selection label (its lowest seed)
        if m.label not in seen:
            seen.add(m.label)
            cols.append(m)
    chosen = [np.isin(ids, m.ids) for m in cols]
    rows = []
    for c in classes:
        in_c = labels == c
        rows.append([names[c], str(int(in_c.sum())), str(int((in_c & chosen[0]).sum())),
                     *[f"{F.ks_distance(v[in_c], v[in_c & ch]):.4f}" for ch in chosen]])
    means = [np.nanmean([F.ks_distance(v[labels == c], v[(labels == c) & ch]) for c in classes]) for ch in chosen]
    rows.append(["mean", "", "", *[f"{x:.4f}" for x in means]])
    return _table(["class", "class size", "GEDA subset", *[f"KS {m.label}" for m in cols]], rows, 1)


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1280px;
padding:16px 28px;color:#222;background:#fff;line-height:1.45}
h1{font-size:1.6em;margin:.3em 0}h2{font-size:1.25em;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.8em}
.meta td{padding:1px 14px 1px 0}.meta td:first-child{color:#666}
figure{margin:14px 0 22px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;max-width:1000px}
table.t,table{border-collapse:collapse;font-size:.88em;margin:8px 0 18px}
th,td{border:1px solid #ddd;padding:3px 9px;text-align:left}th{background:#f3f3f3}td.num{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap}tbody tr:nth-child(even){background:#fafafa}
.skipped{color:#8a5a00;background:#fff8e6;border-left:4px solid #f0b429;padding:6px 12px}
.note{color:#666;font-size:.9em}ul.toc{columns:2}
"""


def render_html(run: Run, sections: List[Section], folder: Path, elapsed: float) -> str:
    e = html.escape
    meta = [("run", f"{run.kind} run {run.name}"), ("directory", str(run.root.resolve()))]
    if run.data:
        meta.append(("data", run.data))
    if run.model:
        meta.append(("model", run.model))
    if run.results is not None:
        df = run.results
        meta.append(("training runs", f"{len(df)} ({df['label'].nunique()} selection(s), "
                                      f"{df['fraction'].nunique()} fraction(s), {df['seed'].nunique()} seed(s))"))
    if run.scores is not None:
        from engine.artifacts import score_columns

        meta.append(("score table", f"{run.scores.num_rows} rows; columns {', '.join(score_columns(run.scores))}"))
    if run.manifests:
        meta.append(("manifests", str(len(run.manifests))))
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>Winnow report: {e(run.name)}</title><style>{CSS}</style></head><body>",
           f"<h1>Winnow report: {e(run.name)}</h1><table class='meta'>"]
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in meta]
    out.append("</table>")
    drawn = [s for s in sections if not s.skipped]
    skipped = [s for s in sections if s.skipped]
    out.append("<ul class='toc'>" + "".join(f"<li><a href='#{s.key}'>{e(s.title)}</a></li>" for s in drawn) + "</ul>")
    if skipped:
        out.append("<div class='skipped'><b>Skipped sections</b><ul>" +
                   "".join(f"<li><a href='#{s.key}'>{e(s.title)}</a>: {e(s.skipped)}</li>" for s in skipped) +
                   "</ul></div>")
    if run.notes:
        out.append("<div class='skipped'><b>Unreadable artifacts (left out)</b><ul>" +
                   "".join(f"<li>{e(n)}</li>" for n in run.notes) + "</ul></div>")
    for s in sections:
        out.append(f"<h2 id='{s.key}'>{e(s.title)}</h2>")
        if s.skipped:
            out.append(f"<p class='skipped'>Skipped: {e(s.skipped)}</p>")
        for block in s.blocks:
            if block[0] == "fig":
                data = base64.b64encode((folder / block[1]).read_bytes()).decode("ascii")
                out.append(f"<figure><img alt='{e(block[1])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(block[2])} <span class='note'>({e(block[1])})</span></figcaption>"
                           f"</figure>")
            elif block[0] == "html":
                out.append(block[1])
            else:
                out.append(f"<p>{e(block[1])}</p>")
    out.append(f"<p class='note'>Generated by jobs.report in {elapsed:.1f}s.</p></body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------- entry point


def build_report(path: str | Path, out: Optional[str | Path] = None, data: Optional[str] = None,
                 columns: Optional[Sequence[str]] = None, per_class: int = 8) -> Path:
    """Write ``<out>/report/report.html`` and its PNGs (``out`` defaults to ``path``);
    returns the report.html path. The report directory is replaced in one rename."""
    t0 = time.time()
    if per_class < 1:
        raise ConfigError(f"--per-class must be at least 1, got {per_class}")
    run = discover(path)
    report_dir = Path(out if out is not None else path) / "report"
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"{str(report_dir)!r} exists and is not a directory")
    from engine.storage import check_output

    check_output(report_dir.parent, "--out" if out is not None else "the run directory")
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.", suffix=".tmp", dir=report_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        b = Builder(run, Options(data, columns, per_class), tmp)
        b.score_columns()  # a bad --columns fails before any drawing
        for step in (b.accuracy, b.cost, b.lambda_curve, b.geometry, b.distributions, b.correlations, b.geda,
                     b.images):
            step()
        for sec in b.sections:  # a section that ended up with notes only counts as skipped
            if not sec.skipped and not any(k in ("fig", "html") for k, *_ in sec.blocks):
                sec.skipped = " ".join(text for _, text in sec.blocks) or "nothing to draw"
                sec.blocks = []
        page = render_html(run, b.sections, tmp, time.time() - t0)
        (tmp / "report.html").write_text(page, encoding="utf-8")
        _replace_dir(tmp, report_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _WRITE_ERRNOS:  # the disk filled up or the directory was locked under the job
            from engine.errors import WriteFailedError

            raise WriteFailedError(f"cannot write the report under {report_dir.parent}: {e.strerror}; nothing "
                                   f"was written") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report_dir / "report.html"


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; an existing ``target`` is moved aside first and then removed,
    so ``target`` is always either the old complete report or the new one (or absent)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
