"""Train S proxy models, score every training sample through Ray Data, write scores.parquet.

    python -m jobs.score --data fashion-mnist-mini --model small-cnn --scores el2n,forgetting \\
        --seeds 2 --epochs 4 --out runs/score

prints a line per proxy epoch, Ray Data's progress, and finally
``wrote runs/score/scores.parquet: 6000 rows, columns el2n, el2n_std, forgetting, forgetting_std``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from engine import artifacts
from engine.config import ScoreConfig, to_dict
from engine.data import load_source
from engine.data.transforms import transforms_of
from engine.errors import ConfigError, DamagedFileError
from engine.models import check_model_name
from engine.scores import (
    HISTORY_SCORERS,
    SCORERS,
    check_params,
    data_defaults,
    parse_score_names,
    runs_in_bf16,
    score_epochs_for,
)
from engine.scores.aggregate import history_scores, mean_std_over_seeds, model_key
from jobs._cli import (
    Parser,
    add_data_flags,
    add_fresh_flag,
    add_optim_flags,
    add_train_transform_flag,
    data_spec,
    entry,
    int_list,
    optim_from,
    output_dir,
    report_skipped,
    start_fresh,
)


def build_parser() -> Parser:
    d = ScoreConfig()
    p = Parser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=d.data, help="data source spec: fashion-mnist-mini, fashion-mnist[:DIR], digits, "
                   "parquet:PATH, imagefolder:PATH, synthetic:N[,HxW[,C]] (default %(default)s)")
    p.add_argument("--model", default=d.model, help="proxy model: small-cnn, resnet18-cifar, torchvision:NAME")
    p.add_argument("--scores", default=",".join(d.scores),
                   help="comma-separated score names, e.g. el2n,loss,forgetting (default %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="number of proxies (seeds 0..S-1); scores are averaged")
    p.add_argument("--epochs", type=int, default=d.epochs, help="proxy training epochs (default %(default)s)")
    p.add_argument("--score-epochs", type=int_list, default=None,
                   help="epochs at which model scores are taken, e.g. 0,2 (0 = at init; default: the last)")
    p.add_argument("--actors", type=int, default=d.actors,
                   help="most scoring actors in the Ray Data pool; it grows to this as the backlog and the "
                        "cluster allow (default %(default)s)")
    p.add_argument("--min-actors", type=int, default=d.min_actors, help="actors started up front (default %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor,
                   help="logical CPUs per scoring actor (default %(default)s; fractions let read tasks and actors "
                        "share a small machine)")
    p.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="GPUs per scoring actor and proxy")
    p.add_argument("--score-batch-size", type=int, default=d.score_batch_size, help="rows per scoring batch")
    p.add_argument("--score-params", type=parse_score_params, default={},
                   help="scorer parameters, e.g. 'nc.iters=20,nc.hvp=exact,curvature.eps=0.1' "
                        "(curvature.eps defaults to 8/255 in pixel units, divided by the data's std)")
    p.add_argument("--embeddings", type=int, default=0, metavar="DIM",
                   help="also write embeddings.parquet: last-layer gradient embeddings (<= DIM dims) of seed 0's "
                        "final proxy, for the craig and gradmatch selectors (e.g. 512)")
    p.add_argument("--precision", default=d.precision,
                   help="float32 (default) or bf16: bf16 autocast for el2n, loss, grand, grand_last and gradnorm_init "
                        "(the curvature scores always run in float32)")
    p.add_argument("--out", default=d.out, help="run directory; scores.parquet is written there")
    add_optim_flags(p)
    add_fresh_flag(p)
    add_data_flags(p)
    add_train_transform_flag(p, "the proxies' training (scores are taken on the evaluation images)")
    p.add_argument("--proxy-loader", choices=("auto", "memory", "stream"), default=d.proxy_loader,
                   help="how the proxies read the training split: memory (each proxy task holds it decoded: small "
                        "data, the fastest), stream (Ray Train fits reading Ray Data streams: memory bounded "
                        "whatever the data's size), auto (stream above 1 GiB of decoded images; default)")
    p.add_argument("--proxy-workers", type=int, default=d.proxy_workers,
                   help="Ray Train workers per streamed proxy (default %(default)s)")
    return p


def config_from(argv: Sequence[str]) -> ScoreConfig:
    args = build_parser().parse_args(argv)
    cfg = ScoreConfig(data=data_spec(args), model=args.model, scores=tuple(parse_score_names(args.scores)),
                      seeds=args.seeds, epochs=args.epochs, score_epochs=args.score_epochs, actors=args.actors,
                      min_actors=args.min_actors, cpus_per_actor=args.cpus_per_actor,
                      gpus_per_actor=args.gpus_per_actor, score_batch_size=args.score_batch_size,
                      score_params=check_params(args.score_params), embedding_dim=args.embeddings,
                      precision=args.precision, train_transform=args.train_transform,
                      proxy_loader=args.proxy_loader, proxy_workers=args.proxy_workers, optim=optim_from(args),
                      out=args.out)
    cfg.validate()
    if cfg.epochs == 0 and any(s in HISTORY_SCORERS for s in cfg.scores):
        raise ConfigError("--epochs 0 trains no proxy, so there is no training history for "
                          f"{', '.join(s for s in cfg.scores if s in HISTORY_SCORERS)}; use --epochs 1 or more")
    return cfg


def parse_score_params(text: str) -> dict:
    """'nc.iters=20,curvature.eps=0.1' -> {"nc": {"iters": 20}, "curvature": {"eps": 0.1}}."""
    import argparse

    out: dict = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        score, dot, name = key.partition(".")
        if not sep or not dot or not score or not name:
            raise argparse.ArgumentTypeError(f"expected SCORE.PARAM=VALUE, got {item!r}")
        out.setdefault(score, {})[name] = _param_value(value.strip())
    return out


def _param_value(text: str):
    """'20' -> 20, '0.1' -> 0.1, 'true'/'false' -> bool, anything else stays a string (the
    scorer's declared type decides whether it is welcome: engine.scores.check_params)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def scoring_plan(cfg: ScoreConfig, info) -> tuple:
    """(epochs per model score, checkpoint epochs to keep, (score, key) pairs, params)."""
    model_scores = [s for s in cfg.scores if s in SCORERS]
    epochs = {s: score_epochs_for(s, cfg.model_score_epochs) for s in model_scores}
    keep = tuple(sorted({e for es in epochs.values() for e in es}))
    plan = [(s, model_key(seed, e)) for s in model_scores for seed in range(cfg.seeds) for e in epochs[s]]
    std = sum(info.std) / len(info.std)
    params = {s: {**data_defaults(s, std), **cfg.score_params.get(s, {})} for s in model_scores}
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


def run_score(cfg: ScoreConfig) -> Path:
    """The job's stages; assumes a Ray session. Returns the path of scores.parquet."""
    from engine.distributed.runtime import require_resources
    from engine.distributed.scoring import score_on_ray

    source = check_inputs(cfg)
    require_resources(f"--gpus-per-actor {cfg.gpus_per_actor:g} with --cpus-per-actor {cfg.cpus_per_actor:g}",
                      {"GPU": cfg.gpus_per_actor, "CPU": cfg.cpus_per_actor})
    epochs, keep, plan, params = scoring_plan(cfg, source.info())
    embed = (model_key(0, cfg.epochs), cfg.embedding_dim) if cfg.embedding_dim > 0 else None
    keep = tuple(sorted(set(keep) | ({cfg.epochs} if embed else set())))
    hist_scores = [s for s in cfg.scores if s in HISTORY_SCORERS]
    with output_dir(cfg.out, keep=(PARTIAL,)) as out:
        work = out / PARTIAL
        t0 = time.time()
        runs = _proxies(cfg, keep, work, source)
        print(f"stage proxies: {cfg.seeds} proxies x {cfg.epochs} epochs in {time.time() - t0:.1f}s")
        if plan or embed:
            t0 = time.time()
            states = {model_key(r.seed, e): s for r in runs for e, s in r.states.items()}
            scored = score_on_ray(cfg, states, plan, params, embed, work_dir=work)
            if embed:
                _write_embeddings(out / "embeddings.parquet", scored, cfg)
            ids, label = scored["sample_id"], scored["label"]
            cols = mean_std_over_seeds(scored, epochs, [r.seed for r in runs])
            print(f"stage scoring: {len(ids)} samples, {len(plan)} (score, checkpoint) pairs in {time.time() - t0:.1f}s")
        else:
            ids, label, cols = _ids_and_labels(runs[0]) + ({},)
        if hist_scores:
            hist_ids, _ = _ids_and_labels(runs[0])
            _check_same_ids(ids, hist_ids)
            cols = {**_history_columns(runs, hist_scores), **cols}
        path = out / "scores.parquet"
        _write(path, cfg, ids, label, cols, runs, epochs, params,
               {"transforms": transforms_of(cfg.train_transform, source.info()), **report_skipped(source, out)})
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


def main(argv: Sequence[str]) -> None:
    cfg = config_from(argv)
    check_inputs(cfg)
    from dataclasses import replace

    from engine.distributed.runtime import ray_session
    from engine.runlock import run_lock
    from engine.storage import staged_output

    fresh = build_parser().parse_args(argv).fresh
    with staged_output(cfg.out) as local, run_lock(local, "jobs.score"), ray_session():
        if fresh:
            start_fresh(Path(local))
        run_score(replace(cfg, out=local))


if __name__ == "__main__":
    entry("jobs.score", main)
