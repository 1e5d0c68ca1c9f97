"""Merge per-model score columns into the score table's mean and ``_std`` columns."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from engine.scores import HISTORY_SCORERS


def model_key(seed: int, epoch: int) -> str:
    """Column key of one proxy checkpoint: ``s{seed}_e{epoch}``."""
    return f"s{seed}_e{epoch}"


def column_name(score: str, epoch: int, epochs: tuple[int, ...]) -> str:
    """``el2n`` when a score is taken at one epoch, ``el2n_e10`` when at several."""
    return score if len(epochs) == 1 else f"{score}_e{epoch}"


def mean_std_over_seeds(per_model: dict, epochs_by_score: dict, seeds: list[int]) -> dict:
    """{"el2n@s0_e4": [N], "el2n@s1_e4": [N]} -> {"el2n": mean [N], "el2n_std": std [N]}.

    ``epochs_by_score``: {score: epochs it was taken at}. The std is the population std over
    seeds (0 with one seed), float32.
    """
    out = {}
    for score, epochs in epochs_by_score.items():
        for epoch in epochs:
            stack = np.stack([per_model[f"{score}@{model_key(s, epoch)}"] for s in seeds]).astype(np.float64)
            name = column_name(score, epoch, tuple(epochs))
            out[name] = stack.mean(0).astype(np.float32)
            out[f"{name}_std"] = stack.std(0).astype(np.float32)
    return out


def history_scores(histories: dict, names: list[str]) -> dict:
    """{seed: correct bool [E, N]} -> {"forgetting": mean over seeds, "forgetting_std": ...}."""
    out = defaultdict(list)
    for name in names:
        stack = np.stack([HISTORY_SCORERS[name](h) for h in histories.values()]).astype(np.float64)
        out[name] = stack.mean(0).astype(np.float32)
        out[f"{name}_std"] = stack.std(0).astype(np.float32)
    return dict(out)
