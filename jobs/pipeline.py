"""The main job: score the embedded dataset with proxies, select subsets, retrain, print a table.

    python -m jobs.pipeline            # fashion-mnist-mini, 2 seeds, fractions 0.3 and 0.5
    python -m jobs.pipeline --smoke-test

Stages (engine.stages.pipeline_stage): 1 proxies + scores, 2 selections, 3 retraining on Ray
Train for each selector x fraction and the full-data baseline, 4 the results table (also in
RUN_DIR/results.md and results.json).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

from engine.stages.pipeline import DEFAULT_SELECTORS
from jobs._cli import Parser, entry, float_list


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist-mini", help="data source spec (default %(default)s)")
    p.add_argument("--model", default="small-cnn", help="proxy and retraining model (default %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="proxy seeds (default %(default)s)")
    p.add_argument("--proxy-epochs", type=int, default=4, help="proxy training epochs (default %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="retraining epochs (default %(default)s)")
    p.add_argument("--fractions", type=float_list, default=(0.3, 0.5), help="comma-separated fractions to keep")
    p.add_argument("--selectors", default=DEFAULT_SELECTORS,
                   help="comma-separated SELECTOR[:COLUMN] (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per retraining run")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per Ray Train worker and per scoring actor")
    p.add_argument("--out", default="runs/pipeline", help="run directory (default %(default)s)")
    p.add_argument("--smoke-test", action="store_true", help="1 seed, 1 proxy epoch, 1 retraining epoch, fraction 0.3")
    p.add_argument("--fresh", action="store_true",
                   help="start over: discard what an earlier run of this --out finished (OUT/score, OUT/select, "
                        "OUT/train; by default a rerun reuses the score table and the retraining runs it finds "
                        "with the same configuration)")
    return p


def config_from(argv: Sequence[str]):
    """Flags -> a checked PipelineConfig (and --out writable)."""
    from engine.stages.pipeline import PipelineConfig
    from engine.storage import check_output

    a = build_parser().parse_args(argv)
    if a.smoke_test:
        a.seeds, a.proxy_epochs, a.epochs, a.fractions = 1, 1, 1, (0.3,)
    cfg = PipelineConfig(data=a.data, model=a.model, seeds=a.seeds, proxy_epochs=a.proxy_epochs, epochs=a.epochs,
                         fractions=tuple(a.fractions), selectors=a.selectors, workers=a.workers, gpus=a.gpus,
                         out=a.out)
    cfg.validate()
    check_output(a.out, "--out")
    return cfg


def main(argv: Sequence[str]) -> None:
    t0 = time.time()
    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.stages.pipeline import pipeline_stage
    from engine.stages.score import check_inputs
    from engine.storage import staged_output

    cfg = config_from(argv)  # every flag checked, and --out writable, before the run directory is touched
    source = check_inputs(cfg.score_config())
    with staged_output(cfg.out) as local, run_lock(local, "jobs.pipeline"), \
            ray_session(log_dir=local, job="jobs.pipeline"):
        pipeline_stage(replace(cfg, out=local), fresh=build_parser().parse_args(argv).fresh, source=source)
    print(f"pipeline finished in {time.time() - t0:.0f}s; results in {cfg.out}/results.md")


if __name__ == "__main__":
    entry("jobs.pipeline", main)
