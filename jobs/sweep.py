"""Sweep selectors x fractions x seeds x λ x model variants on Ray Tune; one score table for all.

    python -m jobs.sweep --config tune_configs/smoke.yaml            # seconds to minutes on 2 cores
    python -m jobs.sweep --config tune_configs/fashion_mnist_selectors.yaml --out runs/selectors
    python -m jobs.sweep --config tune_configs/smoke.yaml --smoke-test   # any config, shrunk

Stages (engine.stages.sweep_stage): 1 the score table (computed once into OUT/scores, or the
YAML's ``scores_path``; trials never re-score), 2 one manifest per (selector, fraction, seed)
into OUT/manifests, 3 the Tune grid: one trial per retraining run, each a Tune function that
builds and fits a TorchTrainer (into OUT/trials/<key>), 4 OUT/results.parquet and results.csv
(a row per finished trial), OUT/sweep.json, and the report in OUT/report. Tune's own results,
including TensorBoard event files, are under OUT/tune/<name>. Rerunning the same command
resumes: the score run and manifests are reused, a finished trial is not trained again, and an
interrupted one resumes from its last Ray Train checkpoint.

The YAML (see tune_configs/smoke.yaml; fields in engine/sweep/config.py): ``name``, ``data``,
``model``, ``score`` (jobs.score fields), ``scores_path``, ``train`` (jobs.train fields shared
by all trials), ``param_space`` (lists to grid over: ``selector``, ``fraction``, ``seed``,
``curvature_lambda``, ``variant``, ``budget``...), ``also`` (more grids), ``variants`` (name -> model options and gradreg),
``selector_params`` (selector -> params), ``resources`` (``cpus_per_trial``,
``gpus_per_trial``, ``workers_per_trial``, ``max_concurrent_trials``), ``asha`` (null or
``{grace_period, reduction_factor}``) and ``smoke_test`` (overrides applied by --smoke-test).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jobs._cli import Parser, entry


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML, e.g. tune_configs/smoke.yaml")
    p.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/<name>)")
    p.add_argument("--smoke-test", action="store_true", help="apply the YAML's smoke_test overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML field, dotted key and YAML value, e.g. --set param_space.seed=[0] "
                        "--set train.epochs=3 (repeatable; applied after --smoke-test)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    return p


def main(argv: Sequence[str]) -> None:
    a = build_parser().parse_args(argv)
    from engine.sweep import load_sweep, parse_overrides

    cfg = load_sweep(a.config, a.smoke_test, parse_overrides(a.set))  # the whole YAML, before --out is touched
    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.stages.sweep import plan_sweep, sweep_stage
    from engine.storage import check_output, staged_output

    target = a.out or f"runs/sweeps/{cfg.name}"
    check_output(target, "--out")
    with staged_output(target) as local, run_lock(local, "jobs.sweep"):
        planned = plan_sweep(cfg, Path(local))  # data and models checked before Ray starts
        with ray_session(log_dir=local, job="jobs.sweep"):
            sweep_stage(cfg, Path(local), a.config, report=not a.no_report, planned=planned)


if __name__ == "__main__":
    entry("jobs.sweep", main)
