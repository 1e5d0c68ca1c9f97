"""The two units a per-coordinate input step is given in, and the one conversion between them.

Users give steps in **[0, 1] pixel units** (the image divided by 255): the SLo-Curves step
``8/255``, the common L∞ budget, is the default of the ``curvature`` score and of the
``CE + λ·Curv`` regulariser. Models see **normalised input units** ``(x − mean) / std``, where
the same step is ``step / std``; with per-channel stds Winnow divides by their mean, so the
step is one number per input.
"""
from __future__ import annotations

from typing import Sequence

L_INF_STEP = 8 / 255  # Curv's default step per input coordinate, [0, 1] pixel units


def input_units(step_pixels: float, std: Sequence[float] | float) -> float:
    """A per-coordinate step in [0, 1] pixel units -> the model's normalised input units,
    ``step / mean(std)``."""
    s = [float(v) for v in std] if isinstance(std, (list, tuple)) else [float(std)]
    return float(step_pixels) / (sum(s) / len(s))
