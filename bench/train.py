"""Training cost: subsets against full data, and the regularisers against plain training.

    python bench/train.py fraction --data fashion-mnist --model small-cnn --epochs 2 --fractions 1,0.5,0.3,0.1
    python bench/train.py regulariser --model resnet18-cifar --image-size 32 --batch 128 --steps 10
    python bench/train.py lcnn-table --data fashion-mnist --model small-cnn --epochs 5 --out runs/lcnn-table
    python bench/train.py lcnn-table ... --rows "LCNN + GradReg"      # some rows only

``fraction``: ``jobs.train``'s Ray Train path (``engine.distributed.train.fit_on_ray``, 1 worker) on
a random per-class fraction f of the training split for the same number of epochs; reports
the optimizer-loop time (``train_time_s``: the passes, without start-up and test evaluation),
the wall time, and ``time(f) / (f · time(1))`` (goal ≤ 1.1).

``regulariser``: seconds per optimizer step (forward, backward, SGD) of plain cross-entropy,
CE + λ·Curv (SLo-Curves, double backward), CE + μ·GradReg, and the LCNN model (centered
softplus, spectral norm, γ-Lipschitz BN) with and without GradReg, on random data of the given
shape, on CUDA when there is one (bf16 is not used: the regularisers difference gradients).

``lcnn-table``: the LCNN paper's model-geometry and robustness tables for the rows standard,
LCNN, GradReg and LCNN + GradReg: one ``python -m jobs.train`` per row (same data, model,
epochs, seed), then accuracy, E‖∇f‖, E‖∇²f‖, E C_f and ℓ2 PGD accuracy at ε ∈ {0.05, 0.1, 0.15,
0.2} from each row's metrics.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def bench_fraction(a) -> list:
    from engine.config import OptimConfig, TrainConfig
    from engine.data import load_source
    from engine.distributed.runtime import ray_session
    from engine.distributed.train import fit_on_ray

    src = load_source(a.data)
    train = src.arrays("train")
    rng = np.random.default_rng(0)
    rows = []
    with ray_session(num_cpus=os.cpu_count(), num_gpus=1 if torch.cuda.is_available() else 0, dashboard=False,
                     log_to_driver=False):
        for f in a.fractions:
            if f >= 1:
                ids, weight = None, None
            else:
                keep = [rng.choice(np.flatnonzero(train.label == c), max(1, round(f * np.sum(train.label == c))),
                                   replace=False) for c in np.unique(train.label)]
                ids = np.sort(train.sample_id[np.concatenate(keep)])
                weight = np.ones(len(ids))
            with tempfile.TemporaryDirectory() as out:
                cfg = TrainConfig(data=a.data, model=a.model, epochs=a.epochs, gpus=1 if torch.cuda.is_available() else 0,
                                  optim=OptimConfig(batch_size=a.batch), out=out)
                m = fit_on_ray(cfg, ids, weight)
            n = len(train) if ids is None else len(ids)
            rows.append({"fraction": f, "train_size": n, "train_time_s": m["train_time_s"],
                         "wall_time_s": m["wall_time_s"], "test_accuracy": m["test_accuracy"]})
            print(f"fraction {f}: {n} samples, loop {m['train_time_s']:.1f} s, wall {m['wall_time_s']:.1f} s, "
                  f"test acc {m['test_accuracy']:.4f}", flush=True)
    full = next((r for r in rows if r["fraction"] >= 1), None)
    print(f"\n{a.model} on {a.data}, {a.epochs} epochs, batch {a.batch}, {device_name()}, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print("| fraction f | samples | loop time (s) | wall time (s) | loop time / (f · full) | test accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["train_time_s"] / (r["fraction"] * full["train_time_s"]) if full else float("nan")
        r["ratio"] = ratio
        print(f"| {r['fraction']:g} | {r['train_size']} | {r['train_time_s']:.1f} | {r['wall_time_s']:.1f} | "
              f"{ratio:.2f} | {r['test_accuracy']:.4f} |")
    return rows


def bench_regulariser(a) -> list:
    from engine.models import build_model
    from engine.models.lcnn import LCNN_DEFAULTS
    from engine.train.regularizers import build_penalty
    from engine.units import L_INF_STEP, input_units

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.channels, a.image_size, a.image_size, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    lcnn = {"activation": "centered_softplus", "beta": LCNN_DEFAULTS["beta"], "spectral_norm": True,
            "bn_gamma": LCNN_DEFAULTS["bn_gamma"]}
    eps = input_units(L_INF_STEP, 0.25)  # 8/255 pixel units over a typical std
    variants = [
        ("plain CE", {}, None),
        ("CE + λ·Curv (λ=1)", {}, build_penalty(curvature_lambda=1.0, curvature_eps=eps)),
        ("CE + μ·GradReg (μ=0.01)", {}, build_penalty(gradreg_mu=0.01)),
        ("LCNN model, CE", lcnn, None),
        ("LCNN model + GradReg", lcnn, build_penalty(gradreg_mu=0.01)),
    ]
    rows = []
    for name, opts, penalty in variants:
        torch.manual_seed(0)
        model = build_model(a.model, a.channels, 10, a.image_size, **opts).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            ce = F.cross_entropy(model(x), y, reduction="none")
            if penalty is not None:
                ce = ce + penalty(model, x, y)
            opt.zero_grad(set_to_none=True)
            ce.mean().backward()
            opt.step()

        for _ in range(a.warmup):
            step()
        times = []
        for _ in range(a.steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"variant": name, "s_per_step": statistics.median(times)})
        print(f"{name}: {rows[-1]['s_per_step']:.4f} s/step", flush=True)
    base = rows[0]["s_per_step"]
    print(f"\n{a.model} {a.image_size}x{a.image_size}x{a.channels}, batch {a.batch}, float32, {device_name()}, "
          f"torch {torch.__version__}, median of {a.steps} steps after {a.warmup} warm-up")
    print("| training | s / step | × plain CE |\n|---|---|---|")
    for r in rows:
        r["ratio"] = r["s_per_step"] / base
        print(f"| {r['variant']} | {r['s_per_step']:.4f} | {r['ratio']:.2f} |")
    return rows


LCNN_ROWS = {"standard": [], "LCNN": ["--lcnn"], "GradReg": ["--gradreg", "{mu}"],
             "LCNN + GradReg": ["--lcnn", "--gradreg", "{mu}"]}


def lcnn_rows(text: str) -> list:
    """``--rows``: comma-separated names of LCNN_ROWS (checked when the arguments are parsed)."""
    wanted = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in LCNN_ROWS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown row(s) {unknown or [text]}; known: {', '.join(LCNN_ROWS)}")
    return wanted


def bench_lcnn_table(a) -> list:
    import subprocess

    rows = []
    for name, extra in ((n, LCNN_ROWS[n]) for n in a.rows):
        out = Path(a.out) / name.replace(" + ", "-").replace(" ", "-").lower()
        cmd = [sys.executable, "-m", "jobs.train", "--data", a.data, "--model", a.model, "--epochs", str(a.epochs),
               "--batch-size", str(a.batch), "--seed", str(a.seed), "--geometry", "--pgd-eps", "0.05,0.1,0.15,0.2",
               "--pgd-steps", str(a.pgd_steps), "--eval-samples", str(a.eval_samples), "--out", str(out),
               *[e.format(mu=a.mu) for e in extra]]
        if a.gpus:
            cmd += ["--gpus", "1"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        m = json.loads((out / "metrics.json").read_text())
        g, r = m["geometry"], m["robust_accuracy"]
        rows.append({"row": name, "accuracy": m["test_accuracy"], "grad_norm": g["grad_norm"],
                     "hessian_norm": g["hessian_norm"], "normalized_curvature": g["normalized_curvature"],
                     "pgd": {k: v for k, v in r.items() if k != "0"}, "clean_eval": r["0"],
                     "train_time_s": m["train_time_s"], "wall_time_s": m["wall_time_s"]})
    print(f"\n{a.model} on {a.data}, {a.epochs} epochs, batch {a.batch}, seed {a.seed}, GradReg μ={a.mu}; "
          f"geometry and PGD ({a.pgd_steps} steps) on the first {a.eval_samples} test images; {device_name()}")
    print("| model | test acc | E‖∇f‖₂ | E‖∇²f‖₂ | E C_f | PGD 0.05 | PGD 0.1 | PGD 0.15 | PGD 0.2 | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["pgd"]
        print(f"| {r['row']} | {r['accuracy']:.4f} | {r['grad_norm']:.3f} | {r['hessian_norm']:.3f} | "
              f"{r['normalized_curvature']:.3f} | " + " | ".join(f"{p[k]:.3f}" for k in ("0.05", "0.1", "0.15", "0.2"))
              + f" | {r['train_time_s']:.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fraction")
    f.add_argument("--data", default="fashion-mnist-mini")
    f.add_argument("--model", default="small-cnn")
    f.add_argument("--epochs", type=int, default=3)
    f.add_argument("--batch", type=int, default=128)
    f.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 0.5, 0.3, 0.1])
    r = sub.add_parser("regulariser")
    r.add_argument("--model", default="resnet18-cifar")
    r.add_argument("--image-size", type=int, default=32)
    r.add_argument("--channels", type=int, default=3)
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--warmup", type=int, default=2)
    t = sub.add_parser("lcnn-table")
    t.add_argument("--data", default="fashion-mnist")
    t.add_argument("--model", default="small-cnn")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mu", type=float, default=0.01, help="GradReg weight")
    t.add_argument("--pgd-steps", type=int, default=20)
    t.add_argument("--eval-samples", type=int, default=1000)
    t.add_argument("--gpus", action="store_true")
    t.add_argument("--rows", type=lcnn_rows, default=list(LCNN_ROWS),
                   help="comma-separated subset of: " + ", ".join(LCNN_ROWS) + " (default: all)")
    t.add_argument("--out", default="runs/lcnn-table")
    for s in (f, r, t):
        s.add_argument("--json", default=None)
    a = p.parse_args()
    rows = {"fraction": bench_fraction, "regulariser": bench_regulariser, "lcnn-table": bench_lcnn_table}[a.what](a)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "device": device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
