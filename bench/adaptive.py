"""What adaptive selection costs against the training it saves (issue 36's cost acceptance).

    python bench/adaptive.py --data fashion-mnist --epochs 40 --fraction 0.1 --selector gradmatch --every 20,5
    python bench/adaptive.py ... --full-epochs 4     # time the full-data run on 4 epochs, scale to --epochs
    python bench/adaptive.py ... --select-params batch=32   # GRAD-MATCH-PB: per-class mini-batches as atoms
    python bench/adaptive.py ... --precision bf16           # the recomputation under bf16 autocast

For every R in ``--every`` one ``train_stage`` run (``jobs.train --reselect-every R``, one
worker in this process) and one full-data run of the same epochs, all with the same seed, model
and optimiser. From each run's metrics.json: the optimiser loop's seconds (``train_time_s``),
the selection's (``selection_time_s``: recomputing the selector's input over the whole split,
``selection_scoring_s``, and solving, ``selection_solving_s``), their sum (``cost_s``), the
samples seen and the test accuracy; then selection / training and the run's cost against the
full-data run's training seconds. ``--full-epochs E`` times the full-data run on E epochs and
scales its seconds by epochs / E (said so in the table); its accuracy is then that of E epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(data: str, model: str, epochs: int, out: str, seed: int, adaptive=None) -> dict:
    from engine.config import AdaptiveConfig, TrainConfig
    from engine.stages.train import train_stage

    cfg = TrainConfig(data=data, model=model, epochs=epochs, seed=seed, out=out,
                      adaptive=adaptive or AdaptiveConfig())
    cfg.validate()
    t0 = time.time()
    train_stage(cfg)
    m = json.loads((Path(out) / "metrics.json").read_text())
    m["job_wall_s"] = time.time() - t0
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--selector", default="gradmatch")
    p.add_argument("--every", default="20,5", help="comma-separated R values")
    p.add_argument("--select-params", default="", help="the selector's NAME=VALUE,... (jobs.train --select-params)")
    p.add_argument("--warm-start", default="none")
    p.add_argument("--precision", default="float32", help="the recomputation's: float32 or bf16 (--select-precision)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-epochs", type=int, default=0, help="time the full-data run on this many epochs (0: --epochs)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from engine.config import AdaptiveConfig
    from engine.distributed.runtime import ray_session
    from engine.params import parse_params

    params = parse_params(a.select_params) if a.select_params else {}

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ray_session(dashboard=False):
        full_epochs = a.full_epochs or a.epochs
        full = run(a.data, a.model, full_epochs, f"{tmp}/full", a.seed)
        scale = a.epochs / full_epochs
        full_train = full["train_time_s"] * scale
        for r in (int(x) for x in a.every.split(",")):
            ad = AdaptiveConfig(every=r, selector=a.selector, fraction=a.fraction, warm_start=a.warm_start,
                                params=params, precision=a.precision)
            m = run(a.data, a.model, a.epochs, f"{tmp}/r{r}", a.seed, ad)
            rows.append({"R": r, "selections": len(m["reselections"]), "train_s": m["train_time_s"],
                         "scoring_s": m["selection_scoring_s"], "solving_s": m["selection_solving_s"],
                         "selection_s": m["selection_time_s"], "cost_s": m["cost_s"],
                         "selection_vs_train": m["selection_share"], "cost_vs_full": m["cost_s"] / full_train,
                         "samples_vs_full": m["samples_vs_full"], "test_accuracy": m["test_accuracy"],
                         "job_wall_s": m["job_wall_s"]})
    print(f"\n{a.data}, {a.model}, {a.epochs} epochs, {a.selector} {a.select_params} at {a.fraction}, {a.precision}, warm start {a.warm_start}, "
          f"seed {a.seed}; {os.cpu_count()} CPUs. Full data: {full['train_time_s']:.1f} s of training for "
          f"{full_epochs} epoch(s)" + (f", x{scale:g} = {full_train:.1f} s for {a.epochs}" if scale != 1 else "")
          + f", test accuracy {full['test_accuracy']:.4f}\n")
    cols = ["R", "selections", "train_s", "scoring_s", "solving_s", "selection_s", "cost_s", "selection_vs_train",
            "cost_vs_full", "samples_vs_full", "test_accuracy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"full": {k: full[k] for k in ("train_time_s", "test_accuracy")},
                                            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
