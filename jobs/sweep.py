"""Sweep selectors x fractions x seeds x λ x model variants on Ray Tune; one score table for all.

    python -m jobs.sweep --config tune_configs/smoke.yaml            # seconds to minutes on 2 cores
    python -m jobs.sweep --config tune_configs/fashion_mnist_selectors.yaml --out runs/selectors
    python -m jobs.sweep --config tune_configs/smoke.yaml --smoke-test   # any config, shrunk

Stages: 1 the score table (computed once with jobs.score into OUT/scores, or the YAML's
``scores_path``; trials never re-score), 2 one manifest per (selector, fraction, seed) with
the selection stage into OUT/manifests, 3 the Tune grid: one trial per retraining run, each a Tune
function that builds and fits a TorchTrainer (jobs.train's run, into OUT/trials/<key>),
4 OUT/results.parquet and results.csv (a row per finished trial), OUT/sweep.json, and the
report (jobs.report) in OUT/report. Tune's own results, including TensorBoard event files, are
under OUT/tune/<name>. Rerunning the same command resumes: the score run and manifests are
reused, Tune restores its experiment, a finished trial is not trained again, and an
interrupted one resumes from its last Ray Train checkpoint.

The YAML (see tune_configs/smoke.yaml): ``name``, ``data``, ``model``, ``score`` (jobs.score
fields), ``scores_path``, ``train`` (jobs.train fields shared by all trials), ``param_space``
(lists to grid over: ``selector``, ``fraction``, ``seed``, ``curvature_lambda``, ``variant``),
``variants`` (name -> model options and gradreg), ``selector_params`` (selector -> params),
``resources`` (``cpus_per_trial``, ``gpus_per_trial``, ``workers_per_trial``,
``max_concurrent_trials``), ``asha`` (null or ``{grace_period, reduction_factor}``) and
``smoke_test`` (overrides applied by --smoke-test).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from engine import artifacts
from engine.config import ScoreConfig, TrainConfig, from_dict
from engine.errors import ConfigError, RunFailedError
from engine.params import Rule, at_least, check_value, positive
from engine.select import check_selector_params
from jobs._cli import Parser, entry, output_dir

TOP_KEYS = {"name", "data", "model", "score", "scores_path", "train", "param_space", "variants",
            "selector_params", "resources", "asha", "smoke_test", "description"}
GRID_KEYS = ("selector", "fraction", "seed", "curvature_lambda", "variant")
VARIANT_KEYS = {"activation", "beta", "spectral_norm", "bn_gamma", "lcnn", "gradreg"}
RESOURCE_KEYS = {"cpus_per_trial", "gpus_per_trial", "workers_per_trial", "max_concurrent_trials"}
# per-trial fields the grid sets; the YAML's `train` section must not
TRIAL_FIELDS = {"data", "model", "manifest", "seed", "curvature_lambda", "activation", "beta", "spectral_norm",
                "bn_gamma", "gradreg", "workers", "gpus", "cpus_per_worker", "out"}


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML, e.g. tune_configs/smoke.yaml")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<name>)")
    p.add_argument("--smoke-test", action="store_true", help="apply the YAML's smoke_test overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, dotted key and YAML value, e.g. --set param_space.seed=[0] "
                        "--set train.epochs=3 (repeatable; applied after --smoke-test)")
    p.add_argument("--no-report", action="store_true", help="skip jobs.report at the end")
    return p


# ---------------------------------------------------------------- the YAML


def parse_overrides(items: Sequence[str]) -> dict:
    """``["train.epochs=3", "param_space.seed=[0, 1]"]`` -> a nested dict of YAML values."""
    import yaml

    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=3")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is set twice")
        node[leaf] = parsed
    return out


def load_spec(path: str, smoke: bool, overrides: Optional[dict] = None) -> dict:
    """Read and check the sweep YAML; with ``smoke`` merge its ``smoke_test`` section in, then
    ``overrides`` (from ``--set``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path!r}: no such file")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping at the top level")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"--config {path!r}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    if smoke:
        spec = _merge(spec, spec.get("smoke_test") or {})
    spec.pop("smoke_test", None)
    if overrides:
        unknown = sorted(set(overrides) - TOP_KEYS)
        if unknown:
            raise ConfigError(f"--set: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
        spec = _merge(spec, overrides)
    spec.setdefault("name", p.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(spec["name"])):
        raise ConfigError(f"sweep name {spec['name']!r}: use letters, digits, '_', '.', '-'")
    return spec


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _grid(spec: dict) -> dict:
    ps = spec.get("param_space") or {}
    unknown = sorted(set(ps) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"param_space: unknown key(s) {unknown}; known: {list(GRID_KEYS)}")
    defaults = {"selector": ["full"], "fraction": [1.0], "seed": [0], "curvature_lambda": [0.0],
                "variant": ["standard"]}
    grid = {}
    for k in GRID_KEYS:
        v = ps.get(k, defaults[k])
        v = v if isinstance(v, list) else [v]
        if not v:
            raise ConfigError(f"param_space.{k}: give at least one value")
        grid[k] = v
    return grid


def parse_selection(text: str) -> tuple:
    """``"topk:el2n"`` -> ("topk", "el2n"); ``"full"`` -> ("full", None)."""
    from engine.select import SELECTORS

    name, _, column = str(text).partition(":")
    if name != "full":
        SELECTORS[name]  # unknown -> ConfigError listing the known ones
    return name, column or None


def _variant(spec: dict, name: str) -> dict:
    variants = spec.get("variants") or {"standard": {}}
    if name not in variants:
        raise ConfigError(f"param_space.variant {name!r} is not defined under variants ({sorted(variants)})")
    opts = dict(variants[name] or {})
    unknown = sorted(set(opts) - VARIANT_KEYS)
    if unknown:
        raise ConfigError(f"variants.{name}: unknown key(s) {unknown}; known: {sorted(VARIANT_KEYS)}")
    return opts


def trial_key(t: dict) -> str:
    head = t["label"].replace(":", "-") if t["selector"] != "full" else "full"
    frac = "" if t["selector"] == "full" else f"-f{t['fraction']:g}"
    lam = f"-l{t['curvature_lambda']:g}" if t["curvature_lambda"] else ""
    var = "" if t["variant"] == "standard" else f"-{t['variant']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{head}{frac}-s{t['seed']}{lam}{var}")


def expand_trials(spec: dict) -> List[dict]:
    """The grid as explicit trials; the full-data baseline once per (seed, λ, variant)."""
    from engine.select.quota import check_fraction

    grid, trials, seen = _grid(spec), [], set()
    for i, sel in enumerate(grid["selector"]):
        check_value(f"param_space.selector[{i}]", sel, "")
        name, column = parse_selection(sel)
        for j, frac in enumerate(grid["fraction"]):
            if isinstance(frac, bool) or not isinstance(frac, (int, float)):
                raise ConfigError(f"param_space.fraction[{j}]: expected a number in (0, 1], got {frac!r}")
            f = 1.0 if name == "full" else check_fraction(frac)
            for i, seed in enumerate(grid["seed"]):
                seed = check_value(f"param_space.seed[{i}]", seed, 0, at_least(0))
                for j, lam in enumerate(grid["curvature_lambda"]):
                    lam = check_value(f"param_space.curvature_lambda[{j}]", lam, 0.0, at_least(0))
                    for var in grid["variant"]:
                        _variant(spec, var)
                        t = {"selector": name, "column": column, "label": str(sel), "fraction": f,
                             "seed": seed, "curvature_lambda": lam, "variant": str(var)}
                        t["key"] = trial_key(t)
                        if t["key"] not in seen:
                            seen.add(t["key"])
                            trials.append(t)
    return trials


def base_train_config(spec: dict) -> TrainConfig:
    train = dict(spec.get("train") or {})
    clash = sorted(set(train) & TRIAL_FIELDS)
    if clash:
        raise ConfigError(f"train: {clash} are set per trial (top-level data/model, param_space, variants, "
                          f"resources); remove them from the train section")
    cfg = from_dict(TrainConfig, {**train, "data": spec.get("data", TrainConfig.data),
                                  "model": spec.get("model", TrainConfig.model)})
    return cfg


def score_config(spec: dict, out: Path) -> ScoreConfig:
    score = dict(spec.get("score") or {})
    for k in ("data", "model", "out"):
        if k in score:
            raise ConfigError(f"score.{k}: set by the sweep (top-level data/model, OUT/scores)")
    return from_dict(ScoreConfig, {**score, "data": spec.get("data", ScoreConfig.data),
                                   "model": spec.get("model", ScoreConfig.model), "out": str(out / "scores")})


def resources(spec: dict) -> dict:
    r = {"cpus_per_trial": 1.0, "gpus_per_trial": 0.0, "workers_per_trial": 1, "max_concurrent_trials": 0,
         **(spec.get("resources") or {})}
    unknown = sorted(set(r) - RESOURCE_KEYS)
    if unknown:
        raise ConfigError(f"resources: unknown key(s) {unknown}; known: {sorted(RESOURCE_KEYS)}")
    rules = {"cpus_per_trial": (1.0, positive()), "gpus_per_trial": (0.0, at_least(0)),
             "workers_per_trial": (1, at_least(1)), "max_concurrent_trials": (0, at_least(0))}
    return {k: check_value(f"resources.{k}", r[k], *rules[k]) for k in r}


def check_asha(asha) -> Optional[dict]:
    """``asha``: null, or ``{grace_period: passes >= 1, reduction_factor: > 1}``."""
    if asha is None or asha is False:
        return None
    if not isinstance(asha, dict):
        raise ConfigError(f"asha must be null or a mapping with grace_period and reduction_factor, got {asha!r}")
    unknown = sorted(set(asha) - {"grace_period", "reduction_factor"})
    if unknown:
        raise ConfigError(f"asha: unknown key(s) {unknown}; known: ['grace_period', 'reduction_factor']")
    return {"grace_period": check_value("asha.grace_period", asha.get("grace_period", 1), 1, at_least(1)),
            "reduction_factor": check_value("asha.reduction_factor", asha.get("reduction_factor", 2), 2.0,
                                            Rule(lo=1, lo_open=True))}


def check_spec(spec: dict) -> None:
    """The YAML's types and ranges, section by section, before anything runs (the per-trial
    and per-stage configs are checked by ``plan`` as they are built)."""
    for k in ("name", "data", "model", "description", "scores_path"):
        if spec.get(k) is not None and not isinstance(spec[k], str):
            raise ConfigError(f"{k} must be a string, got {spec[k]!r}")
    for k in ("score", "train", "param_space", "variants", "selector_params", "resources"):
        if spec.get(k) is not None and not isinstance(spec[k], dict):
            raise ConfigError(f"{k} must be a mapping, got {spec[k]!r}")
    check_asha(spec.get("asha"))
    resources(spec)
    for name, params in (spec.get("selector_params") or {}).items():
        check_selector_params(str(name), dict(params or {}) if isinstance(params, dict) else params)
    for name, opts in (spec.get("variants") or {}).items():
        if opts is not None and not isinstance(opts, dict):
            raise ConfigError(f"variants.{name} must be a mapping of model options, got {opts!r}")
        if "lcnn" in (opts or {}) and not isinstance(opts["lcnn"], bool):
            raise ConfigError(f"variants.{name}.lcnn must be true or false, got {opts['lcnn']!r}")


def trial_train_config(base: TrainConfig, t: dict, spec: dict, out: Path) -> TrainConfig:
    opts = _variant(spec, t["variant"])
    if opts.pop("lcnn", False):
        from engine.models.lcnn import LCNN_DEFAULTS

        opts = {"activation": LCNN_DEFAULTS["activation"], "beta": LCNN_DEFAULTS["beta"], "spectral_norm": True,
                "bn_gamma": LCNN_DEFAULTS["bn_gamma"], **opts}
    r = resources(spec)
    workers = int(r["workers_per_trial"])
    manifest = None if t["selector"] == "full" else str(out / "manifests" / manifest_name(t))
    cfg = replace(base, manifest=manifest, seed=t["seed"], curvature_lambda=t["curvature_lambda"], workers=workers,
                  gpus=float(r["gpus_per_trial"]) / workers,
                  cpus_per_worker=float(r["cpus_per_trial"]) / workers, out=str(out / "trials" / t["key"]), **opts)
    cfg.validate()
    return cfg


def manifest_name(t: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{t['label'].replace(':', '-')}-f{t['fraction']:g}-s{t['seed']}") + ".parquet"


def plan(spec: dict, out: Path):
    """Everything checked before Ray starts: names, fields, data, models."""
    from engine.stages.score import check_inputs
    from engine.stages.train import load_subset
    from engine.storage import check_output

    check_output(out, "--out")
    check_spec(spec)
    trials = expand_trials(spec)
    base = base_train_config(spec)
    score_cfg = None
    if spec.get("scores_path"):
        artifacts.read_scores(spec["scores_path"])
    elif any(t["selector"] != "full" for t in trials):
        score_cfg = score_config(spec, out)
        from engine.scores import parse_score_names

        parse_score_names(list(score_cfg.scores))
        check_inputs(score_cfg)
    for t in trials:  # every variant builds (model options are checked by building the model once)
        trial_train_config(base, t, spec, out)
    seen_variants = {}
    for t in trials:
        if t["variant"] not in seen_variants:
            seen_variants[t["variant"]] = True
            load_subset(replace(trial_train_config(base, t, spec, out), manifest=None))
    return trials, base, score_cfg


# ---------------------------------------------------------------- stages


def stage_scores(spec: dict, score_cfg: Optional[ScoreConfig]) -> Optional[str]:
    if spec.get("scores_path"):
        print(f"== scores: reusing {spec['scores_path']}")
        return str(spec["scores_path"])
    if score_cfg is None:
        return None
    from engine.stages.score import score_stage

    done = Path(score_cfg.out) / "scores.parquet"
    if done.is_file():
        print(f"== scores: reusing {done} (computed by an earlier run of this sweep)")
        return str(done)
    print("== scores: proxy training and scoring (once for the whole sweep)")
    return str(score_stage(score_cfg))


def stage_manifests(spec: dict, trials: Sequence[dict], scores: Optional[str], out: Path) -> None:
    from engine.config import SelectConfig
    from engine.stages import select_stage

    params = spec.get("selector_params") or {}
    todo = {manifest_name(t): t for t in trials if t["selector"] != "full"}
    print(f"== selection: {len(todo)} manifest(s)")
    for name, t in todo.items():
        path = out / "manifests" / name
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        print(select_stage(SelectConfig(scores=scores, selector=t["selector"], fraction=t["fraction"], out=str(path),
                                        column=t["column"], seed=t["seed"],
                                        params=dict(params.get(t["selector"]) or {}))).summary)


def run_trial(config: dict, spec: dict, out: str) -> None:
    """One Tune trial: jobs.train's run on the trial's manifest, its Ray Train reports
    forwarded to Tune. A trial whose metrics.json exists (an earlier run finished it) is not
    trained again: its final metrics are reported as they are."""
    from engine.distributed.tune import report_callbacks, report_to_tune
    from engine.stages.train import train_stage

    t = config["trial"]
    cfg = trial_train_config(base_train_config(spec), t, spec, Path(out))
    done = Path(cfg.out) / "metrics.json"
    if done.is_file():
        m = json.loads(done.read_text())
        report_to_tune({"test_accuracy": m["test_accuracy"], "passes": m["passes"], "reused": True})
        return
    train_stage(cfg, callbacks=report_callbacks())


STOPPED = "stopped-early.json"  # ASHA stopped this trial: a rerun does not train it again


def _settled(out: Path, t: dict) -> bool:
    d = out / "trials" / t["key"]
    return (d / "metrics.json").is_file() or (d / STOPPED).is_file()


def stage_tune(spec: dict, trials: Sequence[dict], base: TrainConfig, out: Path) -> List[str]:
    """Tune over the trials without a result yet (all of them on a first run); a trial that
    an earlier run left unfinished resumes from its Ray Train checkpoints."""
    from engine.distributed.tune import concurrency, run_tuner, trial_errors

    todo = [t for t in trials if not _settled(out, t)]
    if len(todo) < len(trials):
        print(f"== tune: {len(trials) - len(todo)} of {len(trials)} trial(s) finished in an earlier run; not rerun")
    if not todo:
        return []
    r = resources(spec)
    n = concurrency(float(r["cpus_per_trial"]), float(r["gpus_per_trial"]), int(r["max_concurrent_trials"]))
    print(f"== tune: {len(todo)} trial(s), {n} at a time; results under {out / 'tune' / spec['name']}")
    grid = run_tuner(run_trial, todo, params={"spec": spec, "out": str(out.resolve())},
                     storage=str((out / "tune").resolve()), name=spec["name"], max_concurrent=n,
                     asha=check_asha(spec.get("asha")), max_t=base.epochs)
    errors = trial_errors(grid)
    if spec.get("asha"):
        for res in grid:
            t = (res.config or {}).get("trial")
            if t and res.error is None and not _settled(out, t):
                (out / "trials" / t["key"]).mkdir(parents=True, exist_ok=True)
                artifacts.write_json(out / "trials" / t["key"] / STOPPED,
                                     {"stopped_by": "ASHA", "last_metrics": _plain(res.metrics or {})})
    return errors


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}


def collect(trials: Sequence[dict], out: Path) -> list:
    """A row per finished trial (its metrics.json), in the grid's order."""
    rows = []
    for t in trials:
        path = out / "trials" / t["key"] / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        g = m.get("geometry") or {}
        r = m.get("robust_accuracy") or {}
        row = {"trial_id": t["key"], "selector": t["selector"], "column": t["column"], "label": t["label"],
               "fraction": float(t["fraction"]), "seed": int(t["seed"]),
               "curvature_lambda": float(t["curvature_lambda"]), "gradreg": float(m["config"]["gradreg"]),
               "model_options": json.dumps(m.get("model_options") or {}, sort_keys=True), "variant": t["variant"],
               "budget": m["budget"], "test_accuracy": float(m["test_accuracy"]), "train_size": int(m["train_size"]),
               "steps": int(m["steps"]), "samples_seen": int(m["samples_seen"]),
               "train_time_s": float(m.get("train_time_s") or np.nan), "wall_time_s": float(m["wall_time_s"]),
               "grad_norm": float(g.get("grad_norm", np.nan)), "hessian_norm": float(g.get("hessian_norm", np.nan)),
               "normalized_curvature": float(g.get("normalized_curvature", np.nan)),
               "manifest": None if t["selector"] == "full" else f"manifests/{manifest_name(t)}",
               "trial_dir": f"trials/{t['key']}"}
        for eps, acc in r.items():
            if eps != "0":
                row[f"pgd_{eps}"] = float(acc)
        rows.append(row)
    return rows


def write_results(rows: list, out: Path) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    cols = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("pgd_"), list(rows[0]).index(k)
                                                               if k in rows[0] else 99, k))
    table = pa.table({c: [r.get(c, np.nan if c.startswith("pgd_") else None) for r in rows] for c in cols})
    artifacts.write_table(out / "results.parquet", table, {"kind": "sweep_results"})
    buf = pa.BufferOutputStream()
    pacsv.write_csv(table, buf)
    artifacts.atomic_write_bytes(out / "results.csv", buf.getvalue().to_pybytes())


def summary(rows: list) -> str:
    """Mean ± std of test accuracy per (label, variant, λ, fraction) over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["label"], r["variant"], r["curvature_lambda"], r["fraction"]), []).append(r["test_accuracy"])
    lines = ["| selector | variant | λ | fraction | test accuracy (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
    for (label, var, lam, frac), accs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0])):
        a = np.asarray(accs)
        lines.append(f"| {label} | {var} | {lam:g} | {frac:.2f} | {a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f} "
                     f"| {len(a)} |")
    return "\n".join(lines)


def fingerprint(spec: dict, trials: Sequence[dict]) -> str:
    d = {k: v for k, v in spec.items() if k not in ("resources", "description")}
    return hashlib.sha256(json.dumps([d, list(trials)], sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_sweep(out: Path, fp: str) -> None:
    """A sweep directory belongs to one sweep: resuming a different grid into it would mix
    results (and Tune would restore the old grid)."""
    mark = out / "_partial" / "sweep-fingerprint"
    if mark.is_file() and mark.read_text().strip() != fp:
        raise ConfigError(f"--out {str(out)!r} holds a different sweep (another YAML or --smoke-test); "
                          f"use another --out or delete it")
    mark.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(mark, fp.encode())


def run_sweep(spec: dict, out: Path, config_file: str, report: bool = True, planned: Optional[tuple] = None) -> list:
    """The stages; assumes a Ray session. ``planned``: ``plan(spec, out)`` if already done.
    Returns the result rows."""
    t0 = time.time()
    trials, base, score_cfg = planned or plan(spec, out)
    with output_dir(out, keep=("_partial", "scores", "manifests", "trials", "tune")):
        (out / "sweep.json").unlink(missing_ok=True)
        check_same_sweep(out, fingerprint(spec, trials))
        scores = stage_scores(spec, score_cfg)
        stage_manifests(spec, trials, scores, out)
        errors = stage_tune(spec, trials, base, out)
        rows = collect(trials, out)
        if rows:
            write_results(rows, out)
        missing = [t["key"] for t in trials if not (out / "trials" / t["key"] / "metrics.json").is_file()]
        stopped = [k for k in missing if (out / "trials" / k / STOPPED).is_file()]
        info = {"name": spec["name"], "config_file": config_file, "config": spec,
                "scores": None if scores is None else _rel(scores, out), "data": base.data, "model": base.model,
                "trials": len(trials), "finished": len(rows), "unfinished": missing, "stopped_early": stopped,
                "errors": errors, "complete": len(missing) == len(stopped), "wall_time_s": time.time() - t0,
                "environment": artifacts.environment()}
        if len(missing) > len(stopped):
            raise RunFailedError(f"{len(missing)} of {len(trials)} trial(s) did not finish ({'; '.join(errors[:3]) or ', '.join(missing[:5])}); "
                                 f"finished ones are kept: rerun the same command to resume")
        artifacts.write_json(out / "sweep.json", info)
    print(summary(rows))
    print(f"sweep {spec['name']}: {len(rows)}/{len(trials)} trials finished in {time.time() - t0:.0f}s -> "
          f"{out / 'results.parquet'}" + (f" ({len(stopped)} stopped early by ASHA)" if stopped else ""))
    if report and rows:
        _report(out)
    return rows


def _rel(path: str, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _report(out: Path) -> None:
    from jobs import report

    report.main([str(out)])


def main(argv: Sequence[str]) -> None:
    a = build_parser().parse_args(argv)
    spec = load_spec(a.config, a.smoke_test, parse_overrides(a.set))
    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.storage import check_output, staged_output

    target = a.out or f"runs/sweeps/{spec['name']}"
    check_output(target, "--out")
    check_spec(spec)  # the whole YAML before the run directory is touched
    with staged_output(target) as local, run_lock(local, "jobs.sweep"):
        out = Path(local)
        planned = plan(spec, out)  # a bad YAML fails here, before Ray starts
        with ray_session():
            run_sweep(spec, out, a.config, report=not a.no_report, planned=planned)


if __name__ == "__main__":
    entry("jobs.sweep", main)
