"""jobs.report: a self-contained HTML report from a sweep / score run directory (no Ray).

The sweep fixture is built from real artifacts (engine.artifacts, the real selectors,
jobs.sweep's results writer) over fashion-mnist-mini's training ids and labels, with random
score columns. The rendered page is checked in headless Chromium when it is installed.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine import artifacts

FRACTIONS = (0.3, 0.5)
SEEDS = (0, 1, 2)
LAMBDAS = (0.0, 0.1)
VARIANTS = {"standard": 0.0, "lcnn": 0.01}   # variant -> gradreg
TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)


def _scores(path: Path) -> tuple:
    from engine.data import load_source

    split = load_source("fashion-mnist-mini").arrays("train")
    rng = np.random.default_rng(0)
    n, y = len(split), split.label.astype(np.int64)
    cols = {"sample_id": pa.array(split.sample_id.astype(np.int64)), "label": pa.array(y)}
    for name, shift in (("el2n", 0.08), ("gradnorm_init", 0.3), ("curvature", 0.02)):
        v = rng.gamma(2.0, 0.2, n) + shift * y
        cols[name] = pa.array(v.astype(np.float32))
        cols[f"{name}_std"] = pa.array((0.1 * v).astype(np.float32))
    # the input norm tracks gradnorm_init through ranks, with noise and ties (Kirsch 2023's pair)
    norm = np.round(np.log(cols["gradnorm_init"].to_numpy()) + rng.normal(0, 0.3, n), 1)
    cols["input_norm"] = pa.array(norm.astype(np.float32))
    curv = cols["curvature"].to_numpy().copy()
    curv[:5] = np.nan  # the report must cope with NaN scores
    cols["curvature"] = pa.array(curv)
    artifacts.write_table(path, pa.table(cols), {"kind": "scores", "data": "fashion-mnist-mini", "model": "small-cnn",
                                                 "config": {"data": "fashion-mnist-mini"}})
    return split.sample_id, y, {k: cols[k].to_numpy() for k in ("el2n", "gradnorm_init", "curvature")}


def _manifests(folder: Path, ids, labels, scores) -> dict:
    from engine.select import SELECTORS

    out = {}
    for sel, column in (("random", None), ("topk", "el2n"), ("geda", "gradnorm_init")):
        label = f"{sel}:{column}" if column and sel != "random" else sel
        for frac in FRACTIONS:
            for seed in SEEDS:
                values = None if column is None else scores[column]
                s = SELECTORS[sel](values, labels, frac, seed=seed)
                name = f"{label.replace(':', '-')}-f{frac:g}-s{seed}.parquet"
                artifacts.write_manifest(folder / name, ids[s.index], s.weight,
                                         {"kind": "manifest", "selector": sel, "fraction": frac, "column": column,
                                          "seed": seed, "info": s.info})
                out[(label, frac, seed)] = f"manifests/{name}"
    return out


def _results(out: Path, manifests: dict) -> None:
    from engine.sweep.results import write_results

    rng = np.random.default_rng(1)
    rows = []
    base = {"random": -0.02, "topk:el2n": -0.05, "geda:gradnorm_init": -0.01}
    for variant, gradreg in VARIANTS.items():
        for lam in LAMBDAS:
            for seed in SEEDS:
                for label, frac in [("full", 1.0)] + [(lab, f) for lab in base for f in FRACTIONS]:
                    acc = 0.80 + (0 if label == "full" else base[label] - 0.15 * (0.5 - frac)) - 0.03 * lam \
                        - (0.02 if variant == "lcnn" else 0) + rng.normal(0, 0.005)
                    selector, _, column = label.partition(":")
                    geo = variant == "lcnn" or label == "full"
                    rows.append({
                        "trial_id": f"{label}-{frac}-{seed}-{lam}-{variant}", "selector": selector,
                        "column": column or None, "label": label, "fraction": frac, "seed": seed,
                        "curvature_lambda": lam, "gradreg": gradreg, "model_options": "{}", "variant": variant,
                        "budget": "epochs", "test_accuracy": acc, "train_size": int(6000 * frac), "steps": 100,
                        "samples_seen": int(6000 * frac) * 4, "train_time_s": 10.0 * frac, "wall_time_s": 2.0,
                        "selection_time_s": 0.0 if label == "full" else 3.0,
                        "cost_s": 10.0 * frac + (0.0 if label == "full" else 3.0),
                        "grad_norm": rng.uniform(1, 2) if geo else np.nan,
                        "hessian_norm": rng.uniform(5, 9) if geo else np.nan,
                        "normalized_curvature": (rng.uniform(3, 4) - 5 * lam) if geo else np.nan,
                        "manifest": None if label == "full" else manifests[(label, frac, seed)],
                        "trial_dir": f"trials/{label}", **({"pgd_0.1": acc - 0.1, "pgd_0.2": acc - 0.3} if geo else {}),
                    })
    write_results(rows, out)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    (out / "scores").mkdir()
    (out / "manifests").mkdir()
    ids, labels, scores = _scores(out / "scores" / "scores.parquet")
    manifests = _manifests(out / "manifests", ids, labels, scores)
    _results(out, manifests)
    artifacts.write_json(out / "sweep.json", {"name": "fake", "data": "fashion-mnist-mini", "model": "small-cnn",
                                              "scores": "scores/scores.parquet", "complete": True})
    return out


@pytest.fixture(scope="module")
def report(sweep_dir) -> Path:
    from jobs import report as job
    from jobs._cli import run

    assert run("jobs.report", job.main, [str(sweep_dir), "--per-class", "6"]) == 0
    return sweep_dir / "report" / "report.html"


def _png_ok(data: bytes) -> None:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.var() > 100, "blank image"


def test_report_files(report: Path):
    assert report.is_file()
    page = report.read_text()
    assert not re.search(r"https?:", page), "the report must not reference any URL"
    assert "<link" not in page and "<script" not in page
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(embedded) >= 5
    for b64 in embedded:
        _png_ok(base64.b64decode(b64))
    pngs = sorted(report.parent.glob("*.png"))
    assert len(pngs) == len(embedded)
    for p in pngs:
        _png_ok(p.read_bytes())
    names = {p.name for p in pngs}
    assert {"accuracy_vs_fraction.png", "accuracy_vs_cost.png", "lambda_curve.png", "geda_ecdf_gradnorm_init.png",
            "hist_el2n.png", "curves_curvature.png", "images_gradnorm_init.png"} <= names
    assert "Test accuracy vs what the run cost" in page
    assert "Rank correlation between scores" in page
    for needle in ("LCNN geometry", "E C_f", "PGD ε=0.1", "KS geda:gradnorm_init", "KS topk:el2n", "Trouser"):
        assert needle in page, needle
    assert "Skipped sections" not in page  # every input exists
    assert not list(report.parent.parent.glob(".report.*"))  # no temp dir left behind


def test_report_rerun_replaces(sweep_dir, tmp_path, capsys):
    from jobs import report as job
    from jobs._cli import run

    argv = [str(sweep_dir), "--out", str(tmp_path), "--per-class", "1", "--columns"]
    assert run("jobs.report", job.main, argv + ["el2n,curvature"]) == 0
    report = tmp_path / "report" / "report.html"
    assert capsys.readouterr().out.strip() == str(report)
    stale = report.parent / "stale.png"
    stale.write_bytes(b"x")
    assert run("jobs.report", job.main, argv + ["el2n"]) == 0
    assert not stale.exists() and report.is_file()
    assert (report.parent / "hist_el2n.png").is_file() and not (report.parent / "hist_curvature.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_chromium(report: Path, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must render the report")
        pytest.skip("chromium is not installed (apt-get install chromium); the rendering check needs it")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,4000",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", report.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), "chromium wrote no screenshot"
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert img.shape[:2] == (4000, 1280)

    def near(rgb, tol=40):
        return int((np.abs(img - np.array(rgb)).max(axis=2) <= tol).sum())

    assert near(TAB_BLUE) > 3000, "too few tab:blue pixels: the plots are not drawn"
    assert near(TAB_ORANGE) > 3000, "too few tab:orange pixels: the plots are not drawn"
    assert (img.reshape(-1, 3) < 250).any(axis=1).mean() > 0.05  # not a blank page


def test_missing_dir_exits_2(tmp_path, run_job):
    from jobs import report as job

    code, out, err = run_job(job, [tmp_path / "nope"])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("jobs.report: error:") and "no such directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_job(job, [empty])
    assert code == 2 and err.count("\n") == 1 and "nothing a report can use" in err
    assert not (empty / "report").exists()


def test_unknown_column_exits_2(sweep_dir, run_job, tmp_path):
    from jobs import report as job

    code, _, err = run_job(job, [sweep_dir, "--columns", "nope", "--out", tmp_path])
    assert code == 2 and "--columns ['nope']" in err and err.count("\n") == 1
    assert not (tmp_path / "report").exists() and not list(tmp_path.iterdir())


def test_scores_only_run(sweep_dir, tmp_path, run_job):
    from jobs import report as job

    run_dir = tmp_path / "score"
    run_dir.mkdir()
    shutil.copy(sweep_dir / "scores" / "scores.parquet", run_dir / "scores.parquet")
    code, out, err = run_job(job, [run_dir, "--columns", "el2n,curvature", "--per-class", "3"])
    assert code == 0, err
    page = (run_dir / "report" / "report.html").read_text()
    names = {p.name for p in (run_dir / "report").glob("*.png")}
    assert names == {"hist_el2n.png", "curves_el2n.png", "hist_curvature.png", "curves_curvature.png",
                     "images_el2n.png", "images_curvature.png"}
    assert "Skipped sections" in page
    for why in ("no finished training run", "no GEDA manifest"):
        assert why in page
    assert "5 non-finite value(s)" in page


def test_scores_only_without_data(sweep_dir, tmp_path, run_job):
    from jobs import report as job

    run_dir = tmp_path / "score"
    run_dir.mkdir()
    shutil.copy(sweep_dir / "scores" / "scores.parquet", run_dir / "scores.parquet")
    code, _, err = run_job(job, [run_dir, "--columns", "el2n", "--data", "parquet:/nonexistent.parquet"])
    assert code == 0, err
    page = (run_dir / "report" / "report.html").read_text()
    assert "Lowest- and highest-scoring" in page and "could not be loaded" in page
    assert (run_dir / "report" / "hist_el2n.png").is_file()


def test_pipeline_run_single_seed(sweep_dir, tmp_path, run_job):
    """A jobs.pipeline layout: one seed, one fraction, labels from the manifests' metadata."""
    from jobs import report as job

    run_dir = tmp_path / "pipe"
    (run_dir / "score").mkdir(parents=True)
    (run_dir / "select").mkdir()
    shutil.copy(sweep_dir / "scores" / "scores.parquet", run_dir / "score" / "scores.parquet")
    runs = {"full": None}
    for name in ("random-f0.3-s0.parquet", "topk-el2n-f0.3-s0.parquet"):
        shutil.copy(sweep_dir / "manifests" / name, run_dir / "select" / name)
        runs[Path(name).stem] = f"elsewhere/{name}"  # jobs.pipeline records the path it was given
    for i, (tag, manifest) in enumerate(runs.items()):
        artifacts.write_json(run_dir / "train" / tag / "metrics.json", {
            "test_accuracy": 0.7 + 0.01 * i, "train_size": 1800, "data": "fashion-mnist-mini", "model_options": {},
            "config": {"data": "fashion-mnist-mini", "model": "small-cnn", "manifest": manifest, "seed": 0},
            "geometry": {"grad_norm": 1.0, "hessian_norm": 2.0, "normalized_curvature": 3.0 + i},
            "robust_accuracy": {"0": 0.7, "0.1": 0.5}})
    code, out, err = run_job(job, [run_dir, "--columns", "el2n", "--per-class", "2"])
    assert code == 0, err
    page = (run_dir / "report" / "report.html").read_text()
    names = {p.name for p in (run_dir / "report").glob("*.png")}
    assert {"accuracy_vs_fraction.png", "hist_el2n.png", "images_el2n.png"} <= names
    assert "topk:el2n" in page and "PGD ε=0.1" in page
    assert "a single curvature λ" in page and "no GEDA manifest" in page


def test_failed_rebuild_keeps_old_report(sweep_dir, tmp_path, monkeypatch, run_job):
    from engine.report import figures
    from jobs import report as job

    out = tmp_path / "o"
    assert run_job(job, [sweep_dir, "--out", out, "--columns", "el2n", "--per-class", "1"])[0] == 0
    before = (out / "report" / "report.html").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("crash while drawing")

    monkeypatch.setattr(figures, "class_hist", boom)
    with pytest.raises(RuntimeError, match="crash while drawing"):
        run_job(job, [sweep_dir, "--out", out, "--columns", "el2n", "--per-class", "1"])
    assert (out / "report" / "report.html").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["report"]  # no temp directory left behind


def test_correlations_match_scipy(sweep_dir, report):
    """The correlation section's ρ (all samples and within class) is scipy's Spearman on the
    score table, NaN rows dropped pairwise; GraNd at init against input norm is stated first."""
    from scipy.stats import spearmanr

    from engine.report.build import spearman

    table = artifacts.read_table(sweep_dir / "scores" / "scores.parquet", "scores")[0]
    labels = table.column("label").to_numpy()
    cols = ["gradnorm_init", "input_norm", "el2n", "curvature"]
    values = {c: np.asarray(table.column(c).to_numpy(), dtype=float) for c in cols}

    def rho(a, b, rows=slice(None)):
        x, y = values[a][rows], values[b][rows]
        ok = np.isfinite(x) & np.isfinite(y)
        return spearmanr(x[ok], y[ok]).statistic

    import pandas as pd

    overall, within = spearman(pd.DataFrame(values)), spearman(pd.DataFrame(values), labels)
    for a in cols:
        for b in cols:
            assert overall.loc[a, b] == pytest.approx(rho(a, b), abs=1e-12)
            per = [rho(a, b, labels == c) for c in np.unique(labels)]
            assert within.loc[a, b] == pytest.approx(np.mean(per), abs=1e-12)
    assert 0.5 < overall.loc["gradnorm_init", "input_norm"] < 0.99  # ties and noise: not a perfect match
    page = report.read_text()
    section = page[page.index("id='correlations'"):page.index("id='geda'")]
    assert f"Spearman ρ = {overall.loc['gradnorm_init', 'input_norm']:.3f} over all samples" in section
    header = re.findall(r"<th>([^<]*)</th>", section)
    assert header[1:] == cols  # Kirsch's pair first, then the table's order
    assert f"{overall.loc['el2n', 'curvature']:.3f}" in section


def test_a_long_legend_stays_inside_the_figure():
    """14 long selection labels (a study's report): the legend under the accuracy figure is
    laid out in as many columns as fit, inside the figure's left and right edges."""
    import pandas as pd

    from engine.report import figures as F

    labels = [f"geda:gradnorm_init R={r} warm full:{w}" for r in (1, 5, 20) for w in (2, 3, 4, 5)][:14]
    rows = [{"label": lab, "fraction": f, "seed": s, "variant": "standard", "curvature_lambda": 0.0,
             "test_accuracy": 0.8 + 0.01 * i + 0.05 * f + 0.001 * s}
            for i, lab in enumerate(["full", *labels]) for f in ((1.0,) if lab == "full" else (0.1, 0.3)) for s in (0, 1)]
    fig = F.accuracy_vs_fraction(pd.DataFrame(rows))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    legend = fig.legends[0].get_window_extent(canvas.get_renderer())
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.x1, (legend, fig.bbox)
    assert F.legend_columns(labels, 7.0) < 4 and F.legend_columns(["random", "geda"], 7.0) == 4
