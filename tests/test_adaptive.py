"""Adaptive selection during retraining (``jobs.train --reselect-every R``): the schedule, the
reselection against the offline selectors on the same inputs, and end to end on digits: R past
the last pass equals the offline run on the same subset exactly, reselections land on the right
passes with their records, a fixed seed repeats every selection and weight, and a failure
between two reselections resumes to the same selections and weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import artifacts
from engine.config import AdaptiveConfig, TrainConfig
from engine.data import load_source
from engine.errors import ConfigError
from engine.train.adaptive import due, reselect, selection_seed, selector_input
from jobs import train
from tests.conftest import assert_same_weights

DATA = "digits"


def test_the_schedule_and_the_seeds():
    assert [e for e in range(1, 11) if due(3, e, False)] == [1, 4, 7, 10]
    assert [e for e in range(1, 11) if due(3, e, True)] == [4, 7, 10]  # a manifest serves until pass 1 + R
    assert [e for e in range(1, 6) if due(10, e, False)] == [1]
    assert not any(due(0, e, False) for e in range(1, 6))
    assert selection_seed(0, 1) != selection_seed(0, 4) != selection_seed(1, 1)
    assert selection_seed(3, 7) == selection_seed(3, 7)


@pytest.mark.parametrize("changes, needle", [
    ({"selector": "topk:forgetting"}, "'forgetting' on the current model, and it is not a model scorer"),
    ({"selector": "nosuch"}, "nosuch"),
    ({"selector": "ccs:el2n", "params": {"mislabel": "el2n"}}, "its parameter mislabel names a score column"),
    ({"params": {"lam": -1}}, "lam"),
    ({"params": {"bogus": 1}}, "bogus"),
    ({"fraction": 1.5}, "fraction"),
    ({"every": -1}, "reselect_every must be 0 (off) or more"),
    ({"precision": "fp8"}, "--precision must be one of float32, bf16"),
])
def test_bad_adaptive_settings_are_refused(changes, needle):
    with pytest.raises(ConfigError, match=None) as e:
        TrainConfig(adaptive=AdaptiveConfig(**{"every": 2, **changes})).validate()
    assert needle in str(e.value)


def test_ray_data_loader_is_refused():
    with pytest.raises(ConfigError, match="needs the in-memory loader"):
        TrainConfig(loader="ray-data", adaptive=AdaptiveConfig(every=2)).validate()


def _model_and_data(seed: int = 0):
    from engine.models import build_model
    from engine.train import seed_everything

    src = load_source(DATA)
    info = src.info()
    seed_everything(seed)
    model = build_model("small-cnn", info.image_shape[2], info.num_classes, info.image_shape[0])
    return model, src.arrays("train"), info


@pytest.mark.parametrize("selector, params", [("topk:el2n", {}), ("gradmatch", {"lam": 0.5}), ("craig", {}),
                                              ("ccs:grand", {"beta": 0.1}), ("random", {})])
def test_a_reselection_is_the_offline_selector_on_the_recomputed_input(selector, params):
    """The same selector on the same input (recomputed by ``selector_input``, checked against
    the scorers below), over the rows sorted by sample_id, gives the same ids and weights: the
    labels, the order, the seed of the pass and the parameters are wired as jobs.select's are;
    per-class quotas hold."""
    from engine.select import SELECTORS, parse_selection

    model, full, info = _model_and_data()
    cfg = AdaptiveConfig(every=2, selector=selector, fraction=0.2, params=params)
    r = reselect(model, full, info, torch.device("cpu"), cfg, seed=5, epoch=3)
    name, column = parse_selection(selector)
    order = np.argsort(full.sample_id)
    values = selector_input(model, full, info, torch.device("cpu"), SELECTORS[name].reads, column)
    values = None if values is None else values[order]
    sel = SELECTORS[name](values, full.label[order].astype(np.int64), 0.2, seed=selection_seed(5, 3), **params)
    np.testing.assert_array_equal(r.ids, full.sample_id[order][sel.index])
    np.testing.assert_array_equal(r.weight, sel.weight)
    assert r.record["epoch"] == 3 and r.record["size"] == len(r.ids) and r.record["overlap"] is None
    assert r.record["scoring_s"] >= 0 and r.record["solving_s"] >= 0
    counts = np.bincount(full.label[np.isin(full.sample_id, r.ids)], minlength=10)
    assert counts.min() >= 1 and len(r.ids) <= round(0.2 * len(full)) + 10
    assert model.training  # the model's mode is left as it was


def test_online_geda_is_geda_on_the_current_norms_weighted_by_the_current_embeddings():
    """``--selector geda --reselect-every R``: the GEDA subset on the current model's GraNd
    (gradnorm_init's scorer, on the model as it is), weighted by Algorithm 6.1 on the current
    gradient embeddings; the record carries the weight fit's residual."""
    from engine.select import SELECTORS
    from engine.select.geda_selector import err_weights

    model, full, info = _model_and_data(2)
    cfg = AdaptiveConfig(every=2, selector="geda", fraction=0.2, params={"lam": 0.25})
    r = reselect(model, full, info, torch.device("cpu"), cfg, seed=5, epoch=3)
    order = np.argsort(full.sample_id)
    norms = selector_input(model, full, info, torch.device("cpu"), "score", "gradnorm_init")[order]
    emb = selector_input(model, full, info, torch.device("cpu"), "embeddings", None)[order]
    labels = full.label[order].astype(np.int64)
    plain = SELECTORS["geda"](norms, labels, 0.2, seed=selection_seed(5, 3))
    np.testing.assert_array_equal(r.ids, full.sample_id[order][plain.index])
    errors = []
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        mine = labels[plain.index] == c
        w, err, unweighted = err_weights(emb[rows], np.searchsorted(rows, plain.index[mine]), 0.25)
        np.testing.assert_allclose(r.weight[mine], w, rtol=1e-6, atol=1e-9)
        errors.append(err)
    assert r.record["match_error"] == pytest.approx(np.mean(errors), rel=1e-6)
    assert not np.allclose(r.weight, 1.0)


def test_online_geda_end_to_end(ray_local, run_job, tmp_path):
    code, stdout, err = _adaptive(run_job, tmp_path / "g", 3, 2, "--selector", "geda", "--select-params", "lam=0.1")
    assert code == 0, err
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert [r["epoch"] for r in m["reselections"]] == [1, 3]
    assert all(0 <= r["match_error"] < 1 for r in m["reselections"])
    ids, weight, meta = artifacts.read_manifest(tmp_path / "g" / "selections" / "pass-003.parquet")
    assert len(ids) == m["reselections"][1]["size"] and not np.allclose(weight, 1.0)


def test_selector_input_matches_the_scorer_batch_by_batch():
    from engine.scores import SCORERS
    from engine.train import batch_to_input

    model, full, info = _model_and_data(1)
    got = selector_input(model, full, info, torch.device("cpu"), "score", "el2n", batch_size=100)
    x = batch_to_input(full.image, info, torch.device("cpu"))
    y = torch.as_tensor(full.label).long()
    want = SCORERS["el2n"](model, x, y).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    from engine.scores.embeddings import grad_embedding

    got = selector_input(model, full, info, torch.device("cpu"), "embeddings", None, batch_size=100)
    np.testing.assert_allclose(got, grad_embedding(model, x, y).double().numpy(), rtol=1e-4, atol=1e-6)
    assert selector_input(model, full, info, torch.device("cpu"), "nothing", None) is None
    # bf16: the forward under autocast, close to float32 and not it; a scorer that may not run
    # in bf16 (curvature) stays float32 bit for bit
    half = selector_input(model, full, info, torch.device("cpu"), "embeddings", None, batch_size=100, precision="bf16")
    assert not np.array_equal(half, got)
    assert np.abs(half - got).max() <= 2e-2 * np.abs(got).max()
    few = full.subset(full.sample_id[:64])
    np.testing.assert_array_equal(
        selector_input(model, few, info, torch.device("cpu"), "score", "curvature", batch_size=32, precision="bf16"),
        selector_input(model, few, info, torch.device("cpu"), "score", "curvature", batch_size=32))


def _train(run_job, out, *extra):
    return run_job(train, ["--data", DATA, "--batch-size", "128", "--out", out, *extra])


def _adaptive(run_job, out, epochs, every, *extra):
    return _train(run_job, out, "--epochs", str(epochs), "--reselect-every", str(every), "--fraction", "0.3", *extra)


def test_r_past_the_last_pass_is_the_offline_run_on_the_same_subset(ray_local, run_job, tmp_path):
    code, stdout, err = _adaptive(run_job, tmp_path / "a", 3, 5, "--selector", "gradmatch")
    assert code == 0, err
    assert "train: selected" in stdout and "before pass 1 (gradmatch" in stdout
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [r["epoch"] for r in m["reselections"]] == [1]
    manifest = tmp_path / "a" / "selections" / "pass-001.parquet"
    ids, weight, meta = artifacts.read_manifest(manifest)
    assert meta["adaptive"] and meta["epoch"] == 1 and len(ids) == m["reselections"][0]["size"]
    assert not np.allclose(weight, 1.0)  # GRAD-MATCH weights its picks
    code, _, err = _train(run_job, tmp_path / "b", "--epochs", "3", "--manifest", manifest)
    assert code == 0, err
    offline = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert offline["test_accuracy"] == m["test_accuracy"] and offline["steps"] == m["steps"]
    assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")


def test_reselections_land_on_their_passes_and_repeat_with_the_seed(ray_local, run_job, tmp_path):
    for run in ("one", "two"):
        code, stdout, err = _adaptive(run_job, tmp_path / run, 5, 2, "--selector", "topk:el2n", "--seed", "3")
        assert code == 0, err
    m = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert [r["epoch"] for r in m["reselections"]] == [1, 3, 5]
    assert m["reselections"][0]["overlap"] is None and 0 <= m["reselections"][1]["overlap"] <= 1
    assert m["selection_time_s"] == pytest.approx(sum(r["scoring_s"] + r["solving_s"] for r in m["reselections"]))
    assert m["cost_s"] == pytest.approx(m["train_time_s"] + m["selection_time_s"])
    n = load_source(DATA).num_rows("train")
    assert m["full_data_samples"] == 5 * n and m["samples_vs_full"] == pytest.approx(m["samples_seen"] / (5 * n))
    sizes = {r["size"] for r in m["reselections"]}
    assert len(sizes) == 1 and m["samples_seen"] == 5 * sizes.pop()  # topk keeps each class's quota
    assert m["config"]["adaptive"] == {"every": 2, "selector": "topk:el2n", "fraction": 0.3, "params": {},
                                       "warm_start": "none", "precision": "float32"}
    files = sorted(p.name for p in (tmp_path / "one" / "selections").iterdir())
    assert files == ["pass-001.parquet", "pass-003.parquet", "pass-005.parquet"]
    first, _, _ = artifacts.read_manifest(tmp_path / "one" / "selections" / "pass-001.parquet")
    later, _, _ = artifacts.read_manifest(tmp_path / "one" / "selections" / "pass-005.parquet")
    assert not np.array_equal(first, later)  # the ranking moved with the model
    for f in files:
        a, wa, _ = artifacts.read_manifest(tmp_path / "one" / "selections" / f)
        b, wb, _ = artifacts.read_manifest(tmp_path / "two" / "selections" / f)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(wa, wb)
    assert_same_weights(tmp_path / "one" / "model.pt", tmp_path / "two" / "model.pt")


@pytest.mark.parametrize("executor", ["in-process", pytest.param("ray-train", marks=pytest.mark.slow)])
def test_a_failure_between_reselections_resumes_to_the_same_selections_and_weights(ray_local, run_job, tmp_path,
                                                                                    drills_here, executor):
    """The loop fails after pass 1's checkpoint (between the selections before passes 1 and 3)
    and restarts from it (in this process; or Ray Train's worker dies and its group restarts): the selection of pass 1 comes back from the checkpoint, the one of
    pass 3 is made again on the restored model, and all ends as in the uninterrupted run."""
    extra = ("--selector", "random", "--seed", "2")
    code, _, err = _adaptive(run_job, tmp_path / "clean", 4, 2, *extra)
    assert code == 0, err
    chaos = tmp_path / "chaos"
    (chaos / "_partial").mkdir(parents=True)
    (chaos / "_partial" / "chaos-fail-worker").touch()
    code, stdout, err = _adaptive(run_job, chaos, 4, 2, *extra, "--executor", executor)
    assert code == 0, err
    assert executor == "ray-train" or "restarting from its last checkpoint" in stdout
    m = json.loads((chaos / "metrics.json").read_text())
    assert m["restarts"] == 1 and [r["epoch"] for r in m["reselections"]] == [1, 3]
    for f in ("pass-001.parquet", "pass-003.parquet"):
        a, _, _ = artifacts.read_manifest(tmp_path / "clean" / "selections" / f)
        b, _, _ = artifacts.read_manifest(chaos / "selections" / f)
        np.testing.assert_array_equal(a, b)
    assert_same_weights(tmp_path / "clean" / "model.pt", chaos / "model.pt")


def test_a_full_data_warm_start_trains_on_everything_first(ray_local, run_job, tmp_path):
    """--warm-start full:2 with R = 2 over 4 passes: passes 1-2 on the whole split, the first
    selection before pass 3, passes 3-4 on it; the steps are planned for exactly that."""
    import math

    code, stdout, err = _adaptive(run_job, tmp_path / "w", 4, 2, "--selector", "random", "--warm-start", "full:2")
    assert code == 0, err
    m = json.loads((tmp_path / "w" / "metrics.json").read_text())
    n = load_source(DATA).num_rows("train")
    [r] = m["reselections"]
    assert r["epoch"] == 3 and "before pass 3 (random" in stdout
    assert m["samples_seen"] == 2 * n + 2 * r["size"]
    assert m["steps"] == 2 * math.ceil(n / 128) + 2 * math.ceil(r["size"] / 128)
    code, _, err = _adaptive(run_job, tmp_path / "x", 4, 2, "--warm-start", "full:2", "--manifest",
                             tmp_path / "w" / "selections" / "pass-003.parquet")
    assert code == 2 and "--warm-start and --manifest both say what the first passes train on" in err


def test_a_geda_warm_start_trains_on_offline_geda_until_the_first_reselection(ray_local, run_job, tmp_path):
    """--warm-start geda, R = 2, 3 passes: before pass 1 the offline GEDA subset of the untrained
    model's GraNd (every weight 1: GEDA's, not online GEDA's), passes 1-2 on it, GRAD-MATCH
    before pass 3; the warm subset is exactly the geda selector on that model's gradnorm_init."""
    from engine.models import build_model
    from engine.select import SELECTORS
    from engine.train import seed_everything
    from engine.train.adaptive import warm_selection

    cfg = AdaptiveConfig(every=2, selector="gradmatch", params={"lam": 1.0}, warm_start="geda")
    assert warm_selection(cfg, 1).selector == "geda" and warm_selection(cfg, 1).params == {}
    assert warm_selection(cfg, 3) is cfg and warm_selection(AdaptiveConfig(every=2), 1).selector == "gradmatch"
    code, stdout, err = _adaptive(run_job, tmp_path / "g", 3, 2, "--selector", "gradmatch", "--warm-start", "geda")
    assert code == 0, err
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert [(r["epoch"], r["selector"]) for r in m["reselections"]] == [(1, "geda (warm start)"), (3, "gradmatch")]
    assert "before pass 1 (geda (warm start)" in stdout and "before pass 3 (gradmatch" in stdout
    ids, weight, meta = artifacts.read_manifest(tmp_path / "g" / "selections" / "pass-001.parquet")
    np.testing.assert_array_equal(weight, 1.0)
    assert meta["selector"] == "geda (warm start)" and meta["params"] == {}
    assert not np.allclose(artifacts.read_manifest(tmp_path / "g" / "selections" / "pass-003.parquet")[1], 1.0)
    # the untrained model the run started from: the run seeds and builds it as here
    src = load_source(DATA)
    info, full = src.info(), src.arrays("train")
    seed_everything(0)
    model = build_model("small-cnn", info.image_shape[2], info.num_classes, info.image_shape[0])
    order = np.argsort(full.sample_id)
    norms = selector_input(model, full, info, torch.device("cpu"), "score", "gradnorm_init", batch_size=128)[order]
    sel = SELECTORS["geda"](norms, full.label[order].astype(np.int64), 0.3, seed=selection_seed(0, 1))
    np.testing.assert_array_equal(ids, full.sample_id[order][sel.index])


def test_adaptive_plan_counts_the_warm_passes():
    from engine.train import epoch_plan
    from engine.train.adaptive import adaptive_plan, warm_passes

    assert adaptive_plan(300, 100, 4, "epochs", 1000, 0) == epoch_plan(300, 100, 4, "epochs", 1000)
    assert adaptive_plan(300, 100, 4, "epochs", 1000, 1) == (4, 10 + 3 * 3)
    assert adaptive_plan(300, 100, 4, "steps", 1000, 2) == (2 + 7, 40)  # 20 steps left, 3 a pass
    assert warm_passes("none") == 0 and warm_passes("full:3") == 3 and warm_passes("geda") == 0
    for bad in ("full:0", "geda:2", "full:x", "half:2"):
        with pytest.raises(ConfigError, match="warm_start must be"):
            warm_passes(bad)


def test_the_classes_solved_as_ray_tasks_select_what_the_builtin_map_does(ray_local):
    from engine.distributed.runtime import task_map

    model, full, info = _model_and_data(4)
    cfg = AdaptiveConfig(every=1, selector="gradmatch", fraction=0.2)
    a = reselect(model, full, info, torch.device("cpu"), cfg, seed=1, epoch=1)
    b = reselect(model, full, info, torch.device("cpu"), cfg, seed=1, epoch=1, mapper=task_map)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.weight, b.weight)


def test_data_parallel_workers_share_the_recomputation_and_train_on_one_selection(ray_local, run_job, tmp_path):
    """Two Ray Train workers each recompute half of the rows' input, exchange them, and rank 0's
    selection is everyone's: the run's selections are those a single worker makes from the
    same initial model (pass 1), and it trains to the end with a selection on every due pass."""
    extra = ("--selector", "topk:el2n", "--seed", "4", "--executor", "ray-train")
    code, _, err = _adaptive(run_job, tmp_path / "two", 3, 2, *extra, "--workers", "2", "--cpus-per-worker", "1")
    assert code == 0, err
    code, _, err = _adaptive(run_job, tmp_path / "one", 3, 2, *extra)
    assert code == 0, err
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [r["epoch"] for r in m["reselections"]] == [1, 3] and m["passes"] == 3
    a, _, _ = artifacts.read_manifest(tmp_path / "two" / "selections" / "pass-001.parquet")
    b, _, _ = artifacts.read_manifest(tmp_path / "one" / "selections" / "pass-001.parquet")
    assert len(a) == len(b) and np.isin(a, b).mean() >= 0.99  # the same model, scored in other batches
