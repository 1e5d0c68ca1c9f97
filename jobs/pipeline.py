"""The main job: score the embedded dataset with proxies, select subsets, retrain, print a table.

    python -m jobs.pipeline            # fashion-mnist-mini, 2 seeds, fractions 0.3 and 0.5
    python -m jobs.pipeline --smoke-test

Stages: 1 proxies + scores (engine.stages.score_stage), 2 selections (select_stage), 3 retraining on Ray Train
(jobs.train) for each selector x fraction and the full-data baseline, 4 the results table
(also in RUN_DIR/results.md and results.json).
"""
from __future__ import annotations

import json
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
    p.add_argument("--fresh", action="store_true",
                   help="start over: discard what an earlier run of this --out finished (OUT/score, OUT/select, "
                        "OUT/train; by default a rerun reuses the score table and the retraining runs it finds "
                        "with the same configuration)")
    return p


SCORELESS = ("random",)  # selectors that read no score column


def parse_selectors(text: str) -> List[Tuple[str, str | None]]:
    """``"random,topk:el2n,geda"`` -> [(name, column)], each column the one given or the
    selector's default (engine.stages.DEFAULT_COLUMN), so that scoring computes every column a
    selection will read: a selector without one fails here, not after scoring."""
    from engine.stages import DEFAULT_COLUMN

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, column = item.partition(":")
        SELECTORS[name]  # unknown name -> ConfigError listing the known ones
        column = column or DEFAULT_COLUMN.get(name)
        if column is None and name not in SCORELESS:
            raise ConfigError(f"--selectors: {name} ranks by a score column: write {name}:COLUMN, e.g. {name}:el2n")
        out.append((name, column))
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
    from engine.stages import EMBEDDING_SELECTORS

    columns = sorted({c for n, c in selectors if c and n not in EMBEDDING_SELECTORS})
    scores = tuple(dict.fromkeys([*columns] or ["el2n"]))
    embed = 512 if any(n in EMBEDDING_SELECTORS for n, _ in selectors) else 0
    out = Path(a.out)
    from engine.storage import check_output

    check_output(a.out, "--out")
    score_cfg = ScoreConfig(data=a.data, model=a.model, scores=scores, seeds=a.seeds, epochs=a.proxy_epochs,
                            gpus_per_actor=float(a.gpus), embedding_dim=embed, out=str(out / "score"))
    score_cfg.validate()
    from engine.scores import parse_score_names

    parse_score_names(list(scores))
    train_cfg = TrainConfig(data=a.data, model=a.model, epochs=a.epochs, workers=a.workers, gpus=a.gpus,
                            optim=OptimConfig(), out=str(out / "train"))
    train_cfg.validate()
    return score_cfg, selectors, fractions, train_cfg, out


def run_pipeline(score_cfg, selectors, fractions, train_cfg, out: Path) -> list:
    """The four stages; assumes a Ray session. Returns the result rows."""
    from engine.config import SelectConfig
    from engine.stages import select_stage
    from engine.stages.score import check_inputs, score_stage
    from engine.stages.train import train_stage

    check_inputs(score_cfg)
    rows = []
    # a failure in a later stage keeps what earlier stages finished; a rerun reuses it
    with output_dir(out, keep=("score", "select", "train")):
        print("== stage 1/3: proxy training and scoring")
        scores_path = finished_scores(score_cfg) or score_stage(score_cfg)
        print("== stage 2/3: selection")
        runs = [("full", None, 1.0, None)]
        for frac in fractions:
            for name, column in selectors:
                tag = f"{name}-{column}-{frac}" if column else f"{name}-{frac}"
                chosen = select_stage(SelectConfig(scores=str(scores_path), selector=name, fraction=frac,
                                                   out=str(out / "select" / f"{tag}.parquet"), column=column))
                print(chosen.summary)
                manifest = chosen.path
                runs.append((name if column is None else f"{name}:{column}", column, frac, str(manifest)))
        print(f"== stage 3/3: retraining ({len(runs)} runs on Ray Train)")
        for i, (label, _, frac, manifest) in enumerate(runs, 1):
            tag = Path(manifest).stem if manifest else "full"
            print(f"-- run {i}/{len(runs)}: {label} fraction {frac}")
            cfg = replace(train_cfg, manifest=manifest, out=str(out / "train" / tag))
            m = finished_run(cfg) or train_stage(cfg)
            rows.append({"selector": label, "fraction": frac, "test_accuracy": m["test_accuracy"],
                         "train_time_s": m["train_time_s"], "wall_time_s": m["wall_time_s"],
                         "train_size": m["train_size"]})
        table = format_table(rows)
        artifacts.atomic_write_bytes(out / "results.md", (table + "\n").encode())
        artifacts.write_json(out / "results.json", {"rows": rows, "environment": artifacts.environment()})
    print(table)
    return rows


def _same_config(recorded, cfg) -> bool:
    """Whether a recorded config (from an artifact's metadata) is ``cfg``'s, as JSON."""
    from engine.config import to_dict

    return recorded is not None and json.loads(json.dumps(to_dict(cfg), default=str)) == recorded


def finished_scores(cfg: ScoreConfig):
    """OUT/score/scores.parquet of an earlier run of this pipeline with the same score config
    (kept when a later stage failed), or None."""
    path = Path(cfg.out) / "scores.parquet"
    if not path.is_file():
        return None
    _, meta = artifacts.read_table(path, "score table")
    if not _same_config(meta.get("config"), cfg):
        return None
    print(f"reusing {path}: scored by an earlier run of this pipeline with the same configuration")
    return path


def finished_run(cfg: TrainConfig):
    """metrics.json of a retraining run that an earlier run of this pipeline finished with the
    same config and manifest, or None."""
    path = Path(cfg.out) / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    same_manifest = cfg.manifest is None or m.get("manifest_hash") == artifacts.file_hash(cfg.manifest)
    if not (same_manifest and _same_config(m.get("config"), cfg)):
        return None
    print(f"reusing {path}: finished by an earlier run of this pipeline")
    return m


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
    from engine.stages.score import check_inputs
    from engine.storage import staged_output

    target = build_parser().parse_args(argv).out
    plan(argv)  # every flag checked, and --out writable, before the run directory is touched
    with staged_output(target) as local, run_lock(local, "jobs.pipeline"):
        score_cfg, selectors, fractions, train_cfg, out = plan([*argv, "--out", local])
        check_inputs(score_cfg)
        if build_parser().parse_args(argv).fresh:
            import shutil

            gone = [str(out / d) for d in ("score", "select", "train") if (out / d).exists()]
            for d in gone:
                shutil.rmtree(d)
            print(f"--fresh: removed {', '.join(gone)}" if gone else "--fresh: nothing to discard", flush=True)
        with ray_session():
            run_pipeline(score_cfg, selectors, fractions, train_cfg, out)
    where = f"{target}/results.md" if target != local else out / "results.md"
    print(f"pipeline finished in {time.time() - t0:.0f}s; results in {where}")


if __name__ == "__main__":
    entry("jobs.pipeline", main)
