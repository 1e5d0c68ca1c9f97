"""Hostile and careless inputs, one table: each is refused with one line naming what is wrong
(no traceback, no colour codes), exit status 2, before any work, with nothing written.

A row: (case id, job, argv, expected message fragment, setup, patch): ``setup(tmp)`` writes the
row's input files first, ``patch(monkeypatch)`` changes the machine (a full disk). In argv
``{tmp}`` is the test's directory and ``{scores}`` a valid score table in it;
every job writes to ``{tmp}/out`` (or ``{tmp}/out.parquet``) unless the row says otherwise, and
neither may exist afterwards, nor may any input file change.
"""
from __future__ import annotations

import errno
import hashlib
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine import artifacts
from jobs import pipeline, report, score, select, sweep, train

JOBS = {"score": score, "select": select, "train": train, "pipeline": pipeline, "sweep": sweep,
        "report": report}
SEL = ["--scores", "{scores}", "--fraction", "0.5", "--out", "{tmp}/out.parquet"]
SMOKE = """name: hostile
data: fashion-mnist-mini
score: {{scores: [el2n], seeds: 1, epochs: 1}}
train: {{epochs: 1}}
param_space: {{selector: [full, "topk:el2n"], fraction: [0.3], seed: [0]}}
{extra}
"""


def yaml_case(extra: str, replace: tuple = ("", "")):
    def setup(tmp: Path) -> None:
        (tmp / "sweep.yaml").write_text(SMOKE.format(extra=extra).replace(*replace))
    return setup


def table_file(name: str, **cols):
    """A Parquet file of the given columns (pyarrow arrays or lists) at ``tmp/name``."""
    def setup(tmp: Path) -> None:
        import pyarrow.parquet as pq

        pq.write_table(pa.table(cols), str(tmp / name))
    return setup


def scores_with(**cols):
    base = {"sample_id": pa.array(np.arange(6, dtype=np.int64)), "label": pa.array(np.arange(6) % 2),
            "el2n": pa.array(np.linspace(0, 1, 6, dtype=np.float32))}
    return table_file("bad.parquet", **{**base, **cols})


def parquet_source(label, ids=None):
    """A Parquet source of 8 x 8 gray PNGs with these labels (and ids: 0, 1, ... by default)."""
    def setup(tmp: Path) -> None:
        from engine.data.files import write_parquet_source

        lab = np.asarray(label, np.int64)
        img = np.random.default_rng(0).integers(0, 255, (len(lab), 8, 8, 1), dtype=np.uint8)
        write_parquet_source(tmp / "src.parquet", img, lab, sample_id=np.arange(len(lab)) if ids is None else ids)
    return setup


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 70-byte PNG whose header declares ``width`` x ``height`` pixels (30 GB as RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def image_folder(bomb: bool = False, empty_class: bool = False):
    """A folder of two classes of 16 x 16 PNGs; the first image a decompression bomb, or a
    third class folder with no image."""
    def setup(tmp: Path) -> None:
        from PIL import Image

        rng = np.random.default_rng(0)
        for c in ("a", "b"):
            for i in range(4):
                (tmp / "imgs" / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp / "imgs" / c / f"{i}.png")
        if bomb:
            (tmp / "imgs" / "a" / "0.png").write_bytes(png_bomb())
        if empty_class:
            (tmp / "imgs" / "c").mkdir()
    return setup


def full_disk(monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))


def disk_fills_while_writing(monkeypatch):
    """The free-space check passes, then the disk is full when the artifact is written."""
    import os

    from engine import artifacts as arts

    real = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(arts.os, "fdopen", lambda fd, mode="r", *a, **k: Full(real(fd, mode, *a, **k)))


CASES = [
    # --------------------------------------------------- numbers: NaN, inf, negative, fractional
    ("train-lr-nan", "train", ["--lr", "nan"], "lr must be a finite number, got nan", None, None),
    ("train-lr-inf", "train", ["--lr", "inf"], "lr must be a finite number, got inf", None, None),
    ("train-momentum-nan", "train", ["--momentum", "nan"], "momentum must be a finite number", None, None),
    ("train-seed-negative", "train", ["--seed", "-1"], "seed must be 0 or more, got -1", None, None),
    ("train-curvature-eps-nan", "train", ["--curvature-eps", "nan"], "curvature_eps must be a finite number",
     None, None),
    ("train-lambda-inf", "train", ["--curvature-lambda", "inf"], "curvature_lambda must be a finite number",
     None, None),
    ("train-pgd-eps-inf", "train", ["--pgd-eps", "0.1,inf"], "pgd_eps[1] must be a finite number", None, None),
    ("train-epochs-fraction", "train", ["--epochs", "2.5"], "invalid int value: '2.5'", None, None),
    ("train-cpus-nan", "train", ["--cpus-per-worker", "nan"], "cpus_per_worker must be a finite number",
     None, None),
    ("score-lr-nan", "score", ["--lr", "nan"], "lr must be a finite number, got nan", None, None),
    ("score-cpus-inf", "score", ["--cpus-per-actor", "inf"], "cpus_per_actor must be a finite number",
     None, None),
    ("score-embeddings-negative", "score", ["--embeddings", "-3"], "embedding_dim must be 0 (none) or more",
     None, None),
    ("select-seed-negative", "select", [*SEL, "--selector", "random", "--seed", "-1"],
     "random parameter seed must be >= 0, got -1", None, None),
    ("select-time-limit-negative", "select", [*SEL, "--selector", "geda", "--time-limit", "-1"],
     "geda parameter time_limit must be > 0, got -1.0", None, None),
    ("select-time-limit-nan", "select", [*SEL, "--selector", "geda", "--time-limit", "nan"],
     "geda parameter time_limit must be a finite number, got nan", None, None),
    ("select-nodes-1", "select", [*SEL, "--selector", "geda", "--nodes", "1"],
     "geda parameter nodes must be >= 2, got 1", None, None),
    ("select-lam-nan", "select", [*SEL, "--selector", "gradmatch", "--lam", "nan"],
     "gradmatch parameter lam must be a finite number, got nan", None, None),
    ("select-tol-inf", "select", [*SEL, "--selector", "gradmatch", "--tol", "inf"],
     "gradmatch parameter tol must be a finite number", None, None),
    ("select-offset-nan", "select", [*SEL, "--selector", "topk", "--column", "el2n", "--offset", "nan"],
     "topk parameter offset must be a finite number", None, None),
    ("select-fraction-nan", "select", [*SEL, "--selector", "random", "--fraction", "nan"],
     "fraction must be in (0, 1], got nan", None, None),
    ("select-quantiles-0", "select", [*SEL, "--selector", "random_quantile", "--column", "el2n", "--quantiles",
                                      "0"], "random_quantile parameter quantiles must be >= 1, got 0", None, None),
    # --------------------------------------------------- score parameters by declared type and range
    ("score-params-abc", "score", ["--score-params", "nc.iters=abc"],
     "--score-params nc.iters must be an integer, got 'abc'", None, None),
    ("score-params-fractional", "score", ["--score-params", "nc.iters=2.5"],
     "--score-params nc.iters must be an integer, got 2.5", None, None),
    ("score-params-eps-negative", "score", ["--score-params", "curvature.eps=-1"],
     "--score-params curvature.eps must be > 0, got -1.0", None, None),
    ("score-params-eps-nan", "score", ["--score-params", "curvature.eps=nan"],
     "--score-params curvature.eps must be a finite number, got nan", None, None),
    ("score-params-hvp", "score", ["--score-params", "nc.hvp=fast"], "--score-params nc.hvp must be one of fd, exact",
     None, None),
    ("score-params-draws-0", "score", ["--score-params", "curvature.draws=0"],
     "--score-params curvature.draws must be >= 1, got 0", None, None),
    ("score-params-tf32", "score", ["--score-params", "curvature.tf32=1"],
     "--score-params curvature.tf32 must be true or false, got 1", None, None),
    # --------------------------------------------------- outputs: writable, not an input, space
    ("select-out-is-scores", "select", ["--scores", "{scores}", "--fraction", "0.5", "--selector", "random",
                                        "--out", "{scores}"], "is also an input of this command", None, None),
    ("select-out-is-embeddings", "select", ["--scores", "{scores}", "--fraction", "0.5", "--selector", "craig",
                                            "--out", "{tmp}/embeddings.parquet"],
     "is also an input of this command", None, None),
    ("select-out-unwritable", "select", ["--scores", "{scores}", "--fraction", "0.5", "--selector", "random",
                                         "--out", "/sys/winnow-hostile/m.parquet"], "cannot write in /sys", None, None),
    ("select-out-below-a-file", "select", ["--scores", "{scores}", "--fraction", "0.5", "--selector", "random",
                                           "--out", "{scores}/m.parquet"], "is a file, so nothing can be created",
     None, None),
    ("select-disk-full", "select", [*SEL, "--selector", "random"], "MiB free on the disk of", None, full_disk),
    ("select-disk-fills", "select", [*SEL, "--selector", "random"], "No space left on device; nothing was written",
     None, disk_fills_while_writing),
    ("score-out-unwritable", "score", ["--out", "/sys/winnow-hostile"], "cannot write in /sys", None, None),
    ("score-disk-full", "score", [], "MiB free on the disk of", None, full_disk),
    ("train-out-unwritable", "train", ["--out", "/sys/winnow-hostile"], "cannot write in /sys", None, None),
    ("train-checkpoint-storage-scheme", "train", ["--checkpoint-storage", "bogus://x"],
     "unknown filesystem scheme 'bogus://'", None, None),
    ("train-checkpoint-storage-unwritable", "train", ["--checkpoint-storage", "/sys/winnow-ckpt"],
     "cannot write in /sys", None, None),
    ("report-out-unwritable", "report", ["{tmp}", "--out", "/sys/winnow-hostile"], "cannot write in /sys",
     None, None),
    ("pipeline-out-unwritable", "pipeline", ["--out", "/sys/winnow-hostile"], "cannot write in /sys", None, None),
    ("pipeline-selector-without-column", "pipeline", ["--selectors", "random,topk"],
     "topk ranks by a score column: write topk:COLUMN", None, None),
    # --------------------------------------------------- sweep YAML: every section typed before anything runs
    ("sweep-asha-list", "sweep", [], "asha must be null or a mapping", yaml_case("asha: [1, 2]"), None),
    ("sweep-asha-grace-abc", "sweep", [], "asha.grace_period must be an integer, got 'abc'",
     yaml_case("asha: {grace_period: abc}"), None),
    ("sweep-asha-reduction-1", "sweep", [], "asha.reduction_factor must be > 1",
     yaml_case("asha: {reduction_factor: 1}"), None),
    ("sweep-train-epochs-fraction", "sweep", ["--set", "train.epochs=2.5"], "epochs must be an integer, got 2.5",
     yaml_case(""), None),
    ("sweep-train-lr-nan", "sweep", ["--set", "train.lr=.nan"], "lr must be a finite number, got nan",
     yaml_case(""), None),
    ("sweep-score-params-abc", "sweep", [], "--score-params nc.iters must be an integer",
     yaml_case("", ("seeds: 1,", "seeds: 1, score_params: {nc: {iters: abc}},")), None),
    ("sweep-seed-abc", "sweep", ["--set", "param_space.seed=[abc]"], "param_space.seed[0] must be an integer",
     yaml_case(""), None),
    ("sweep-seed-negative", "sweep", ["--set", "param_space.seed=[-1]"], "param_space.seed[0] must be >= 0",
     yaml_case(""), None),
    ("sweep-lambda-abc", "sweep", ["--set", "param_space.curvature_lambda=[abc]"],
     "param_space.curvature_lambda[0] must be a finite number", yaml_case(""), None),
    ("sweep-fraction-abc", "sweep", ["--set", "param_space.fraction=[abc]"],
     "param_space.fraction[0]: expected a number in (0, 1]", yaml_case(""), None),
    ("sweep-cpus-abc", "sweep", [], "resources.cpus_per_trial must be a finite number",
     yaml_case("resources: {cpus_per_trial: abc}"), None),
    ("sweep-workers-fraction", "sweep", [], "resources.workers_per_trial must be an integer",
     yaml_case("resources: {workers_per_trial: 1.5}"), None),
    ("sweep-selector-params-type", "sweep", [], "geda parameter nodes must be an integer, got 2.5",
     yaml_case("selector_params: {geda: {nodes: 2.5}}"), None),
    ("sweep-selector-params-unknown", "sweep", [], "selector 'topk' has no parameter 'nodes'",
     yaml_case("selector_params: {topk: {nodes: 3}}"), None),
    ("sweep-variant-lcnn-type", "sweep", ["--set", "param_space.variant=[l]"],
     "variants.l.lcnn must be true or false", yaml_case("variants: {l: {lcnn: yes please}}"), None),
    ("sweep-name-type", "sweep", ["--set", "description=[1]"], "description must be a string", yaml_case(""),
     None),
    ("sweep-out-unwritable", "sweep", ["--out", "/sys/winnow-hostile"], "cannot write in /sys", yaml_case(""),
     None),
    # --------------------------------------------------- data checked before anything is sized by it
    ("source-zero-rows", "score", ["--data", "parquet:{tmp}/src.parquet"], "no rows", parquet_source([]), None),
    ("source-label-1e9", "score", ["--data", "parquet:{tmp}/src.parquet"],
     "999,999,997 of its 1,000,000,000 classes have no sample", parquet_source([0, 1, 999_999_999, 1]), None),
    ("source-label-gap", "train", ["--data", "parquet:{tmp}/src.parquet"],
     "1 of its 4 classes have no sample, e.g. class 2", parquet_source([0, 1, 3, 1, 0, 3]), None),
    ("source-label-negative", "score", ["--data", "parquet:{tmp}/src.parquet"], "negative label -1",
     parquet_source([0, 1, -1, 1]), None),
    ("source-duplicate-ids", "score", ["--data", "parquet:{tmp}/src.parquet"], "duplicate sample_id 3",
     parquet_source([0, 1] * 20, ids=[*range(30), 3, *range(31, 40)]), None),
    ("source-duplicate-ids-train", "train", ["--data", "parquet:{tmp}/src.parquet"], "duplicate sample_id 3",
     parquet_source([0, 1] * 20, ids=[*range(30), 3, *range(31, 40)]), None),
    ("source-label-float", "score", ["--data", "parquet:{tmp}/f.parquet"], "column 'label' must be integer",
     table_file("f.parquet", image=pa.array([b"x"], pa.binary()), label=pa.array([1.7])), None),
    ("source-ids-strings", "score", ["--data", "parquet:{tmp}/f.parquet"],
     "column 'sample_id' must be integers without nulls",
     table_file("f.parquet", image=pa.array([b"x"], pa.binary()), label=pa.array([0]), sample_id=pa.array(["a"])),
     None),
    ("imagefolder-empty-class", "score", ["--data", "imagefolder:{tmp}/imgs"], "class folder 'c' has no images",
     image_folder(empty_class=True), None),
    ("imagefolder-decompression-bomb", "score", ["--data", "imagefolder:{tmp}/imgs"],
     "declares 10,000,000,000 pixels, above the limit of 89,478,485",
     image_folder(bomb=True), None),
    ("scores-label-negative", "select", ["--scores", "{tmp}/bad.parquet", "--selector", "random", "--fraction",
                                         "0.5", "--out", "{tmp}/out.parquet"],
     "column 'label' holds -1; values must be >= 0", scores_with(label=pa.array([0, 1, -1, 1, 0, 1])), None),
    ("scores-label-null", "select", ["--scores", "{tmp}/bad.parquet", "--selector", "random", "--fraction",
                                     "0.5", "--out", "{tmp}/out.parquet"],
     "column 'label' has 1 null value(s)", scores_with(label=pa.array([0, 1, None, 1, 0, 1])), None),
    ("scores-label-float", "select", ["--scores", "{tmp}/bad.parquet", "--selector", "random", "--fraction",
                                      "0.5", "--out", "{tmp}/out.parquet"],
     "column 'label' must hold integers, got double", scores_with(label=pa.array([0.0, 1.5, 0, 1, 0, 1])), None),
    ("scores-ids-strings", "select", ["--scores", "{tmp}/bad.parquet", "--selector", "random", "--fraction",
                                      "0.5", "--out", "{tmp}/out.parquet"],
     "column 'sample_id' must hold integers, got string", scores_with(sample_id=pa.array(list("abcdef"))), None),
    ("manifest-ids-strings", "train", ["--manifest", "{tmp}/bad.parquet"],
     "column 'sample_id' must hold integers, got string",
     table_file("bad.parquet", sample_id=pa.array(["a", "b"]), weight=pa.array([1.0, 1.0])), None),
    ("manifest-weights-strings", "train", ["--manifest", "{tmp}/bad.parquet"],
     "column 'weight' must hold numbers without nulls",
     table_file("bad.parquet", sample_id=pa.array([0, 7]), weight=pa.array(["1", "1"])), None),
]

COLOUR = re.compile(r"\x1b\[")


def test_case_ids_are_unique():
    assert len({c[0] for c in CASES}) == len(CASES)


def test_image_pixel_limit_is_configurable(tmp_path, monkeypatch):
    from engine.data.images import decode_rgb, max_image_pixels
    from engine.errors import ConfigError, DataError

    png = png_bomb(300, 200)
    monkeypatch.setenv("WINNOW_MAX_IMAGE_PIXELS", "50000")
    assert max_image_pixels() == 50_000
    with pytest.raises(DataError, match="declares 300 x 200 = 60,000 pixels, above the limit of 50,000"):
        decode_rgb(png, "x.png")
    monkeypatch.setenv("WINNOW_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="WINNOW_MAX_IMAGE_PIXELS must be a positive integer"):
        max_image_pixels()
    monkeypatch.delenv("WINNOW_MAX_IMAGE_PIXELS")
    assert max_image_pixels() == 89_478_485


def test_pipeline_scores_what_each_selector_reads():
    """--selectors geda used to fail after scoring (gradnorm_init was never computed) and take
    the finished scores with it; craig needs embeddings."""
    cfg = pipeline.config_from(["--selectors", "random,geda,craig,topk:forgetting"])
    score_cfg, selectors = cfg.score_config(), cfg.selections()
    assert dict(selectors) == {"random": None, "geda": "gradnorm_init", "craig": "grad_embedding",
                               "topk": "forgetting"}
    assert set(score_cfg.scores) == {"gradnorm_init", "forgetting"} and score_cfg.embedding_dim > 0


def test_ray_that_does_not_start_is_one_line_exit_1(run_job, tmp_path, monkeypatch):
    """ray.init timing out under load raised an empty ``Exception:``."""
    import ray

    def times_out(**kwargs):
        raise Exception()

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", times_out)
    code, _, err = run_job(train, ["--data", "digits", "--epochs", "1", "--out", tmp_path / "t"])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "could not start or reach a local Ray for this job (Exception: no message; the machine may be too " \
           "loaded" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def _fill(text: str, tmp: Path, scores: Path) -> str:
    return str(text).replace("{tmp}", str(tmp)).replace("{scores}", str(scores))


def _digest(paths) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.mark.parametrize("case, job, argv, fragment, setup, patch", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line(run_job, tmp_path, monkeypatch, case, job, argv, fragment, setup, patch):
    ids = np.arange(60, dtype=np.int64) * 7
    scores = tmp_path / "scores.parquet"
    artifacts.write_table(scores, pa.table({"sample_id": ids, "label": np.arange(60) % 3,
                                            "el2n": np.linspace(0, 1, 60, dtype=np.float32)}),
                          {"kind": "scores"})
    if setup:
        setup(tmp_path)
    argv = [_fill(a, tmp_path, scores) for a in argv]
    if job == "sweep":
        argv = ["--config", str(tmp_path / "sweep.yaml"), *argv]
    if "--out" not in argv and job not in ("select", "report"):
        argv += ["--out", str(tmp_path / "out")]
    before = set(tmp_path.rglob("*"))
    inputs = _digest(before)
    if patch:
        patch(monkeypatch)
    code, out, err = run_job(JOBS[job], argv)
    assert code == 2, (case, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], (case, err)
    assert "Traceback" not in err and not COLOUR.search(err + out), (case, err)
    assert set(tmp_path.rglob("*")) == before, f"{case}: wrote {set(tmp_path.rglob('*')) - before}"
    assert _digest(before) == inputs, f"{case}: an input file changed"
    assert not Path("/sys/winnow-hostile").exists()


# ------------------------------------------------------------------ finished work is never lost


def test_failed_pipeline_keeps_its_scores_and_a_rerun_reuses_them(ray_local, run_job, tmp_path, monkeypatch):
    import engine.stages
    import engine.stages.score
    import engine.stages.train
    from engine.errors import DataError

    out = tmp_path / "p"

    def broken(*a, **k):
        raise DataError("selection broke")

    monkeypatch.setattr(engine.stages, "select_stage", broken)
    code, _, err = run_job(pipeline, ["--smoke-test", "--selectors", "random", "--out", out])
    assert code == 2 and "selection broke" in err
    scores = out / "score" / "scores.parquet"
    assert scores.is_file(), "the finished score table was deleted by a later stage's failure"
    digest = _digest([scores])
    monkeypatch.undo()

    def must_not_rescore(*a, **k):
        raise AssertionError("scored again")

    def stop(*a, **k):
        raise DataError("retraining stopped by the test")

    monkeypatch.setattr(engine.stages.score, "score_stage", must_not_rescore)
    monkeypatch.setattr(engine.stages.train, "train_stage", stop)
    code, stdout, err = run_job(pipeline, ["--smoke-test", "--selectors", "random", "--out", out])
    assert code == 2 and "retraining stopped by the test" in err, err
    assert f"reusing {scores}" in stdout and _digest([scores]) == digest
    assert len(list((out / "select").glob("*.parquet"))) == 1
    with pytest.raises(AssertionError, match="scored again"):  # --fresh discards it: scoring runs again
        run_job(pipeline, ["--smoke-test", "--selectors", "random", "--fresh", "--out", out])


# ------------------------------------------------------------------ errors raised inside Ray


def _parquet_with_bad_row(tmp: Path, value) -> str:
    import pyarrow.parquet as pq

    from engine.data.files import write_parquet_source

    path = tmp / "d.parquet"
    rng = np.random.default_rng(0)
    write_parquet_source(path, rng.integers(0, 256, (80, 8, 8, 1), dtype=np.uint8), np.arange(80) % 2, np.arange(80))
    t = pq.read_table(path)
    col = t.column("image").to_pylist()
    col[50] = value
    pq.write_table(t.set_column(0, "image", pa.array(col, pa.binary())), path)
    return f"parquet:{path}"


def _folder_with_text_png(tmp: Path) -> str:
    image_folder()(tmp)
    for c in ("a", "b"):
        for i in range(4, 30):
            (tmp / "imgs" / c / f"{i}.png").write_bytes((tmp / "imgs" / c / "1.png").read_bytes())
    (tmp / "imgs" / "b" / "20.png").write_text("just text")
    return f"imagefolder:{tmp / 'imgs'}"


@pytest.mark.parametrize("case, make, argv, fragment", [
    # Ray Data's read tasks during scoring (no proxy training: scores at initialisation)
    ("null-image-in-a-read-task", lambda t: _parquet_with_bad_row(t, None), ["--scores", "gradnorm_init",
                                                                            "--epochs", "0"],
     "cannot decode image d.parquet row 50: it is empty"),
    ("text-named-png-in-a-read-task", _folder_with_text_png, ["--scores", "gradnorm_init", "--epochs", "0"],
     "cannot decode image b/20.png: its 9 bytes are not an image file PIL can read"),
    # a Ray task training a proxy on the split in memory
    ("corrupt-png-in-a-proxy-task", lambda t: _parquet_with_bad_row(t, b"\x89PNG\r\n\x1a\n broken"),
     ["--scores", "el2n", "--epochs", "1"], "cannot decode image"),
])
def test_error_inside_ray_is_one_line_with_the_traceback_in_a_log(tmp_path, case, make, argv, fragment):
    """As a user sees it: a subprocess with its own Ray. The console gets one error line (no
    traceback, no colour, none of Ray Data's ERROR records), naming the file and row and the
    log that holds the remote traceback; exit 2; nothing in the run directory but _partial."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    data = make(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(root), "WINNOW_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "jobs.score", "--data", data, "--seeds", "1", *argv, "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 2, (case, p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("jobs.score: error: ") and fragment in errors[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout and not COLOUR.search(p.stderr + p.stdout), p.stderr
    assert " ERROR " not in p.stderr and "partial work kept" not in p.stderr
    log = re.search(r"\(traceback: (\S+\.log)\)$", errors[0])
    assert log and "Traceback" in Path(log.group(1)).read_text() and fragment in Path(log.group(1)).read_text()
    # no artifact; only the resumable work of the stages before the error (trained proxies)
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"_partial"}
