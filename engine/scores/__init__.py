"""Per-sample scorers.

Two kinds, two registries:

* ``SCORERS[name](model, x, y, **params) -> float32 tensor [B]``: functions of a trained (or
  freshly initialised) model and a batch; ``x`` is the normalised float batch [B, C, H, W],
  ``y`` int64 [B]. The model is put in eval mode for the call and its mode restored after, so
  no state is left changed; samples are scored independently (BatchNorm uses running stats).
* ``HISTORY_SCORERS[name](correct) -> float32 [N]``: numpy functions of the proxy-training
  history ``correct`` (bool [E, N], whether sample n was classified correctly when it was
  presented in epoch e).
"""
from __future__ import annotations

from typing import Sequence

from engine.errors import ConfigError
from engine.registry import Registry

SCORERS: Registry = Registry("scorer")
HISTORY_SCORERS: Registry = Registry("history scorer")

from engine.scores import history as _history  # noqa: E402,F401  (fills HISTORY_SCORERS)
from engine.scores import model_scores as _model_scores  # noqa: E402,F401  (fills SCORERS)


def parse_score_names(text: str | Sequence[str]) -> list[str]:
    """Split ``"el2n,forgetting"`` and check every name; ConfigError lists the known ones."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--scores: give at least one score name")
    known = sorted(set(SCORERS.names()) | set(HISTORY_SCORERS.names()))
    for n in names:
        if n not in SCORERS and n not in HISTORY_SCORERS:
            raise ConfigError(f"unknown score {n!r}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--scores: duplicate score name in {names}")
    return names


def score_batch(models: dict, x, y, names: Sequence[str]) -> dict:
    """Every model scorer in ``names`` for every model in ``models`` ({key: nn.Module}) on one
    batch. Returns {f"{name}@{key}": float32 numpy [B]}. The same function runs in unit tests
    and inside the Ray Data scoring actors, so both paths give equal numbers."""
    out = {}
    for key, model in models.items():
        for name in names:
            out[f"{name}@{key}"] = SCORERS[name](model, x, y).detach().float().cpu().numpy()
    return out
