"""Adaptive selection during retraining: every R passes, the subset is chosen again on the
current model (GRAD-MATCH's and CRAIG's R, the GEDA thesis's offline R = 0 made adaptive).

Before pass 1, 1 + R, 1 + 2R, ... (``AdaptiveConfig.every`` = R) the selector's input is
recomputed over the whole training split with the model as it is, by the same code as the
score stage: a model scorer (``SCORERS[column]``, e.g. ``topk:el2n`` ranks by EL2N of the
current model) or the last-layer gradient embeddings CRAIG and GRAD-MATCH read
(``engine.scores.embeddings.grad_embedding``); ``random`` is redrawn. The selector then picks
per class exactly as ``jobs.select`` does, on the rows sorted by ``sample_id``, and training
continues on the new subset with its weights (normalised to mean 1, as a manifest's are). A run
started from a ``--manifest`` trains on it until the first reselection (before pass 1 + R).
``warm_start="full:K"`` (CORDS's warm start) trains on the whole training split for passes
1..K and makes the first selection before pass K + 1 (then K + 1 + R, ...).

Each selection's seed is drawn from (the run's seed, the pass), so ``random`` draws a new
subset each time and two runs with one seed draw the same ones. Everything here is torch and
numpy on one process; the training loop (``engine.distributed.train``) calls ``reselect`` and
keeps the current selection in its checkpoints.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from engine.errors import ConfigError


@dataclass
class Reselection:
    """One selection: the chosen sample_ids (sorted) with the selector's weights (as a manifest
    holds them; training normalises them to mean 1, as it does a manifest's) and what it cost;
    ``record`` is its entry in the run's metrics."""

    ids: np.ndarray
    weight: np.ndarray
    record: dict


def check_adaptive(cfg) -> None:
    """An ``AdaptiveConfig`` with ``every`` > 0: a known selector whose input can be recomputed
    on a model, a fraction in (0, 1], and parameters it declares (column-valued ones, such as
    CCS's mislabel column, cannot be recomputed and are refused)."""
    from engine.scores import SCORERS
    from engine.select import SELECTORS, check_selector_params, parse_selection
    from engine.select.quota import check_fraction
    from engine.train import infobatch

    if cfg.selector == infobatch.NAME:
        return infobatch.check_adaptive(cfg)
    check_fraction(cfg.fraction)
    warm_passes(cfg.warm_start)
    name, column = parse_selection(cfg.selector)
    entry = SELECTORS[name]
    if entry.reads == "score" and column not in SCORERS.names():
        raise ConfigError(f"--selector {cfg.selector}: adaptive selection recomputes {column!r} on the current model, "
                          f"and it is not a model scorer; use one of {', '.join(sorted(SCORERS.names()))}")
    for p in entry.params:
        if p.column and cfg.params.get(p.name):
            raise ConfigError(f"--selector {name}: its parameter {p.name} names a score column, which adaptive "
                              f"selection cannot recompute; leave it unset")
    check_selector_params(name, {**cfg.params, "seed": 0})


def selection_seed(seed: int, epoch: int) -> int:
    """The seed of the selection made before pass ``epoch`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def warm_passes(warm_start: str) -> int:
    """``"none"`` and ``"geda"`` -> 0; ``"full:K"`` -> K (the passes over the whole training
    split first)."""
    if warm_start in ("none", "geda"):
        return 0
    kind, _, k = str(warm_start).partition(":")
    if kind != "full" or not k.isdigit() or int(k) < 1:
        raise ConfigError(f"warm_start must be 'none', 'full:K' with K >= 1 passes over the whole training split "
                          f"(as CORDS's warm start) or 'geda' (the offline GEDA subset until the first "
                          f"reselection), got {warm_start!r}")
    return int(k)


def warm_selection(cfg, epoch: int):
    """The ``AdaptiveConfig`` of the selection made before pass ``epoch``: with
    ``warm_start="geda"`` the first one (before pass 1) is offline GEDA (the GEDA thesis,
    section 6.3: the GEDA subset of the untrained model's gradient norms, every weight 1,
    instead of the full data for the first R passes); every other one is ``cfg``'s."""
    from dataclasses import replace

    if cfg.warm_start == "geda" and epoch == 1:
        return replace(cfg, selector="geda", params={})
    return cfg


def due(every: int, epoch: int, from_manifest: bool, warm: int = 0) -> bool:
    """Whether a selection is made before pass ``epoch`` (1-based): before pass warm + 1,
    warm + 1 + R, ... (a ``--manifest`` serves until warm + 1 + R)."""
    k = epoch - warm
    if not every or k < 1 or (k - 1) % every:
        return False
    return not (from_manifest and k == 1)


def adaptive_plan(n: int, global_batch: int, epochs: int, budget: str, full_n: int, warm: int) -> tuple:
    """``engine.train.epoch_plan`` (passes, optimizer steps) for a run whose first ``warm``
    passes go over the whole training split (``full_n`` rows) and the others over subsets of
    ``n`` rows: ``epochs`` passes in all, or, for ``budget="steps"``, the steps of ``epochs``
    full passes, the subset passes making up what the warm ones left."""
    import math

    from engine.train import epoch_plan

    if not warm:
        return epoch_plan(n, global_batch, epochs, budget, full_n)
    warm = min(warm, epochs)
    full_pass, sub_pass = math.ceil(full_n / global_batch), math.ceil(n / global_batch)
    if budget == "epochs":
        return epochs, warm * full_pass + (epochs - warm) * sub_pass
    steps = epochs * full_pass
    return warm + math.ceil((steps - warm * full_pass) / sub_pass), steps


def selector_input(model: torch.nn.Module, split, info, device: torch.device, kind: str, column: Optional[str],
                   batch_size: int = 512, precision: str = "float32") -> Optional[np.ndarray]:
    """What the selector reads, for every row of ``split`` in its order, on ``model`` as it
    is: float64 [N] scores, [N, D] gradient embeddings, or None (``kind`` "nothing").
    ``precision`` "bf16" runs it under bf16 autocast: the embeddings (one forward; within 1 %
    of float32) and the scorers ``engine.scores.runs_in_bf16`` allows, as ``jobs.score
    --precision bf16`` does."""
    if kind == "nothing":
        return None
    import contextlib

    from engine.scores import SCORERS, runs_in_bf16
    from engine.scores.embeddings import grad_embedding
    from engine.train import batch_to_input

    bf16 = precision == "bf16" and (kind == "embeddings" or runs_in_bf16(column, precision))
    was_training = model.training
    out = []
    try:
        for start in range(0, len(split), batch_size):
            idx = np.arange(start, min(len(split), start + batch_size))
            x = batch_to_input(split.image[idx], info, device)
            y = torch.as_tensor(np.asarray(split.label[idx]), device=device).long()
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                v = grad_embedding(model, x, y) if kind == "embeddings" else SCORERS[column](model, x, y)
            out.append(v.detach().float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64)


def reselect(model: torch.nn.Module, full, info, device: torch.device, cfg, seed: int, epoch: int,
             previous: Optional[np.ndarray] = None, mapper: Callable = map,
             gather: Optional[Callable] = None, solve: bool = True, batch_size: int = 512,
             weigh: bool = True) -> Optional[Reselection]:
    """The subset for the passes from ``epoch`` on: ``cfg`` (an ``AdaptiveConfig``) applied to
    ``full`` (the whole training split) with the current ``model``. ``previous``: the ids of
    the subset it replaces (for the overlap in the record). ``mapper``: how the selector's
    classes run (the builtin map, or Ray tasks: ``engine.distributed.runtime.task_map``).
    ``gather``: for data-parallel workers, an object with ``rank``, ``world`` and
    ``gather(positions, values) -> the values of every row``: this worker recomputes the input
    of its share of the rows only (``shard_of``) and the workers exchange them; with ``solve``
    False it stops there and returns None (a worker that receives the selection instead).
    ``batch_size``: rows per forward of the recomputation (the training loop passes its own
    batch size, chosen for its device: on 2 CPU cores small-cnn's forward over Fashion-MNIST
    takes 5.9 s in batches of 128 and 9.0 s in batches of 512, bench/reselection_parts.py). ``weigh`` False:
    a selector that would also weigh its subset by the gradient embeddings (online GEDA) does
    not (the offline GEDA of ``--warm-start geda``)."""
    from engine.select import SELECTORS, parse_selection

    name, column = parse_selection(cfg.selector)
    entry = SELECTORS[name]
    order = np.argsort(np.asarray(full.sample_id), kind="stable")
    ids = np.asarray(full.sample_id)[order]
    labels = np.asarray(full.label)[order].astype(np.int64)
    takes = inspect.signature(entry.fn).parameters
    # a score-reading selector that also takes embeddings (online GEDA) gets both, as columns [score, embedding...]
    both = weigh and entry.reads == "score" and "embeddings" in takes

    def recompute(split):
        v = selector_input(model, split, info, device, entry.reads, column, batch_size, cfg.precision)
        return np.column_stack([v, selector_input(model, split, info, device, "embeddings", None, batch_size,
                                                  cfg.precision)]) if both else v

    t0 = time.time()
    if gather is None:
        values = recompute(full)
        values = None if values is None else values[order]
    else:
        mine = shard_of(len(full), gather.rank, gather.world)
        values = gather(mine, recompute(full.subset(ids[mine])))
    t1 = time.time()
    if not solve:
        return None
    kwargs = {"mapper": mapper} if "mapper" in takes else {}
    if both:
        values, kwargs["embeddings"] = values[:, 0], values[:, 1:]
    sel = entry(values, labels, cfg.fraction, seed=selection_seed(seed, epoch), **cfg.params, **kwargs)
    t2 = time.time()
    return Reselection(ids[sel.index], np.asarray(sel.weight, dtype=np.float64),
                       _record(cfg, epoch, ids[sel.index], previous, sel.info, t1 - t0, t2 - t1))


def _record(cfg, epoch: int, chosen: np.ndarray, previous, info: dict, scoring_s: float, solving_s: float) -> dict:
    """A reselection's entry in the run's metrics; with the gradient-matching error of the
    weighted subset against its class's summed gradient (GRAD-MATCH's Err, relative to the
    class gradient's norm; online GEDA's weight fit) averaged over classes, where the
    selector reports it."""
    record = {"epoch": int(epoch), "selector": cfg.selector, "size": int(len(chosen)),
              "scoring_s": round(scoring_s, 4), "solving_s": round(solving_s, 4),
              "overlap": None if previous is None else float(np.isin(chosen, previous).mean()) if len(chosen) else 0.0}
    errors = [c["relative_error"] for c in info.get("classes", {}).values() if "relative_error" in c]
    if errors:
        record["match_error"] = float(np.mean(errors))
    return record


def shard_of(n: int, rank: int, world: int) -> np.ndarray:
    """The positions (in sample_id order) whose selector input worker ``rank`` of ``world``
    recomputes: every ``world``-th row from ``rank`` (so every worker's share has one class mix)."""
    return np.arange(rank, n, world)


__all__ = ["Reselection", "adaptive_plan", "check_adaptive", "due", "reselect", "selection_seed", "selector_input",
           "warm_passes"]
