"""Per-sample last-layer gradient embeddings for CRAIG and GRAD-MATCH.

The gradient of the cross-entropy with respect to the final Linear layer's weight and bias is
the outer product ``(p − onehot(y)) ⊗ [h, 1]`` (h: penultimate features), of dimension
C·(d+1). Inner products factorise, <a⊗b, a'⊗b'> = <a, a'>·<b, b'>, so we compress each factor
separately with seeded Gaussian projections (a Kronecker-structured Johnson-Lindenstrauss
map, unbiased for inner products): the class factor is kept exactly when C ≤ 16, else
projected to 16; the feature factor to ``dim // classes_kept`` dimensions. With
C·(d+1) ≤ dim nothing is projected and the embedding is the exact last-layer gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.scores.model_scores import probs_and_features


def _projection(rows: int, cols: int, seed: int, device, dtype) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) / cols**0.5).to(device=device, dtype=dtype)


def grad_embedding(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int = 512, seed: int = 0) -> torch.Tensor:
    """float32 [B, D] last-layer gradient embeddings, D ≤ ``dim`` (see the module docstring)."""
    p, h, has_bias = probs_and_features(model, x, "gradient embeddings")
    err = p - F.one_hot(y, p.shape[1]).float()
    if has_bias:
        h = torch.cat([h, torch.ones(len(h), 1, device=h.device)], 1)
    C, d1 = err.shape[1], h.shape[1]
    if C * d1 <= dim:
        return (err[:, :, None] * h[:, None, :]).flatten(1)
    if C > 16:
        err = err @ _projection(C, 16, seed, err.device, err.dtype)
    keep_h = max(1, dim // err.shape[1])
    if d1 > keep_h:
        h = h @ _projection(d1, keep_h, seed + 1, h.device, h.dtype)
    return (err[:, :, None] * h[:, None, :]).flatten(1)
