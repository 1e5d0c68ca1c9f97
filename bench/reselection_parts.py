"""Where one adaptive reselection's seconds go, part by part (issue 36): the recomputation's
forward over the whole training split at two batch sizes and in float32 and bf16, and the
GRAD-MATCH solve per sample and per batch, on the same embeddings.

    python bench/reselection_parts.py --data fashion-mnist

An untrained small-cnn (the forward's cost does not depend on the weights); each forward is
timed twice and the second time kept (the first pays oneDNN's set-up); the solve runs the 10
classes one after the other (the builtin map) at ``--fraction``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--fraction", type=float, default=0.1)
    a = p.parse_args()
    import numpy as np
    import torch

    from engine.data import load_source
    from engine.models import build_model
    from engine.select import SELECTORS
    from engine.train.adaptive import selector_input

    src = load_source(a.data)
    info, full = src.info(), src.arrays("train")
    torch.manual_seed(0)
    model = build_model("small-cnn", info.image_shape[2], info.num_classes, info.image_shape[0])
    cpu = torch.device("cpu")
    print(f"{a.data}: {len(full)} images; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    emb = None
    for precision in ("float32", "bf16"):
        for bs in (512, 128):
            for _ in range(2):
                t0 = time.time()
                v = selector_input(model, full, info, cpu, "embeddings", None, bs, precision)
                s = time.time() - t0
            print(f"forward + embeddings, batches of {bs}, {precision}: {s:.2f} s")
            emb = v if precision == "float32" else emb
    labels = np.asarray(full.label).astype(np.int64)
    for batch in (1, 32):
        t0 = time.time()
        SELECTORS["gradmatch"](emb, labels, a.fraction, seed=0, batch=batch)
        print(f"gradmatch solve, batch={batch}, fraction {a.fraction}: {time.time() - t0:.2f} s")


if __name__ == "__main__":
    main()
