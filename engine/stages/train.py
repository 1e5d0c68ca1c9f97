"""The retraining stage: a manifest's subset (or the whole training split) checked against the
data, fitted on Ray Train, and metrics.json written with its provenance. Checkpoints of an
unfinished run stay under ``OUT/_partial``; rerunning the same config resumes from them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine import artifacts
from engine.config import TrainConfig, to_dict
from engine.data import load_source
from engine.data.transforms import transforms_of
from engine.errors import ConfigError, DataError
from engine.models import check_model_name
from engine.rundir import output_dir, report_skipped


def load_subset(cfg: TrainConfig):
    """Check names, data and manifest before Ray starts. Returns (ids, weight, train size,
    manifest hash) with ids/weight None for full-data training."""
    check_model_name(cfg.model)
    from engine.storage import check_output

    check_output(cfg.out, "--out", inputs=(cfg.manifest,))
    if cfg.checkpoint_storage:
        check_output(cfg.checkpoint_storage, "--checkpoint-storage")
    source = load_source(cfg.data)
    if cfg.model_options:
        from engine.models import build_model

        info = source.info()
        build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0], **cfg.model_options)
    # unique integer ids and labels in range, from the listing or the id columns: no image is decoded
    known, _ = source.ids_and_labels("train")
    source.ids_and_labels("test")
    if cfg.adaptive.every and cfg.adaptive.warm_start != "none" and cfg.manifest is not None:
        raise ConfigError("--warm-start and --manifest both say what the first passes train on: give one")
    if cfg.manifest is None:
        return None, None, len(known), None
    ids, weight, _ = artifacts.read_manifest(cfg.manifest)
    absent = ids[~np.isin(ids, known)]
    if len(absent):
        raise DataError(f"manifest {cfg.manifest!r} names {len(absent)} sample_id(s) absent from the training "
                        f"split of {cfg.data!r}, e.g. {absent[:5].tolist()}")
    return ids, weight, len(ids), artifacts.file_hash(cfg.manifest)


def train_stage(cfg: TrainConfig, subset: Optional[tuple] = None, callbacks: Sequence = (),
                reporters: Sequence = ()) -> dict:
    """``jobs.train``'s work: check the inputs (unless ``subset`` from ``load_subset`` is given),
    fit on Ray Train, write metrics.json; returns the metrics. Assumes a Ray session.
    ``callbacks`` go to Ray Train (a sweep's trial passes Tune's report callback);
    ``reporters`` get every pass's metrics from a run in this process (``--executor``)."""
    import shutil

    from engine import hooks
    from engine.distributed.train import PARTIAL, fit_on_ray

    hooks.fire("train.timing", phase="stage_start", epoch=None)
    ids, weight, n, manifest_hash = subset or load_subset(cfg)
    with output_dir(cfg.out, keep=(PARTIAL,)) as out:
        (out / "metrics.json").unlink(missing_ok=True)  # a stale result must not outlive a failed rerun
        m = fit_on_ray(cfg, ids, weight, manifest_hash, callbacks=callbacks, reporters=reporters)
        source = load_source(cfg.data)
        rows = {"train": source.num_rows("train"), "test": source.num_rows("test")}
        metrics = {"test_accuracy": m["test_accuracy"], "wall_time_s": m["wall_time_s"],
                   "train_time_s": m.get("train_time_s"), "samples_seen": m["samples_seen"], "steps": m["steps"],
                   "passes": m["passes"], "train_size": n, "epochs": cfg.epochs, "budget": cfg.budget,
                   "weighting": cfg.weighting if cfg.manifest else None, "restarts": m.get("restarts", 0),
                   "loader": m.get("loader"), "executor": m.get("executor"),
                   **(adaptive_accounting(cfg, m, rows["train"]) if cfg.adaptive.every else {}),
                   "history": m.get("history", []), "geometry": m.get("geometry"),
                   "robust_accuracy": m.get("robust_accuracy"), "data": cfg.data,
                   "data_rows": rows,
                   "manifest": cfg.manifest, "manifest_hash": manifest_hash, "model_options": cfg.model_options,
                   "transforms": transforms_of(cfg.train_transform, source.info()),
                   "config": to_dict(cfg), "environment": artifacts.environment(),
                   **report_skipped(source, out)}
        artifacts.write_json(out / "metrics.json", metrics)
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
    hooks.fire("train.timing", phase="stage_end", epoch=None)
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {n} samples ({metrics['samples_seen']} seen) "
          f"in {metrics['wall_time_s']:.1f}s -> {Path(cfg.out) / 'metrics.json'}")
    return metrics


def adaptive_accounting(cfg: TrainConfig, m: dict, full_rows: int) -> dict:
    """An adaptive run's bill: every reselection (pass, size, overlap with the subset it
    replaced, seconds spent recomputing the selector's input over the whole training split and
    solving) and the totals: training and selection seconds, their sum, and the samples seen
    against a full-data run of the same epochs (``full_rows`` x epochs)."""
    recs = list(m.get("reselections", []))
    scoring = float(sum(r["scoring_s"] for r in recs))
    solving = float(sum(r["solving_s"] for r in recs))
    train_s = float(m.get("train_time_s") or 0.0)
    full = int(full_rows) * int(cfg.epochs)
    return {"reselections": recs, "selection_time_s": scoring + solving, "selection_scoring_s": scoring,
            "selection_solving_s": solving, "cost_s": train_s + scoring + solving,
            "selection_share": (scoring + solving) / train_s if train_s else None,
            "full_data_samples": full, "samples_vs_full": m["samples_seen"] / full if full else None}


__all__ = ["adaptive_accounting", "load_subset", "train_stage"]
