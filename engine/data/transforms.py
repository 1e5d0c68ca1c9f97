"""uint8 HWC images -> normalised float NCHW tensors (on whatever device the input is)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def normalize(images, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, C] (torch or numpy) -> float32 [N, C, H, W], ``(x/255 - mean)/std``."""
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = t.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()
