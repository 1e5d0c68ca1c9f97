"""The main job: score the embedded dataset with proxies, select subsets, retrain, print a table.

    python -m jobs.pipeline            # fashion-mnist-mini, 2 seeds, fractions 0.3 and 0.5
    python -m jobs.pipeline --smoke-test

Stages: 1 proxies + scores (jobs.score), 2 selections (jobs.select), 3 retraining on Ray Train
(jobs.train) for each selector x fraction and the full-data baseline, 4 the results table
(also in RUN_DIR/results.md and results.json).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import List, Sequence, Tuple

from engine import artifacts
from engine.config import OptimConfig, ScoreConfig, TrainConfig
from engine.errors import ConfigError
from engine.select import SELECTORS
from engine.select.quota import check_fraction
from jobs._cli import Parser, entry, float_list, output_dir

# (selector, score column); "random" ignores scores.
DEFAULT_SELECTORS = "random,topk:el2n,topk:forgetting"


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
    return p


def parse_selectors(text: str) -> List[Tuple[str, str | None]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, column = item.partition(":")
        SELECTORS[name]  # unknown name -> ConfigError listing the known ones
        out.append((name, column or None))
    if not out:
        raise ConfigError("--selectors: give at least one selector")
    return out


def plan(argv: Sequence[str]):
    """Flags -> (score config, list of (selector, column), fractions, train config template)."""
    a = build_parser().parse_args(argv)
    if a.smoke_test:
        a.seeds, a.proxy_epochs, a.epochs, a.fractions = 1, 1, 1, (0.3,)
    fractions = tuple(check_fraction(f) for f in a.fractions)
    selectors = parse_selectors(a.selectors)
    columns = sorted({c for _, c in selectors if c})
    scores = tuple(dict.fromkeys([*columns] or ["el2n"]))
    out = Path(a.out)
    score_cfg = ScoreConfig(data=a.data, model=a.model, scores=scores, seeds=a.seeds, epochs=a.proxy_epochs,
                            gpus_per_actor=float(a.gpus), out=str(out / "score"))
    score_cfg.validate()
    from engine.scores import parse_score_names

    parse_score_names(list(scores))
    train_cfg = TrainConfig(data=a.data, model=a.model, epochs=a.epochs, workers=a.workers, gpus=a.gpus,
                            optim=OptimConfig(), out=str(out / "train"))
    train_cfg.validate()
    return score_cfg, selectors, fractions, train_cfg, out


def run_pipeline(score_cfg, selectors, fractions, train_cfg, out: Path) -> list:
    """The four stages; assumes a Ray session. Returns the result rows."""
    from jobs.score import check_inputs, run_score
    from jobs.select import run_select
    from jobs.train import run_train

    check_inputs(score_cfg)
    rows = []
    with output_dir(out):
        print("== stage 1/3: proxy training and scoring")
        scores_path = run_score(score_cfg)
        print("== stage 2/3: selection")
        runs = [("full", None, 1.0, None)]
        for frac in fractions:
            for name, column in selectors:
                tag = f"{name}-{column}-{frac}" if column else f"{name}-{frac}"
                manifest = run_select(str(scores_path), name, frac, str(out / "select" / f"{tag}.parquet"), column)
                runs.append((name if column is None else f"{name}:{column}", column, frac, str(manifest)))
        print(f"== stage 3/3: retraining ({len(runs)} runs on Ray Train)")
        for i, (label, _, frac, manifest) in enumerate(runs, 1):
            tag = Path(manifest).stem if manifest else "full"
            print(f"-- run {i}/{len(runs)}: {label} fraction {frac}")
            m = run_train(replace(train_cfg, manifest=manifest, out=str(out / "train" / tag)))
            rows.append({"selector": label, "fraction": frac, "test_accuracy": m["test_accuracy"],
                         "train_time_s": m["train_time_s"], "wall_time_s": m["wall_time_s"],
                         "train_size": m["train_size"]})
        table = format_table(rows)
        artifacts.atomic_write_bytes(out / "results.md", (table + "\n").encode())
        artifacts.write_json(out / "results.json", {"rows": rows, "environment": artifacts.environment()})
    print(table)
    return rows


def format_table(rows: list) -> str:
    lines = ["| selector | fraction | train size | test accuracy | train time (s) | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['selector']} | {r['fraction']:.2f} | {r['train_size']} | {r['test_accuracy']:.4f} "
                     f"| {r['train_time_s']:.1f} | {r['wall_time_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    t0 = time.time()
    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.storage import staged_output
    from jobs.score import check_inputs

    target = build_parser().parse_args(argv).out
    with staged_output(target) as local, run_lock(local, "jobs.pipeline"):
        score_cfg, selectors, fractions, train_cfg, out = plan([*argv, "--out", local])
        check_inputs(score_cfg)
        with ray_session():
            run_pipeline(score_cfg, selectors, fractions, train_cfg, out)
    where = f"{target}/results.md" if target != local else out / "results.md"
    print(f"pipeline finished in {time.time() - t0:.0f}s; results in {where}")


if __name__ == "__main__":
    entry("jobs.pipeline", main)
