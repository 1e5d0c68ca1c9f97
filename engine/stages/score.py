"""The scoring stage: proxies trained (in Ray tasks, or streamed through Ray Train), every
training sample scored through Ray Data, the score table written with its provenance.
Resumable: ``OUT/_partial`` keeps the trained proxies (keyed by what they depend on) and the
finished score shards until the table is written."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from engine import artifacts
from engine.config import ScoreConfig, to_dict
from engine.data import load_source
from engine.data.transforms import transforms_of
from engine.errors import DamagedFileError
from engine.models import check_model_name
from engine.rundir import output_dir, report_skipped
from engine.scores import HISTORY_SCORERS, SCORERS, data_defaults, runs_in_bf16, score_epochs_for
from engine.scores.aggregate import history_scores, mean_std_over_seeds, model_key


def scoring_plan(cfg: ScoreConfig, info) -> tuple:
    """(epochs per model score, checkpoint epochs to keep, (score, key) pairs, params)."""
    model_scores = [s for s in cfg.scores if s in SCORERS]
    epochs = {s: score_epochs_for(s, cfg.model_score_epochs) for s in model_scores}
    keep = tuple(sorted({e for es in epochs.values() for e in es}))
    plan = [(s, model_key(seed, e)) for s in model_scores for seed in range(cfg.seeds) for e in epochs[s]]
    params = {s: {**data_defaults(s, tuple(info.std)), **cfg.score_params.get(s, {})} for s in model_scores}
    return epochs, keep, plan, {s: p for s, p in params.items() if p}


def check_inputs(cfg: ScoreConfig):
    """Everything that can be checked before Ray starts: names, data spec, model, and that
    --out can take the score table (8 bytes per row and column, a mean and a std per score)."""
    check_model_name(cfg.model)
    source = load_source(cfg.data)
    source.info()
    source.ids_and_labels("train")  # unique integer ids and labels in range, read without decoding an image
    from engine.storage import check_output

    check_output(cfg.out, "--out", need_bytes=source.num_rows("train") * 8 * (2 + 2 * len(cfg.scores)))
    return source


def score_stage(cfg: ScoreConfig, source=None) -> Path:
    """Proxies, scores, the score table: ``jobs.score``'s work; assumes a Ray session. Returns
    the path of scores.parquet. Trained proxies and finished score shards stay in
    ``OUT/_partial`` until the table is written, so a rerun of the same config resumes.
    ``source``: what ``check_inputs(cfg)`` returned, when the caller ran it already (a large
    image folder's listing is then read once)."""
    from engine.distributed.runtime import require_resources
    from engine.distributed.scoring import score_on_ray

    source = source or check_inputs(cfg)
    require_resources(f"--gpus-per-actor {cfg.gpus_per_actor:g} with --cpus-per-actor {cfg.cpus_per_actor:g}",
                      {"GPU": cfg.gpus_per_actor, "CPU": cfg.cpus_per_actor})
    epochs, keep, plan, params = scoring_plan(cfg, source.info())
    embed = (model_key(0, cfg.epochs), cfg.embedding_dim) if cfg.embedding_dim > 0 else None
    keep = tuple(sorted(set(keep) | ({cfg.epochs} if embed else set())))
    hist_scores = [s for s in cfg.scores if s in HISTORY_SCORERS]
    seconds = {}
    with output_dir(cfg.out, keep=(PARTIAL,)) as out:
        work = out / PARTIAL
        t0 = time.time()
        runs = _proxies(cfg, keep, work, source)
        seconds["proxies"] = round(time.time() - t0, 3)
        print(f"stage proxies: {cfg.seeds} proxies x {cfg.epochs} epochs in {time.time() - t0:.1f}s")
        if plan or embed:
            t0 = time.time()
            states = {model_key(r.seed, e): s for r in runs for e, s in r.states.items()}
            scored = score_on_ray(cfg, states, plan, params, embed, work_dir=work)
            if embed:
                _write_embeddings(out / "embeddings.parquet", scored, cfg)
            ids, label = scored["sample_id"], scored["label"]
            cols = mean_std_over_seeds(scored, epochs, [r.seed for r in runs])
            seconds["scoring"] = round(time.time() - t0, 3)
            print(f"stage scoring: {len(ids)} samples, {len(plan)} (score, checkpoint) pairs in {time.time() - t0:.1f}s")
        else:
            ids, label, cols = _ids_and_labels(runs[0]) + ({},)
        if hist_scores:
            hist_ids, _ = _ids_and_labels(runs[0])
            _check_same_ids(ids, hist_ids)
            cols = {**_history_columns(runs, hist_scores), **cols}
        path = out / "scores.parquet"
        _write(path, cfg, ids, label, cols, runs, epochs, params,
               {"transforms": transforms_of(cfg.train_transform, source.info()), "seconds": seconds,
                **report_skipped(source, out)})
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}: {len(ids)} rows, columns {', '.join(cols)}")
    return path


PARTIAL = "_partial"  # RUN/_partial: proxy checkpoints and scoring shards of an unfinished run


def _proxies(cfg: ScoreConfig, keep: tuple, work: Path, source) -> list:
    """Train the proxies, or load them from an interrupted run of the same configuration."""
    from engine.distributed.scoring import train_proxies

    path = proxies_path(cfg, keep, work)
    if path.exists():
        runs = load_proxies(path)
        print(f"resuming: reusing {len(runs)} trained proxies from {path}", flush=True)
        return runs
    from engine.distributed.proxies import train_proxies_streamed, use_stream

    if cfg.epochs > 0 and use_stream(cfg, source):
        runs = train_proxies_streamed(cfg, keep, work, path.stem, source)
    else:
        runs = train_proxies(cfg, keep)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("proxies-*.pt"):
        old.unlink()
    artifacts.save_tensors(path, [r.to_tensors() for r in runs])
    shutil.rmtree(work / "proxy_train", ignore_errors=True)  # the streamed fits' checkpoints: now in `path`
    return runs


def proxies_path(cfg: ScoreConfig, keep: tuple, work: Path) -> Path:
    """Where a run of this configuration keeps its trained proxies until it finishes."""
    key = hashlib.sha256(json.dumps({"data": cfg.data, "model": cfg.model, "seeds": cfg.seeds, "epochs": cfg.epochs,
                                     "keep": list(keep), "optim": to_dict(cfg.optim),
                                     "train_transform": cfg.train_transform}, sort_keys=True).encode())
    return work / f"proxies-{key.hexdigest()[:16]}.pt"


def load_proxies(path: Path) -> list:
    """The proxies a killed run saved, read as tensors only (a planted pickle is refused)."""
    from engine.train import ProxyRun

    data = artifacts.load_tensors(path, "the saved proxies")
    try:
        return [ProxyRun.from_tensors(d) for d in data]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DamagedFileError(f"{path}: the saved proxies do not have the layout jobs.score writes ({e!r}); "
                               f"rerun with --fresh (or delete it) to train them again") from None


def _ids_and_labels(run) -> tuple:
    order = np.argsort(run.sample_id, kind="stable")
    return run.sample_id[order], run.label[order]


def _history_columns(runs, hist_scores) -> dict:
    histories = {}
    for r in runs:
        pos = np.argsort(r.sample_id, kind="stable")
        histories[r.seed] = r.correct[:, pos]
    return history_scores(histories, hist_scores)


def _check_same_ids(expected: np.ndarray, got: np.ndarray) -> None:
    if not np.array_equal(expected, got):
        raise RuntimeError("Ray Data scoring returned a different set of sample ids than the training split")


def _write_embeddings(path: Path, scored: dict, cfg: ScoreConfig) -> None:
    emb = scored.pop("grad_embedding").astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
    table = pa.table({"sample_id": pa.array(scored["sample_id"].astype(np.int64)), "grad_embedding": col})
    artifacts.write_table(path, table, {"kind": "embeddings", "model": cfg.model, "seed": 0, "epoch": cfg.epochs,
                                        "dim": int(emb.shape[1]), "config": to_dict(cfg),
                                        "environment": artifacts.environment()})
    print(f"wrote {path}: {emb.shape[0]} x {emb.shape[1]} last-layer gradient embeddings")


def _write(path: Path, cfg: ScoreConfig, ids, label, cols: dict, runs, epochs: dict, params: dict,
           extra: Optional[dict] = None) -> None:
    table = pa.table({"sample_id": pa.array(ids.astype(np.int64)), "label": pa.array(label.astype(np.int64)),
                      **{k: pa.array(v.astype(np.float32)) for k, v in cols.items()}})
    meta = {"kind": "scores", "config": to_dict(cfg), "seeds": [r.seed for r in runs],
            "score_epochs": {s: (list(epochs[s]) if s in SCORERS else "history") for s in cfg.scores},
            "score_params": params,
            "score_precision": {s: ("bf16" if runs_in_bf16(s, cfg.precision) else "float32")
                                for s in cfg.scores if s in SCORERS},
            "proxy_train_loss": {r.seed: r.train_loss for r in runs},
            "model": cfg.model, "data": cfg.data, "environment": artifacts.environment(), **(extra or {})}
    artifacts.write_table(path, table, meta)


__all__ = ["PARTIAL", "check_inputs", "load_proxies", "proxies_path", "score_stage", "scoring_plan"]
