"""InfoBatch (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
Pruning", ICLR 2024; reference code NUS-HPC-AI-Lab/InfoBatch, ``infobatch/infobatch.py``) as
a mode of the adaptive loop: ``jobs.train --selector infobatch --reselect-every 1``.

Each sample's score is its latest training loss (the per-sample loss of the step that last
saw it, before any weight; every score starts at 3, the reference's constant, so the first pass
prunes nothing). Before each pass that prunes, the samples whose score is below the mean are
"well learned"; a random ``prune_ratio`` of them sits the pass out, the rest of them have their
loss scaled by 1 / (1 - prune_ratio) (the keep ratio clipped to [0.1, 1] as the reference
does) so that the pass's expected gradient is the full data's; every other sample trains with
weight 1. Pass e (1-based) of E prunes while e - 1 <= delta * E (the reference's
``iterations <= num_epochs * delta``): the last passes, about (1 - delta) of them, anneal on
all the data with weight 1. Nothing here runs a forward pass: selection costs a mean and a
random draw. The loop (``engine.distributed.train``) keeps the scores, indexed by the full
split's sample_id order, in its checkpoints and gathers the losses of every Ray Train worker's
batches by sample_id after each pass.
"""
from __future__ import annotations

import numpy as np

from engine.errors import ConfigError
from engine.params import Rule, check_kwargs

NAME = "infobatch"
INITIAL_SCORE = 3.0
DEFAULTS = {"prune_ratio": 0.5, "delta": 0.875}
RULES = {"prune_ratio": Rule(lo=0, hi=1, hi_open=True), "delta": Rule(lo=0, hi=1, lo_open=True)}


def check_params(params: dict) -> dict:
    """``params`` filled with the defaults, each checked (ConfigError naming it)."""
    return {**DEFAULTS, **check_kwargs("selector 'infobatch'", "infobatch parameter ", params, DEFAULTS, RULES)}


def keep_ratio(prune_ratio: float) -> float:
    """The share of the well-learned samples that train in a pruned pass (the reference's clip)."""
    return min(1.0, max(0.1, 1.0 - float(prune_ratio)))


def prunes(epoch: int, epochs: int, delta: float) -> bool:
    """Whether pass ``epoch`` (1-based) of ``epochs`` prunes."""
    return epoch - 1 <= epochs * delta


def prune(scores: np.ndarray, prune_ratio: float, rng: np.random.Generator) -> tuple:
    """(positions kept, sorted; their loss weights) for one pruned pass over ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    well = scores < scores.mean()
    learned = np.flatnonzero(well)
    kr = keep_ratio(prune_ratio)
    kept = rng.choice(learned, int(kr * len(learned)), replace=False)
    keep = ~well
    keep[kept] = True
    weight = np.ones(len(scores))
    weight[kept] = 1.0 / kr
    positions = np.flatnonzero(keep)
    return positions, weight[positions]


def check_adaptive(cfg) -> None:
    """An ``AdaptiveConfig`` for InfoBatch: R = 1 (it prunes before every pass), no warm start
    (its own schedule anneals on all data at the end) and its two parameters."""
    if cfg.every != 1:
        raise ConfigError(f"--selector infobatch prunes before every pass: give --reselect-every 1, got {cfg.every}")
    if cfg.warm_start != "none":
        raise ConfigError("--selector infobatch takes no --warm-start: its first pass trains on all the data and its "
                          "last passes (delta) anneal on all of it")
    check_params(cfg.params)


__all__ = ["DEFAULTS", "INITIAL_SCORE", "NAME", "check_adaptive", "check_params", "keep_ratio", "prune", "prunes"]
