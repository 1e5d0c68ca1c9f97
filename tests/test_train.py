"""jobs.train on Ray Train: budgets, weights, fault tolerance, resume, the regularisers and
the evaluation metrics, end to end (small data: digits, small-cnn)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import artifacts
from engine.config import OptimConfig
from engine.data import load_source
from engine.train import epoch_plan, make_optimizer, seed_everything, shuffled_batches, train_epoch, weighted_batches
from jobs import train
from tests.conftest import assert_same_weights

DATA = "digits"  # 1,437 training images of 8x8: a Ray Train run takes seconds


def test_epoch_plan_budgets():
    assert epoch_plan(300, 100, 4, "epochs", 1000) == (4, 12)
    passes, steps = epoch_plan(300, 100, 4, "steps", 1000)
    assert steps == 40 and passes == math.ceil(40 / 3)  # the last pass is cut short
    assert epoch_plan(1000, 100, 4, "steps", 1000) == (4, 40)
    with pytest.raises(ValueError):
        epoch_plan(10, 5, 1, "minutes", 10)


def test_weighted_batches_uniform_is_the_plain_shuffle_and_follows_weights():
    for a, b in zip(weighted_batches(np.full(1000, 2.5), 64, 3, 1), shuffled_batches(1000, 64, 3, 1)):
        np.testing.assert_array_equal(a, b)
    w = np.ones(1000)
    w[:10] = 100.0  # 10 samples carry half the mass
    drawn = np.concatenate(weighted_batches(w, 64, 0, 1))
    assert len(drawn) == 1000
    assert 0.4 < np.isin(drawn, np.arange(10)).mean() < 0.6


def _loop_weights(weight, sampling: bool) -> dict:
    src = load_source(DATA)
    split, info = src.arrays("train"), src.info()
    from engine.models import build_model

    seed_everything(0)
    model = build_model("small-cnn", 1, 10, 8)
    opt, sched = make_optimizer(model, OptimConfig(), 40)
    torch.set_num_threads(1)
    for epoch in (1, 2):
        if sampling and weight is not None:
            batches = weighted_batches(weight, 128, 0, epoch)
            w = None
        else:
            batches = shuffled_batches(len(split), 128, 0, epoch)
            w = weight
        train_epoch(model, opt, sched, split, info, batches, torch.device("cpu"), w)
    return model.state_dict()


@pytest.mark.parametrize("sampling", [False, True])
def test_all_ones_weights_equal_unweighted_training(sampling):
    n = load_source(DATA).num_rows("train")
    plain = _loop_weights(None, sampling)
    weighted = _loop_weights(np.ones(n), sampling)
    for k in plain:
        torch.testing.assert_close(plain[k], weighted[k], rtol=0, atol=0, msg=k)


def test_weights_change_training():
    n = load_source(DATA).num_rows("train")
    w = np.ones(n)
    w[: n // 2] = 3.0
    plain, weighted = _loop_weights(None, False), _loop_weights(w / w.mean(), False)
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain if plain[k].is_floating_point())


def _train(run_job, out, *extra):
    code, stdout, err = run_job(train, ["--data", DATA, "--epochs", "3", "--batch-size", "128", "--out", out, *extra])
    return code, stdout, err


@pytest.mark.slow  # fault drill, 50 s on 2 cores (make test-all)
@pytest.mark.parametrize("extra", [(), ("--train-transform", "pad-crop-flip")], ids=["plain", "augmented"])
def test_injected_worker_failure_resumes_to_the_same_weights(ray_local, run_job, tmp_path, extra):
    """With augmentation too: its draws depend on (seed, pass, sample_id) only, so the resumed
    passes see the images the uninterrupted run saw."""
    extra = (*extra, "--executor", "ray-train")
    code, _, err = _train(run_job, tmp_path / "clean", *extra)
    assert code == 0, err
    assert not (tmp_path / "clean" / "_partial").exists()  # checkpoints are dropped once the run is complete
    (tmp_path / "chaos" / "_partial").mkdir(parents=True)
    (tmp_path / "chaos" / "_partial" / "chaos-fail-worker").touch()  # rank 0 exits after pass 1's checkpoint
    code, out, err = _train(run_job, tmp_path / "chaos", *extra)
    assert code == 0, err
    metrics = json.loads((tmp_path / "chaos" / "metrics.json").read_text())
    assert metrics["restarts"] == 1 and metrics["passes"] == 3
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert metrics["samples_seen"] == clean["samples_seen"] and metrics["steps"] == clean["steps"]
    assert metrics["test_accuracy"] == clean["test_accuracy"]
    assert_same_weights(tmp_path / "clean" / "model.pt", tmp_path / "chaos" / "model.pt")


@pytest.mark.slow  # fault drill, 58 s on 2 cores (make test-all)
def test_rerun_after_a_failed_run_resumes(ray_local, run_job, tmp_path):
    out = tmp_path / "run"
    (out / "_partial").mkdir(parents=True)
    (out / "_partial" / "chaos-fail-worker").touch()
    code, _, err = _train(run_job, out, "--max-failures", "0", "--seed", "1", "--executor", "ray-train")
    assert code == 1 and "jobs.train: error: training failed after 0 restart(s)" in err, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists() and not (out / "model.pt").exists()
    assert any((out / "_partial" / "ray_train").iterdir())  # the checkpoint of pass 1 is kept
    code, stdout, err = _train(run_job, out, "--max-failures", "0", "--seed", "1", "--executor", "ray-train")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["restarts"] == 1
    code, _, err = _train(run_job, tmp_path / "clean", "--seed", "1", "--executor", "ray-train")
    assert code == 0, err
    assert_same_weights(tmp_path / "clean" / "model.pt", out / "model.pt")


def test_in_process_runs_train_the_weights_ray_train_does_and_resume_from_their_own_checkpoints(
        ray_local, run_job, tmp_path, drills_here):
    """One worker in the job's process (``--executor auto`` picks it here): the same weights and
    metrics as a Ray Train worker group of one; an error after pass 1 restarts the loop from that
    pass's checkpoint; with no restart left the run fails in one line, keeps the checkpoint, and
    the rerun resumes from it. Every path ends on the same weights."""
    extra = ("--train-transform", "pad-crop-flip")  # the augmentation's draws must line up too
    code, _, err = _train(run_job, tmp_path / "ray", *extra, "--executor", "ray-train")
    assert code == 0, err
    code, stdout, err = _train(run_job, tmp_path / "here", *extra)
    assert code == 0, err
    assert "one worker in this process (--executor auto" in stdout and "RayTrainWorker" not in stdout
    ray_m, here_m = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ray", "here"))
    assert here_m["executor"] == "in-process" and ray_m["executor"] == "ray-train"
    for k in ("test_accuracy", "steps", "samples_seen", "passes", "history"):
        assert here_m[k] == ray_m[k], k
    assert_same_weights(tmp_path / "ray" / "model.pt", tmp_path / "here" / "model.pt")
    assert not (tmp_path / "here" / "_partial").exists()

    chaos = tmp_path / "chaos"
    (chaos / "_partial").mkdir(parents=True)
    (chaos / "_partial" / "chaos-fail-worker").touch()  # the loop raises after pass 1's checkpoint
    code, stdout, err = _train(run_job, chaos, *extra, "--executor", "in-process")
    assert code == 0, err
    assert "restarting from its last checkpoint (1/2)" in stdout and "resuming after pass 1/3" in stdout
    assert json.loads((chaos / "metrics.json").read_text())["restarts"] == 1
    assert_same_weights(tmp_path / "ray" / "model.pt", chaos / "model.pt")

    failed = tmp_path / "failed"
    (failed / "_partial").mkdir(parents=True)
    (failed / "_partial" / "chaos-fail-worker").touch()
    code, _, err = _train(run_job, failed, *extra, "--max-failures", "0")
    assert code == 1 and "jobs.train: error: training failed after 0 restart(s) (chaos drill after pass 1)" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err and "worker logs" not in err
    kept = sorted((failed / "_partial" / "in_process").glob("run-*/checkpoint_*"))
    assert [p.name for p in kept] == ["checkpoint_000001"] and not (failed / "metrics.json").exists()
    code, stdout, err = _train(run_job, failed, *extra, "--max-failures", "0")
    assert code == 0, err
    assert "resuming after pass 1/3" in stdout
    assert_same_weights(tmp_path / "ray" / "model.pt", failed / "model.pt")


def test_executor_in_process_is_refused_where_it_cannot_run(run_job, tmp_path):
    code, _, err = _train(run_job, tmp_path / "x", "--executor", "in-process", "--workers", "2")
    assert code == 2 and "--executor in-process needs --workers 1; use --executor ray-train" in err, err
    code, _, err = _train(run_job, tmp_path / "y", "--executor", "in-process", "--loader", "ray-data")
    assert code == 2 and "--executor in-process needs the in-memory loader" in err, err


def test_steps_budget_weights_regularisers_lcnn_and_evaluation(ray_local, run_job, tmp_path):
    src = load_source(DATA)
    ids = np.sort(src.arrays("train").sample_id)[::3]  # a third of the data
    manifest = tmp_path / "m.parquet"
    artifacts.write_manifest(manifest, ids, np.linspace(0.5, 2.0, len(ids)), {})
    out = tmp_path / "t"
    code, stdout, err = _train(run_job, out, "--manifest", manifest, "--budget", "steps", "--weighting", "sampling",
                               "--lcnn", "--curvature-lambda", "0.5", "--gradreg", "0.01", "--geometry",
                               "--pgd-eps", "0.05,0.2", "--pgd-steps", "5", "--eval-samples", "100")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    full = src.num_rows("train")
    assert m["steps"] == 3 * math.ceil(full / 128)              # the optimizer steps of 3 full-data epochs
    assert m["passes"] == math.ceil(m["steps"] / math.ceil(len(ids) / 128))
    assert m["train_size"] == len(ids) and m["budget"] == "steps" and m["weighting"] == "sampling"
    assert m["model_options"]["activation"] == "centered_softplus" and m["model_options"]["spectral_norm"]
    assert m["config"]["curvature_lambda"] == 0.5 and m["config"]["gradreg"] == 0.01
    g = m["geometry"]
    assert g["samples"] == 100 and all(np.isfinite(g[k]) and g[k] > 0 for k in
                                       ("grad_norm", "hessian_norm", "normalized_curvature"))
    r = m["robust_accuracy"]
    assert set(r) == {"0", "0.05", "0.2"}  # "0": clean accuracy on the same eval samples
    assert 0.0 <= r["0.2"] <= r["0.05"] <= r["0"] <= 1.0
    assert m["test_accuracy"] > 0.3, m  # chance is 0.1; a few steps of a small net on 8x8 digits
    assert len(m["history"]) == m["passes"]


@pytest.mark.parametrize("argv, pattern", [
    (["--budget", "hours"], "invalid choice"),
    (["--pgd-eps", "0.1,-1"], "pgd_eps: radius -1.0 must be in (0, 10]"),
    (["--curvature-lambda", "-1"], "curvature_lambda must be in"),
    (["--bn-gamma", "0"], "bn_gamma must be in"),
    (["--max-failures", "-1"], "max_failures must be 0 or more"),
])
def test_train_refuses_bad_options(run_job, tmp_path, argv, pattern):
    code, _, err = run_job(train, ["--data", DATA, "--out", tmp_path / "t", *argv])
    assert code == 2 and pattern in err, err
    assert "Traceback" not in err and not (tmp_path / "t").exists()


def _half_manifest(tmp_path):
    src = load_source(DATA)
    ids = np.sort(src.arrays("train").sample_id)[::2]
    manifest = tmp_path / "m.parquet"
    artifacts.write_manifest(manifest, ids, np.linspace(0.5, 2.0, len(ids)), {})
    return src, ids, manifest


def test_ray_data_loader_streams_the_manifest_rows(ray_local, run_job, tmp_path):
    """--loader ray-data: the workers stream their Ray Data shard (the manifest's rows and
    weights, read in parallel) instead of holding the split; every row once per pass (checked
    inside the loop against the driver's count)."""
    src, ids, manifest = _half_manifest(tmp_path)
    out = tmp_path / "stream"
    code, _, err = _train(run_job, out, "--manifest", manifest, "--loader", "ray-data", "--epochs", "3")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples_seen"] == 3 * len(ids) and m["steps"] == 3 * math.ceil(len(ids) / 128)
    assert m["config"]["loader"] == "ray-data" and m["test_accuracy"] > 0.3, m


@pytest.mark.slow  # 23 s on 2 cores; the epochs budget above covers the loader in the default run
def test_ray_data_loader_steps_budget(ray_local, run_job, tmp_path):
    src, _, manifest = _half_manifest(tmp_path)
    out2 = tmp_path / "stream-steps"
    code, _, err = _train(run_job, out2, "--loader", "ray-data", "--epochs", "1", "--budget", "steps",
                          "--manifest", manifest)
    assert code == 0, err
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["steps"] == math.ceil(src.num_rows("train") / 128)  # one full-data pass worth of steps


def test_ray_data_loader_refuses_weighted_sampling(run_job, tmp_path):
    code, _, err = run_job(train, ["--data", DATA, "--loader", "ray-data", "--weighting", "sampling",
                                   "--out", tmp_path / "t"])
    assert code == 2 and "weighting 'loss'" in err and "Traceback" not in err


def test_bench_lcnn_table_rejects_unknown_rows_before_training(tmp_path):
    """``bench/train.py lcnn-table --rows`` names rows of the table; a wrong name is one argparse
    error (exit 2) before any job starts, so nothing is written under --out."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "bench" / "train.py"
    out = tmp_path / "table"
    r = subprocess.run([sys.executable, str(bench), "lcnn-table", "--rows", "LCNN,Bogus", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown row(s) ['Bogus']" in r.stderr and "LCNN + GradReg" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
