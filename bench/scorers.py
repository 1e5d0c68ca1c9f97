"""Time per sample of each scorer as a ratio to one plain training step of the same model and
batch on the same device (forward + backward + SGD step; bf16 autocast on CUDA, float32 on
CPU; the scorers run at the same precision where they allow it), and peak GPU memory of
every scorer (``grand`` above all) against the training step.

    python bench/scorers.py --model resnet18-cifar --image-size 32 --batch 512
    python bench/scorers.py --model torchvision:resnet50 --image-size 224 --batch 256

Prints a markdown table: scorer, seconds per batch, ms per sample, ratio to the training step,
and the goal of issue 3 where there is one.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.models import build_model
from engine.scores import score_batch

GOALS = {"el2n": "<= 0.3", "grand": "<= 1.5 (stretch 1.2)", "curvature": "<= 1.5"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18-cifar")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scorers", default="el2n,loss,grand_last,grand,curvature,nc")
    p.add_argument("--nc-iters", default="1,3", help="power iterations for nc, comma-separated")
    p.add_argument("--precision", default=None, choices=["float32", "bf16"],
                   help="scorer precision (jobs.score --precision); default bf16 on CUDA, float32 on CPU, "
                        "matching the training step")
    p.add_argument("--grand-conv", default=None, choices=["auto", "unfold", "ghost", "conv"],
                   help="per-sample conv norm method of grand (engine.scores.pergrad; default auto, "
                        "the cost model); forcing each one measures them on a new device")
    p.add_argument("--tf32", default=None, choices=["on", "off"],
                   help="TensorFloat-32 for curvature and nc on CUDA (default: curvature on, nc off)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)

    if a.grand_conv:
        import os

        os.environ["WINNOW_GRAND_CONV"] = a.grand_conv
    device = torch.device(a.device)
    precision = a.precision or ("bf16" if device.type == "cuda" else "float32")
    torch.manual_seed(0)
    model = build_model(a.model, 3, a.classes, a.image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    y = torch.randint(0, a.classes, (a.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base = timed(train_step, device, a.repeats)
    base_mem = peak_memory(train_step, device)
    rows = [{"scorer": "train step", "s_per_batch": base, "ratio": 1.0, "peak_gib": base_mem}]
    jobs = []
    tf32 = {} if a.tf32 is None else {"tf32": a.tf32 == "on"}
    for name in a.scorers.split(","):
        if name == "nc":
            jobs += [(f"nc k={k}", "nc", {"iters": int(k), **tf32}) for k in a.nc_iters.split(",")]
        else:
            jobs.append((name, name, tf32 if name == "curvature" else {}))
    for label, name, kw in jobs:
        fn = lambda: score_batch({"m": model}, x, y, [(name, "m")], {name: kw}, precision)
        t = timed(fn, device, a.repeats)
        mem = peak_memory(fn, device)
        rows.append({"scorer": label, "s_per_batch": t, "ratio": t / base, "peak_gib": mem})
        print(f"{label}: {t:.3f} s/batch, {t / base:.2f}x train step", flush=True)

    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{a.model} {a.image_size}x{a.image_size}, batch {a.batch}, {dev}, torch {torch.__version__}, "
          f"scorers in {precision} (curvature and nc always float32), grand conv method "
          f"{a.grand_conv or 'auto'}, tf32 {a.tf32 or 'default (curvature on, nc off)'}")
    print("| scorer | s / batch | ms / sample | × train step | goal (GPU) | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k = r["scorer"].split()[0]
        goal = GOALS.get(k, f"<= {0.5 + float(r['scorer'].split('=')[1]):.1f}" if k == "nc" else "")
        mem = "" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        print(f"| {r['scorer']} | {r['s_per_batch']:.3f} | {1000 * r['s_per_batch'] / a.batch:.2f} "
              f"| {r['ratio']:.2f} | {goal} | {mem} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "device": dev, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
