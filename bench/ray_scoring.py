"""Ray Data scoring throughput against a plain single-process loop over the same data in memory.

    python bench/ray_scoring.py --rows 200000 --model resnet18-cifar            # GPU: 1 actor, 1 GPU
    python bench/ray_scoring.py --rows 200000 --model torchvision:resnet50 --image-size 224 --batch 256
    python bench/ray_scoring.py --rows 40000 --model small-cnn --actors 1,2 --cpus-per-actor 0.5  # CPU scaling

For each actor count, ``jobs.score``'s scoring stage (``engine.distributed.scoring.score_on_ray``:
read tasks, the actor pool, shards written as partitions finish, the merge and checks) scores
``synthetic:ROWS,SxS,3`` with EL2N of one randomly initialised model; the plain loop scores
the same uint8 images, generated in memory beforehand, batch by batch in this process
(uint8 to the device, normalise there, forward).

Two figures for each path, and the ratios of both:

* end to end: rows / wall seconds of the whole call, including the fixed start-up (Ray Data
  planning, the actor's process start, imports, CUDA context, model load and warm-up, read
  tasks filling the queue; shards, merge and checks at the end). For the plain loop the
  matching figure counts its model build, transfer to the device and warm-up batches, but not
  making the arrays in memory (already imported torch and initialised CUDA in this process
  are its advantage).
* steady state: the plain loop's timed pass after its warm-up; for Ray Data, the rows of the
  actor calls that ended after the first call, over the time from the first call's end to the
  last one's (actor-side clocks; ``bench/telemetry.py``, attached by ``engine.hooks``), i.e. the pipeline's rate
  once an actor is computing: reads, transfers, Ray's per-call costs and the actor's own work,
  without the fixed start-up. With a few calls only (4,096 rows each) it is a rough figure.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch


def plain_loop(cfg, state, device, precision: str) -> dict:
    from engine.data import load_source
    from engine.models import build_model
    from engine.scores import score_batch
    from engine.train import batch_to_input

    source = load_source(cfg.data)
    info = source.info()
    parts = [b for p in source.partitions("train", 8192) for b in p.read()]
    images = np.concatenate([b["image"] for b in parts])
    labels = np.concatenate([b["label"] for b in parts])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    model = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
    model.load_state_dict(state)
    model = model.to(device).eval()
    if device.type == "cuda":
        images = torch.from_numpy(images).pin_memory()
    B = cfg.score_batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n):
        for i in range(0, n, B):
            x = batch_to_input(images[i:i + B], info, device)
            y = torch.as_tensor(labels[i:i + B]).to(device, non_blocking=True)
            score_batch({"m": model}, x, y, [("el2n", "m")], {}, precision)

    run(min(len(labels), 4 * B))                      # warm-up (cuDNN autotune, allocator)
    sync()
    t0 = time.perf_counter()
    run(len(labels))
    sync()
    t1 = time.perf_counter()
    return {"steady": len(labels) / (t1 - t0), "startup_s": t0 - t_start,
            "e2e": len(labels) / (t1 - t_start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model", default="resnet18-cifar")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--actors", default="1", help="comma-separated actor counts to measure")
    p.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="logical CPUs per actor (0.5 on a 2-core machine leaves the read tasks a slot)")
    p.add_argument("--pool", choices=["fixed", "autoscale"], default="fixed",
                   help="fixed: all N actors start up front (measures throughput, not the autoscaler); "
                        "autoscale: min 1, max N")
    p.add_argument("--precision", default=None, choices=["float32", "bf16"],
                   help="default: bf16 on CUDA, float32 on CPU")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from bench.telemetry import last_run
    from engine.config import ScoreConfig
    from engine.data import load_source
    from engine.distributed.runtime import ray_session
    from engine.distributed.scoring import score_on_ray
    from engine.models import build_model
    from engine.train import seed_everything

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = a.precision or ("bf16" if cuda else "float32")
    spec = f"synthetic:{a.rows},{a.image_size}x{a.image_size},3"
    base = ScoreConfig(data=spec, model=a.model, score_batch_size=a.batch, precision=precision,
                       gpus_per_actor=1.0 if cuda else 0.0)
    info = load_source(spec).info()
    seed_everything(0)
    state = build_model(a.model, 3, info.num_classes, a.image_size).state_dict()
    states = {"s0e0": state}

    plain = plain_loop(base, state, device, precision)
    loop = plain["steady"]
    dev = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"plain loop: {loop:.0f} rows/s steady, {plain['e2e']:.0f} rows/s end to end "
          f"({plain['startup_s']:.1f} s model build, transfer and warm-up) "
          f"({dev}, torch threads {torch.get_num_threads()}, {precision})", flush=True)
    rows = [{"what": "plain loop", "e2e": plain["e2e"], "steady": loop, "startup_s": plain["startup_s"]}]
    os.environ["WINNOW_HOOKS"] = "bench.telemetry"  # before Ray starts: its actors inherit it
    with ray_session(num_cpus=os.cpu_count(), num_gpus=1 if cuda else 0, dashboard=False):
        for n in [int(x) for x in a.actors.split(",")]:
            cfg = ScoreConfig(**{**base.__dict__, "actors": n, "cpus_per_actor": a.cpus_per_actor,
                                 "min_actors": n if a.pool == "fixed" else 1})
            if cuda:
                cfg = ScoreConfig(**{**cfg.__dict__, "gpus_per_actor": round(1.0 / n, 3)})
            with tempfile.TemporaryDirectory() as work:
                t0 = time.perf_counter()
                cols = score_on_ray(cfg, states, [("el2n", "s0e0")], {}, work_dir=Path(work))
                wall = time.perf_counter() - t0
            assert len(cols["sample_id"]) == a.rows
            rate, st = a.rows / wall, dict(last_run)
            steady = st.get("steady_rows_per_s") or float("nan")
            rows.append({"what": f"Ray Data, {n} actor(s)", "e2e": rate, "steady": steady, "wall_s": wall,
                         "startup_s": st.get("first_block_s"), "inits": st.get("inits"),
                         "busy_s": st.get("busy_s"), "blocks": st.get("blocks")})
            inits = ", ".join(f"{x:.1f}-{y:.1f} s" for x, y in st.get("inits") or []) or "?"
            print(f"Ray Data, {n} actor(s): {rate:.0f} rows/s end to end ({wall:.1f} s, including start-up), "
                  f"{rate / plain['e2e']:.2f}x the plain loop end to end and {rate / loop:.2f}x its steady rate; "
                  f"steady state {steady:.0f} rows/s = {steady / loop:.2f}x the plain loop's "
                  f"(first call ended at {st.get('first_block_s') or float('nan'):.1f} s; actor constructor(s) "
                  f"{inits} after the call started; {st.get('blocks')} blocks; actors busy "
                  f"{st.get('busy_s') or 0:.1f} s)", flush=True)
    print(f"\n{a.model} {a.image_size}x{a.image_size}, batch {a.batch}, {a.rows} rows, {dev}, {precision}, "
          f"{a.cpus_per_actor} CPU/actor, {a.pool} pool, "
          f"torch {torch.__version__}, ray {importlib.metadata.version('ray')}, {platform.python_version()}")
    print("| path | end to end rows/s | × plain loop (end to end) | steady rows/s | × plain loop (steady) | start-up s |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        su = f"{r['startup_s']:.1f}" if r.get("startup_s") is not None else "?"
        print(f"| {r['what']} | {r['e2e']:.0f} | {r['e2e'] / plain['e2e']:.2f} | {r['steady']:.0f} | "
              f"{r['steady'] / loop:.2f} | {su} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "device": dev, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
