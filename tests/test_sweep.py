"""jobs.sweep end to end on the shared local Ray: scores once, manifests, Tune trials that fit a
TorchTrainer each, results table, TensorBoard files, the report; resume; bad YAML."""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from engine.errors import ConfigError
from engine.stages.sweep import STOPPED
from engine.sweep import expand_trials, load_sweep, parse_overrides, sweep_from_dict, trial_train_config
from jobs import sweep
from tests.conftest import ROOT

SMOKE = ROOT / "tune_configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_sweep(ray_local, tmp_path_factory):
    from jobs._cli import run

    out = tmp_path_factory.mktemp("sweep") / "smoke"
    code = run("jobs.sweep", sweep.main, ["--config", str(SMOKE), "--out", str(out)])
    assert code == 0
    return out


def test_smoke_sweep_results(smoke_sweep):
    out = smoke_sweep
    spec = yaml.safe_load(SMOKE.read_text())
    trials = expand_trials(sweep_from_dict(spec))
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["trial_id"] for r in table) == sorted(t["key"] for t in trials)
    assert {r["label"] for r in table} == set(spec["param_space"]["selector"])
    for r in table:
        assert 0 < r["test_accuracy"] <= 1
        m = json.loads((out / r["trial_dir"] / "metrics.json").read_text())
        assert m["test_accuracy"] == r["test_accuracy"]
        assert m["executor"] == "in-process"  # one worker per trial on the job's own machine: no TorchTrainer
        if r["selector"] == "full":
            assert r["manifest"] is None and r["train_size"] == 6000
        else:  # the trial trained on its manifest's rows
            assert r["train_size"] == pq.read_table(out / r["manifest"]).num_rows == 1800
    info = json.loads((out / "sweep.json").read_text())
    assert info["complete"] and info["finished"] == len(trials) and not info["errors"]
    # one score table for all trials
    assert (out / "scores" / "scores.parquet").is_file()
    assert len(list((out / "manifests").glob("*.parquet"))) == len(trials) - 1
    # Tune's experiment with TensorBoard event files under the one storage path, and every pass's
    # report in each trial's results (what ASHA stops on)
    assert list((out / "tune" / "smoke").rglob("events.out.tfevents*"))
    results = sorted((out / "tune" / "smoke").glob("*/result.json"))
    assert len(results) == len(trials)
    for path in results:
        passes = [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]
        assert passes == list(range(1, spec["train"]["epochs"] + 1)), path
    assert (out / "results.csv").read_text().startswith("trial_id,") or "trial_id" in (out / "results.csv").read_text()
    # the report renders from the sweep
    html = (out / "report" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html


@pytest.mark.slow  # resume drill, 26 s on 2 cores (make test-all)
def test_rerun_resumes_without_retraining(smoke_sweep, run_job):
    out = smoke_sweep
    before = {p: p.stat().st_mtime for p in (out / "trials").glob("*/metrics.json")}
    victim = sorted(before)[0]
    # an interrupted sweep: one trial's result and the sweep's summary are missing
    shutil.rmtree(victim.parent)
    (out / "sweep.json").unlink()
    code, stdout, err = run_job(sweep, ["--config", SMOKE, "--out", out, "--no-report"])
    assert code == 0, err
    assert "scores: reusing" in stdout
    after = {p: p.stat().st_mtime for p in (out / "trials").glob("*/metrics.json")}
    assert set(after) == set(before)
    for p, t in before.items():
        if p != victim:
            assert after[p] == t  # finished trials were not trained again
    assert json.loads((out / "sweep.json").read_text())["complete"]


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ("name: x\nparam_space: {selector: [random], fractions: [0.3]}\n", "param_space: unknown key"),
    ("name: x\nparam_space: {selector: [nosuch], fraction: [0.3]}\n", "nosuch"),
    ("name: x\nparam_space: {selector: [random], fraction: [1.5]}\n", "fraction"),
    ("name: x\ntrain: {epochs: 1, seed: 3}\n", "set per trial"),
    ("name: x\nresources: {gpus: 1}\n", "resources: unknown key"),
    ("name: x\nparam_space: {variant: [lcnn]}\n", "variant"),
    ("name: x\ndata: nosuchdata\n", "nosuchdata"),
    ("name: [unclosed\n", "not valid YAML"),
    ("wat: 1\n", "unknown key"),
])
def test_bad_yaml_is_one_line_exit_2(tmp_path, run_job, text, needle):
    code, _, err = run_job(sweep, ["--config", _write(tmp_path, text), "--out", tmp_path / "o"])
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_config(tmp_path, run_job):
    code, _, err = run_job(sweep, ["--config", tmp_path / "nope.yaml"])
    assert code == 2 and "no such file" in err


def test_shipped_configs_expand_and_validate(tmp_path):
    """Every shipped YAML parses, expands to the documented grid and validates its configs
    (full and --smoke-test) without starting Ray."""
    n = {}
    for path in sorted((ROOT / "tune_configs").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("#") and "python -m jobs.sweep" in text and "runtime" in text and "shows" in text
        for smoke in (False, True):
            cfg = load_sweep(str(path), smoke)
            trials = expand_trials(cfg)
            base = cfg.base_train_config()
            for t in trials:
                trial_train_config(cfg, base, t, tmp_path)
            if not smoke:
                n[path.stem] = trials
    sel = n["fashion_mnist_selectors"]
    labels = {t["label"] for t in sel if t["selector"] != "full"}
    from engine.select import SELECTORS

    assert {t["selector"] for t in sel} - {"full"} == set(SELECTORS)  # every selector
    assert {t["fraction"] for t in sel if t["selector"] != "full"} == {0.1, 0.2, 0.3, 0.5, 0.7}
    assert {t["seed"] for t in sel} == {0, 1, 2}
    assert len(sel) == len(labels) * 5 * 3 + 3
    lam = n["slo_curves_lambda"]
    assert {t["curvature_lambda"] for t in lam} == {0, 0.5, 1, 5, 10, 20, 50}
    ada = n["adaptive"]
    assert len(ada) == 2 * (4 * (1 + 3 * 3) * 2 + 2)
    assert sorted(t["key"] for t in ada if t["selector"] == "infobatch") == ["infobatch-r1-s0", "infobatch-r1-s1"]
    assert {(t["reselect_every"], t["warm_start"]) for t in ada if t["selector"] == "craig"} == \
        {(0, "none")} | {(r, w) for r in (1, 5, 20) for w in ("none", "full:2", "geda")}
    cpu = n["fashion_mnist_cpu"]
    assert len(cpu) == 12 * 3 * 2 + 2 + (3 * 2 * 2 + 2) + 2 * 2 + 4 * 2 * 2
    assert {t["selector"] for t in cpu} - {"full", "infobatch"} == set(SELECTORS)  # every offline selector
    assert {t["seed"] for t in cpu} == {0, 1} and {t["fraction"] for t in cpu} == {0.1, 0.3, 0.5, 1.0}
    steps = {(t["label"], t["fraction"]) for t in cpu if t["budget"] == "steps"}
    assert steps == {(f"{s} (steps)", f) for s in ("random", "geda:gradnorm_init", "ccs:el2n", "topk:el2n")
                     for f in (0.1, 0.3)}
    assert {t["curvature_lambda"] for t in cpu if t["curvature_lambda"]} == {1, 10}
    assert {(t["selection"], t["fraction"]) for t in cpu if t["curvature_lambda"]} == {("lowest:curvature", 0.1)}
    assert {t["label"] for t in cpu if t["reselect_every"]} == {"gradmatch R=2", "craig R=2", "geda:gradnorm_init R=2",
                                                                "infobatch"}
    geda = {t["selector"] for t in n["geda_thesis"]}
    assert geda == {"full", "geda", "random", "random_quantile", "evenly_spaced", "craig", "gradmatch"}


def test_also_grids_and_the_budget_axis(tmp_path):
    """``also`` adds grids whose unset fields are param_space's; ``budget`` is an axis (steps
    trials keyed and labelled apart, sharing the epochs trial's manifest; full data and
    InfoBatch only ever "epochs"); each also grid is checked with its path."""
    spec = {"name": "g", "param_space": {"selector": ["full", "random", "infobatch"], "fraction": [0.1, 0.3],
                                         "seed": [0, 1], "budget": ["epochs", "steps"]},
            "also": [{"selector": ["topk:el2n"], "fraction": [0.5], "curvature_lambda": [2]},
                     {"selector": ["random"], "fraction": [0.1]}]}
    cfg = sweep_from_dict(spec)
    trials = expand_trials(cfg)
    keys = [t["key"] for t in trials]
    assert len(keys) == len(set(keys))
    assert sorted(k for k in keys if k.startswith("random")) == sorted(
        f"random-f{f}{b}-s{s}" for f in (0.1, 0.3) for b in ("", "-bsteps") for s in (0, 1))  # also[1]: no new trial
    assert {t["budget"] for t in trials if t["selector"] in ("full", "infobatch")} == {"epochs"}
    by = {t["key"]: t for t in trials}
    assert by["random-f0.1-bsteps-s1"]["label"] == "random (steps)"
    assert {k for k in keys if k.startswith("topk")} == {f"topk-el2n-f0.5{b}-s{s}-l2" for b in ("", "-bsteps")
                                                          for s in (0, 1)}  # seeds and budgets inherited
    base = cfg.base_train_config()
    steps = trial_train_config(cfg, base, by["random-f0.1-bsteps-s1"], tmp_path)
    epochs = trial_train_config(cfg, base, by["random-f0.1-s1"], tmp_path)
    assert steps.budget == "steps" and epochs.budget == "epochs" and steps.manifest == epochs.manifest
    for bad, needle in ((["x"], r"also\[0\] must be a mapping"),
                        ([{"fraction": [2]}], r"also\[0\].*fraction\[0\]"),
                        ([{"budget": ["hours"]}], r"also\[0\].*budget\[0\]")):
        with pytest.raises(ConfigError, match=needle):
            sweep_from_dict({**spec, "also": bad})
    with pytest.raises(ConfigError, match="budget"):
        sweep_from_dict({**spec, "train": {"budget": "steps"}})  # a per-trial field: set it in param_space


def test_set_overrides():
    o = parse_overrides(["param_space.seed=[0]", "param_space.fraction=[0.1, 0.3]", "train.epochs=3"])
    cfg = load_sweep(str(ROOT / "tune_configs" / "fashion_mnist_selectors.yaml"), False, o)
    trials = expand_trials(cfg)
    assert {t["seed"] for t in trials} == {0} and {t["fraction"] for t in trials if t["selector"] != "full"} == {0.1, 0.3}
    assert cfg.base_train_config().epochs == 3


@pytest.mark.parametrize("item, needle", [("nodot", "KEY=VALUE"), ("bogus.x=1", "unknown key"),
                                          ("train.epochs=[1", "not valid YAML")])
def test_bad_set_is_exit_2(tmp_path, run_job, item, needle):
    code, _, err = run_job(sweep, ["--config", SMOKE, "--out", tmp_path / "o", "--set", item])
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.slow
def test_asha_sweep_settles_every_trial(ray_local, run_job, tmp_path):
    """ASHA on the per-pass test accuracy that each trial's Ray Train reports reach Tune with:
    every trial ends finished (metrics.json) or stopped early (stopped-early.json, kept by a
    rerun), and the sweep counts as complete."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(name="asha", train={"epochs": 3}, asha={"grace_period": 1, "reduction_factor": 4})
    spec["param_space"]["selector"] = ["random", "topk:el2n", "geda:gradnorm_init"]
    spec["param_space"]["fraction"] = [0.1, 0.3]
    spec["resources"] = {"cpus_per_trial": 0.95}
    cfg = tmp_path / "asha.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out = tmp_path / "asha"
    code, stdout, err = run_job(sweep, ["--config", cfg, "--out", out, "--no-report"])
    assert code == 0, err
    trials = expand_trials(sweep_from_dict(spec))
    finished = {t["key"] for t in trials if (out / "trials" / t["key"] / "metrics.json").is_file()}
    stopped = {t["key"] for t in trials if (out / "trials" / t["key"] / STOPPED).is_file()}
    assert finished | stopped == {t["key"] for t in trials} and not finished & stopped
    assert finished and stopped  # ASHA cut some at rung 1; the best ran all 3 passes and kept their results
    info = json.loads((out / "sweep.json").read_text())
    assert info["complete"] and sorted(info["stopped_early"]) == sorted(stopped)
    assert len(pq.read_table(out / "results.parquet")) == len(finished)
    code, stdout, err = run_job(sweep, ["--config", cfg, "--out", out, "--no-report"])
    assert code == 0 and "not rerun" in stdout


def test_orphaned_placement_groups_are_reclaimed(ray_local):
    """A placement group created by an actor outlives the actor (its lifetime is the job's):
    the reclaimer removes it once its creator is dead, and leaves alone the groups of live
    actors and of the driver. Fails if a stopped trial's Train workers' CPUs stay reserved."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from engine.distributed.tune import (
        ReclaimOrphanedPlacementGroups,
        orphaned_placement_groups,
        reclaim_orphaned_placement_groups,
    )

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            pg = placement_group([{"CPU": 0.1}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    dead, alive = Creator.remote(), Creator.remote()
    dead_pg, alive_pg = ray.get(dead.make.remote()), ray.get(alive.make.remote())
    driver_pg = placement_group([{"CPU": 0.1}])
    ray.get(driver_pg.ready(), timeout=60)
    try:
        assert dead_pg not in orphaned_placement_groups()
        ray.kill(dead)
        deadline = time.monotonic() + 30
        while dead_pg not in orphaned_placement_groups() and time.monotonic() < deadline:
            time.sleep(0.2)
        orphans = orphaned_placement_groups()
        assert dead_pg in orphans and alive_pg not in orphans and driver_pg.id.hex() not in orphans
        cb = ReclaimOrphanedPlacementGroups()
        cb.on_trial_complete(0, [], None)
        assert dead_pg in cb.reclaimed
        assert ray.util.placement_group_table()[dead_pg]["state"] == "REMOVED"
        assert ray.util.placement_group_table()[alive_pg]["state"] == "CREATED"
    finally:
        ray.kill(alive)
        remove_placement_group(driver_pg)
        deadline = time.monotonic() + 30  # leave the shared Ray with its CPUs free
        while alive_pg not in reclaim_orphaned_placement_groups() and time.monotonic() < deadline:
            time.sleep(0.2)


def test_asha_stops_trailing_trials_but_never_at_the_last_pass():
    """Stock ASHA STOPs every trial at max_t, and Tune then kills it before its function
    writes metrics.json; ours cuts trailing trials at earlier rungs only."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from engine.distributed.tune import asha_scheduler

    sched = asha_scheduler(passes=3, grace_period=1, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(3)]
    for t in trials:
        sched.on_trial_add(None, t)

    def report(t, it, acc):
        return sched.on_trial_result(None, t, {"training_iteration": it, "test_accuracy": acc})

    assert report(trials[0], 1, 0.9) == TrialScheduler.CONTINUE
    assert report(trials[1], 1, 0.1) == TrialScheduler.STOP  # trails the first at rung 1
    assert report(trials[2], 1, 0.95) == TrialScheduler.CONTINUE
    assert report(trials[0], 2, 0.91) == TrialScheduler.CONTINUE
    assert report(trials[2], 2, 0.10) == TrialScheduler.STOP  # trails at rung 2
    assert report(trials[0], 3, 0.92) == TrialScheduler.CONTINUE  # its last pass: it finishes
    # a rung at the last pass does not cut either
    sched = asha_scheduler(passes=2, grace_period=1, reduction_factor=2)
    for t in trials:
        sched.on_trial_add(None, t)
    report(trials[0], 1, 0.9), report(trials[1], 1, 0.95)
    report(trials[1], 2, 0.96)
    assert report(trials[0], 2, 0.5) == TrialScheduler.CONTINUE


def test_reselect_every_and_warm_start_are_grid_keys(tmp_path):
    """R = 0 trials train on a manifest chosen before training; R > 0 trials choose in the run
    (no manifest), each warm start its own trial; the full-data baseline stays once per seed;
    each adaptive trial's TrainConfig carries its selector, fraction, R, warm start and the
    sweep's selector parameters."""
    from engine.sweep.trials import offline

    spec = yaml.safe_load(SMOKE.read_text())
    spec["param_space"].update(selector=["full", "gradmatch", "random"], fraction=[0.1], seed=[0],
                               reselect_every=[0, 5], warm_start=["none", "full:2"])
    spec["selector_params"] = {"gradmatch": {"lam": 0.25}}
    cfg = sweep_from_dict(spec)
    trials = expand_trials(cfg)
    keys = [t["key"] for t in trials]
    assert keys == ["full-s0", "gradmatch-f0.1-s0", "gradmatch-r5-f0.1-s0", "gradmatch-r5-wfull2-f0.1-s0",
                    "random-f0.1-s0", "random-r5-f0.1-s0", "random-r5-wfull2-f0.1-s0"]
    by = {t["key"]: t for t in trials}
    assert [k for k in keys if offline(by[k])] == ["gradmatch-f0.1-s0", "random-f0.1-s0"]
    assert by["gradmatch-r5-wfull2-f0.1-s0"]["label"] == "gradmatch R=5 warm full:2"
    tc = trial_train_config(cfg, cfg.base_train_config(), by["gradmatch-r5-wfull2-f0.1-s0"], tmp_path)
    assert tc.manifest is None and tc.adaptive.every == 5 and tc.adaptive.selector == "gradmatch"
    assert tc.adaptive.fraction == 0.1 and tc.adaptive.warm_start == "full:2" and tc.adaptive.params == {"lam": 0.25}
    off = trial_train_config(cfg, cfg.base_train_config(), by["gradmatch-f0.1-s0"], tmp_path)
    assert off.manifest.endswith("gradmatch-f0.1-s0.parquet") and not off.adaptive.every
    spec["param_space"]["warm_start"] = ["half:2"]
    with pytest.raises(ConfigError, match=r"warm_start\[0\]"):
        sweep_from_dict(spec)


def test_the_adaptive_sweep_smoke_runs_offline_adaptive_and_infobatch_trials(ray_local, run_job, tmp_path):
    """tune_configs/adaptive.yaml --smoke-test: offline, adaptive (cold and GEDA warm start) and
    InfoBatch trials side by side; each trial's results carry what it cost."""
    out = tmp_path / "adaptive"
    code, _, err = run_job(sweep, ["--config", ROOT / "tune_configs" / "adaptive.yaml", "--smoke-test", "--out", out])
    assert code == 0, err
    rows = {r["trial_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert sorted(rows) == sorted(["full-s0", "gradmatch-f0.3-s0", "gradmatch-r2-f0.3-s0", "gradmatch-r2-wgeda-f0.3-s0",
                                   "geda-gradnorm_init-f0.3-s0", "geda-gradnorm_init-r2-f0.3-s0",
                                   "geda-gradnorm_init-r2-wgeda-f0.3-s0", "infobatch-r1-s0"])
    full, ib = rows["full-s0"], rows["infobatch-r1-s0"]
    assert ib["label"] == "infobatch" and ib["reselect_every"] == 1 and ib["fraction"] == 1.0
    assert ib["samples_seen"] < full["samples_seen"] and ib["selection_time_s"] < 1
    for key in ("gradmatch-r2-f0.3-s0", "geda-gradnorm_init-r2-wgeda-f0.3-s0"):
        r = rows[key]
        assert r["selection_time_s"] > 0 and r["cost_s"] == pytest.approx(r["train_time_s"] + r["selection_time_s"])
        m = json.loads((out / r["trial_dir"] / "metrics.json").read_text())
        assert [x["epoch"] for x in m["reselections"]] == [1, 3]
    warm = json.loads((out / "trials" / "geda-gradnorm_init-r2-wgeda-f0.3-s0" / "metrics.json").read_text())
    assert warm["reselections"][0]["selector"] == "geda (warm start)" and "match_error" in warm["reselections"][1]
    # an offline trial's selection: the score table's proxy training and scoring and its solve
    offline = rows["gradmatch-f0.3-s0"]
    assert offline["selection_time_s"] > 0
    assert offline["cost_s"] == pytest.approx(offline["train_time_s"] + offline["selection_time_s"])
    # random reads no score: its subset costs its draw only, not the score table
    from engine.sweep.results import collect

    t = {"selector": "random", "column": None, "label": "random", "selection": "random", "fraction": 0.3, "seed": 0,
         "curvature_lambda": 0.0, "variant": "standard", "reselect_every": 0, "warm_start": "none",
         "key": "gradmatch-f0.3-s0"}  # borrows a finished trial's metrics
    (r_random,) = collect([t], out, str(out / "scores" / "scores.parquet"))
    assert r_random["selection_time_s"] < 1 < offline["selection_time_s"]
    assert (out / "report" / "accuracy_vs_cost.png").is_file()
    assert "Test accuracy vs what the run cost" in (out / "report" / "report.html").read_text()


def test_the_fashion_mnist_study_smoke_runs(ray_local, run_job, tmp_path):
    """tune_configs/fashion_mnist_cpu.yaml --smoke-test: offline selectors with the input-norm
    baseline, adaptive and InfoBatch trials, the λ grid and the steps budget side by side, with
    the augmentation recipe; the report carries the score correlations and the steps rows."""
    path = ROOT / "tune_configs" / "fashion_mnist_cpu.yaml"
    out = tmp_path / "study"
    code, _, err = run_job(sweep, ["--config", path, "--smoke-test", "--out", out])
    assert code == 0, err
    rows = {r["trial_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert sorted(rows) == sorted(t["key"] for t in expand_trials(load_sweep(str(path), True)))
    full, steps, epochs = rows["full-s0"], rows["random-f0.3-bsteps-s0"], rows["random-f0.3-s0"]
    assert steps["label"] == "random (steps)" and steps["budget"] == "steps" and epochs["budget"] == "epochs"
    assert steps["train_size"] == epochs["train_size"] == 1800 and steps["manifest"] == epochs["manifest"]
    assert steps["steps"] == full["steps"] > epochs["steps"]  # the full-data run's optimizer steps
    assert rows["lowest-curvature-f0.3-s0-l1"]["curvature_lambda"] == 1.0
    assert rows["gradmatch-r1-f0.3-s0"]["selection_time_s"] > 0 and rows["infobatch-r1-s0"]["label"] == "infobatch"
    m = json.loads((out / full["trial_dir"] / "metrics.json").read_text())
    assert m["config"]["train_transform"] == "pad-crop-flip"
    page = (out / "report" / "report.html").read_text()
    assert "GraNd at initialisation (gradnorm_init) against the input norm (input_norm)" in page
    assert "random (steps)" in page
