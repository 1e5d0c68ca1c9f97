"""The sweep stage: one score table, a manifest per (selector, fraction, seed), the Tune grid of
retraining runs, the results and the report.

``plan_sweep(SweepConfig, out)`` checks everything that needs no Ray (the output, the data, the
score table or score config, every trial's config and every variant's model);
``sweep_stage(SweepConfig, out)`` then runs the stages in a Ray session. Rerunning into the same
directory resumes: the scores and manifests are reused, a finished trial is not trained again,
and an interrupted one resumes from its last Ray Train checkpoint.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Sequence

from engine import artifacts
from engine.config import ScoreConfig, SelectConfig, TrainConfig
from engine.errors import RunFailedError
from engine.rundir import output_dir
from engine.sweep.config import SweepConfig
from engine.sweep.results import SELECT_SECONDS, as_dict, check_same_sweep, collect, fingerprint, summary, write_results
from engine.sweep.trials import expand_trials, manifest_name, offline, trial_train_config

STOPPED = "stopped-early.json"  # ASHA stopped this trial: a rerun does not train it again


@dataclass(frozen=True)
class SweepPlan:
    trials: List[dict]
    base: TrainConfig
    score: Optional[ScoreConfig]  # None: the YAML's scores_path, or no selector needs scores
    source: Any = None            # the data source check_inputs read for the score config (listed once)


def plan_sweep(cfg: SweepConfig, out: Path) -> SweepPlan:
    """Everything checked before Ray starts: the output, the score inputs, every trial's
    config, and each variant's model built once on the data."""
    from engine.stages.score import check_inputs
    from engine.stages.train import load_subset
    from engine.storage import check_output

    check_output(out, "--out")
    trials = expand_trials(cfg)
    base = cfg.base_train_config()
    score, source = None, None
    if cfg.scores_path:
        artifacts.read_scores(cfg.scores_path)
    elif any(offline(t) for t in trials):
        score = cfg.score_config(out)
        source = check_inputs(score)
    configs = [trial_train_config(cfg, base, t, out) for t in trials]
    for variant in dict.fromkeys(t["variant"] for t in trials):
        tc = next(c for c, t in zip(configs, trials) if t["variant"] == variant)
        load_subset(replace(tc, manifest=None))
    return SweepPlan(trials, base, score, source)


def sweep_stage(cfg: SweepConfig, out: Path, config_file: str, *, report: bool = True,
                planned: Optional[SweepPlan] = None) -> list:
    """The stages; assumes a Ray session. Returns the result rows (also OUT/results.parquet,
    results.csv, sweep.json and, with ``report``, OUT/report)."""
    t0 = time.time()
    p = planned or plan_sweep(cfg, out)
    with output_dir(out, keep=("_partial", "scores", "manifests", "trials", "tune")):
        (out / "sweep.json").unlink(missing_ok=True)
        check_same_sweep(out, fingerprint(cfg, p.trials))
        scores = _scores(cfg, p.score, p.source)
        _manifests(cfg, p.trials, scores, out)
        errors = _tune(cfg, p, out)
        rows = collect(p.trials, out, scores)
        if rows:
            write_results(rows, out)
        missing = [t["key"] for t in p.trials if not (out / "trials" / t["key"] / "metrics.json").is_file()]
        stopped = [k for k in missing if (out / "trials" / k / STOPPED).is_file()]
        if len(missing) > len(stopped):
            raise RunFailedError(f"{len(missing)} of {len(p.trials)} trial(s) did not finish "
                                 f"({'; '.join(errors[:3]) or ', '.join(missing[:5])}); "
                                 f"finished ones are kept: rerun the same command to resume")
        artifacts.write_json(out / "sweep.json", {
            "name": cfg.name, "config_file": config_file, "config": as_dict(cfg),
            "scores": None if scores is None else _rel(scores, out), "data": p.base.data, "model": p.base.model,
            "trials": len(p.trials), "finished": len(rows), "unfinished": missing, "stopped_early": stopped,
            "errors": errors, "complete": True, "wall_time_s": time.time() - t0,
            "environment": artifacts.environment()})
    print(summary(rows))
    print(f"sweep {cfg.name}: {len(rows)}/{len(p.trials)} trials finished in {time.time() - t0:.0f}s -> "
          f"{out / 'results.parquet'}" + (f" ({len(stopped)} stopped early by ASHA)" if stopped else ""))
    if report and rows:
        from engine.report import build_report

        print(build_report(str(out)))
    return rows


def _scores(cfg: SweepConfig, score: Optional[ScoreConfig], source=None) -> Optional[str]:
    if cfg.scores_path:
        print(f"== scores: reusing {cfg.scores_path}")
        return str(cfg.scores_path)
    if score is None:
        return None
    from engine.stages.score import score_stage

    done = Path(score.out) / "scores.parquet"
    if done.is_file():
        print(f"== scores: reusing {done} (computed by an earlier run of this sweep)")
        return str(done)
    print("== scores: proxy training and scoring (once for the whole sweep)")
    return str(score_stage(score, source))


def _manifests(cfg: SweepConfig, trials: Sequence[dict], scores: Optional[str], out: Path) -> None:
    from engine.stages import select_stage

    todo = {manifest_name(t): t for t in trials if offline(t)}
    print(f"== selection: {len(todo)} manifest(s)")
    seconds_file = out / "manifests" / SELECT_SECONDS
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    for name, t in todo.items():
        path = out / "manifests" / name
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        params = dict(cfg.selector_params.get(t["selector"]) or {})
        r = select_stage(SelectConfig(scores=scores, selector=t["selector"], fraction=t["fraction"], out=str(path),
                                      column=t["column"], seed=t["seed"], params=params))
        print(r.summary)
        seconds[name] = round(r.seconds, 4)
        artifacts.write_json(seconds_file, seconds)


def settled(out: Path, t: dict) -> bool:
    """Whether trial ``t`` has a result or was stopped early: a rerun does not train it."""
    d = out / "trials" / t["key"]
    return (d / "metrics.json").is_file() or (d / STOPPED).is_file()


def _tune(cfg: SweepConfig, p: SweepPlan, out: Path) -> List[str]:
    """Tune over the trials without a result yet (all of them on a first run); a trial that
    an earlier run left unfinished resumes from its Ray Train checkpoints."""
    from engine.distributed.in_process import trial_executor
    from engine.distributed.tune import TRIAL_CPU, concurrency, run_tuner, train_trial, trial_errors

    todo = [t for t in p.trials if not settled(out, t)]
    if len(todo) < len(p.trials):
        print(f"== tune: {len(p.trials) - len(todo)} of {len(p.trials)} trial(s) finished in an earlier run; not rerun")
    if not todo:
        return []
    r = cfg.resources
    executor = trial_executor(p.base, int(r.workers_per_trial), p.source)
    here = executor == "in-process"  # the trial trains in its own process: it reserves the trial's resources
    n = concurrency(float(r.cpus_per_trial), float(r.gpus_per_trial), int(r.max_concurrent_trials),
                    own=0.0 if here else TRIAL_CPU)
    resources = {"CPU": float(r.cpus_per_trial), **({"GPU": float(r.gpus_per_trial)} if r.gpus_per_trial else {})} \
        if here else None
    print(f"== tune: {len(todo)} trial(s), {n} at a time ({executor}); results under {out / 'tune' / cfg.name}")
    asha = None if cfg.asha is None else {"grace_period": cfg.asha.grace_period,
                                          "reduction_factor": float(cfg.asha.reduction_factor)}
    grid = run_tuner(train_trial, todo, params={"cfg": cfg, "out": str(out.resolve()), "executor": executor},
                     storage=str((out / "tune").resolve()), name=cfg.name, max_concurrent=n, asha=asha,
                     max_t=p.base.epochs, resources=resources)
    if asha:
        _mark_stopped(grid, out)
    return trial_errors(grid)


def _mark_stopped(grid, out: Path) -> None:
    """A trial ASHA stopped (no error, no result) is recorded as such: a rerun leaves it."""
    for res in grid:
        t = (res.config or {}).get("trial")
        if t and res.error is None and not settled(out, t):
            (out / "trials" / t["key"]).mkdir(parents=True, exist_ok=True)
            metrics = {k: v for k, v in (res.metrics or {}).items()
                       if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
            artifacts.write_json(out / "trials" / t["key"] / STOPPED, {"stopped_by": "ASHA", "last_metrics": metrics})


def trial_result(cfg: SweepConfig, t: dict, out: Path) -> tuple:
    """(trial t's TrainConfig, its earlier metrics.json or None)."""
    tc = trial_train_config(cfg, cfg.base_train_config(), t, out)
    done = Path(tc.out) / "metrics.json"
    return tc, (json.loads(done.read_text()) if done.is_file() else None)


def _rel(path: str, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)
