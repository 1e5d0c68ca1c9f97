"""Scores computed from the proxy-training history (numpy only)."""
from __future__ import annotations

import numpy as np

from engine.errors import DataError
from engine.scores import HISTORY_SCORERS


@HISTORY_SCORERS.register("forgetting")
def forgetting(correct: np.ndarray) -> np.ndarray:
    """Forgetting events per sample (Toneva et al., ICLR 2019).

    ``correct``: bool [E, N], whether sample n was classified correctly when presented in
    epoch e (its prediction in its own training minibatch, as Toneva et al. record it).
    A forgetting event is a transition correct -> incorrect between consecutive
    presentations. Samples never classified correctly are "unforgettable" in the opposite
    sense: Toneva et al. rank them above every learned sample, so they get the score ``E``,
    larger than any possible count (at most floor(E / 2) events fit in E presentations).

    Returns float32 [N]; higher = harder to learn / more often forgotten.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] < 1:
        raise DataError(f"forgetting needs a history of shape [epochs, samples], got {correct.shape}")
    c = correct.astype(bool)
    events = np.sum(c[:-1] & ~c[1:], axis=0).astype(np.float32)
    never_learned = ~c.any(axis=0)
    events[never_learned] = np.float32(c.shape[0])
    return events
