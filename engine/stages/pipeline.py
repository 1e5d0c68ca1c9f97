"""The main job's stage: score the data with proxies, select a subset per selector and fraction,
retrain on each and on everything, and tabulate test accuracy.

``PipelineConfig`` holds what a user chooses; its ``score_config`` and ``train_config`` are the
stages' configs under ``out`` (``OUT/score``, ``OUT/select``, ``OUT/train``). A rerun into the
same directory reuses the score table and the retraining runs it finds with the same
configuration (``fresh`` discards them first).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

from engine import artifacts
from engine.config import OptimConfig, ScoreConfig, SelectConfig, TrainConfig, check_types, to_dict
from engine.errors import ConfigError
from engine.rundir import output_dir

DEFAULT_SELECTORS = "random,topk:el2n,topk:forgetting"
PARTS = ("score", "select", "train")  # what a rerun reuses and --fresh discards


@dataclass(frozen=True)
class PipelineConfig:
    """``jobs.pipeline``: proxies and scores, selections, retraining, the results table."""

    data: str = "fashion-mnist-mini"      # data source spec
    model: str = "small-cnn"              # proxy and retraining model
    seeds: int = 2                        # proxy seeds
    proxy_epochs: int = 4                 # proxy training epochs
    epochs: int = 8                       # retraining epochs
    fractions: Tuple[float, ...] = (0.3, 0.5)  # fractions kept
    selectors: str = DEFAULT_SELECTORS    # comma-separated SELECTOR[:COLUMN]
    workers: int = 1                      # Ray Train workers per retraining run
    gpus: int = 0                         # GPUs per Ray Train worker and per scoring actor
    out: str = "runs/pipeline"            # run directory

    def validate(self) -> None:
        from engine.scores import parse_score_names
        from engine.select.quota import check_fraction

        check_types(self)
        for f in self.fractions:
            check_fraction(f)
        score = self.score_config()
        score.validate()
        parse_score_names(list(score.scores))
        self.train_config().validate()

    def selections(self) -> List[Tuple[str, Optional[str]]]:
        return parse_selectors(self.selectors)

    def score_config(self) -> ScoreConfig:
        from engine.select import SELECTORS

        sel = self.selections()
        columns = sorted({c for n, c in sel if c and SELECTORS[n].reads == "score"})
        embed = 512 if any(SELECTORS[n].reads == "embeddings" for n, _ in sel) else 0
        return ScoreConfig(data=self.data, model=self.model, scores=tuple(columns or ["el2n"]), seeds=self.seeds,
                           epochs=self.proxy_epochs, gpus_per_actor=float(self.gpus), embedding_dim=embed,
                           out=str(Path(self.out) / "score"))

    def train_config(self) -> TrainConfig:
        return TrainConfig(data=self.data, model=self.model, epochs=self.epochs, workers=self.workers,
                           gpus=self.gpus, optim=OptimConfig(), out=str(Path(self.out) / "train"))


def parse_selectors(text: str) -> List[Tuple[str, Optional[str]]]:
    """``"random,topk:el2n,geda"`` -> [(name, column)], each column the one given or the
    selector's default (its registry entry's), so that scoring computes every column a
    selection will read: a selector without one fails here, not after scoring."""
    from engine.select import parse_selection

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            out.append(parse_selection(item))
        except ConfigError as e:
            raise ConfigError(f"--selectors: {e}") from None
    if not out:
        raise ConfigError("--selectors: give at least one selector")
    return out


def pipeline_stage(cfg: PipelineConfig, fresh: bool = False, source=None) -> list:
    """The four stages; assumes a Ray session. Returns the result rows (also OUT/results.md and
    results.json). ``source``: what ``check_inputs(cfg.score_config())`` returned, when the
    caller ran it already; the score stage checks its inputs otherwise."""
    out = Path(cfg.out)
    score_cfg = cfg.score_config()
    if fresh:
        gone = [str(out / d) for d in PARTS if (out / d).exists()]
        for d in gone:
            shutil.rmtree(d)
        print(f"--fresh: removed {', '.join(gone)}" if gone else "--fresh: nothing to discard", flush=True)
    with output_dir(out, keep=PARTS):  # a failure keeps what earlier stages finished; a rerun reuses it
        runs = _select(cfg, _score(score_cfg, source), out)
        rows = _retrain(cfg.train_config(), runs, out)
        table = format_table(rows)
        artifacts.atomic_write_bytes(out / "results.md", (table + "\n").encode())
        artifacts.write_json(out / "results.json", {"rows": rows, "environment": artifacts.environment()})
    print(table)
    return rows


def _score(score_cfg: ScoreConfig, source=None) -> Path:
    from engine.stages.score import score_stage

    print("== stage 1/3: proxy training and scoring")
    return finished_scores(score_cfg) or score_stage(score_cfg, source)


def _select(cfg: PipelineConfig, scores_path: Path, out: Path) -> list:
    """[(label, fraction, manifest or None)]: the full-data run, then a selection per fraction
    and selector."""
    from engine.stages import select_stage

    print("== stage 2/3: selection")
    runs = [("full", 1.0, None)]
    for frac in cfg.fractions:
        for name, column in cfg.selections():
            tag = f"{name}-{column}-{frac}" if column else f"{name}-{frac}"
            chosen = select_stage(SelectConfig(scores=str(scores_path), selector=name, fraction=frac,
                                               out=str(out / "select" / f"{tag}.parquet"), column=column))
            print(chosen.summary)
            runs.append((name if column is None else f"{name}:{column}", frac, str(chosen.path)))
    return runs


def _retrain(train_cfg: TrainConfig, runs: list, out: Path) -> list:
    from engine.stages.train import train_stage

    print(f"== stage 3/3: retraining ({len(runs)} runs)")
    rows = []
    for i, (label, frac, manifest) in enumerate(runs, 1):
        tag = Path(manifest).stem if manifest else "full"
        print(f"-- run {i}/{len(runs)}: {label} fraction {frac}")
        cfg = replace(train_cfg, manifest=manifest, out=str(out / "train" / tag))
        m = finished_run(cfg) or train_stage(cfg)
        rows.append({"selector": label, "fraction": frac, "test_accuracy": m["test_accuracy"],
                     "train_time_s": m["train_time_s"], "wall_time_s": m["wall_time_s"],
                     "train_size": m["train_size"]})
    return rows


def _same_config(recorded, cfg) -> bool:
    """Whether a recorded config (from an artifact's metadata) is ``cfg``'s, as JSON."""
    return recorded is not None and json.loads(json.dumps(to_dict(cfg), default=str)) == recorded


def finished_scores(cfg: ScoreConfig) -> Optional[Path]:
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


def finished_run(cfg: TrainConfig) -> Optional[dict]:
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
    from engine.tables import markdown_table

    return markdown_table(("selector", "fraction", "train size", "test accuracy", "train time (s)", "wall time (s)"),
                          ((r["selector"], f"{r['fraction']:.2f}", r["train_size"], f"{r['test_accuracy']:.4f}",
                            f"{r['train_time_s']:.1f}", f"{r['wall_time_s']:.1f}") for r in rows))
