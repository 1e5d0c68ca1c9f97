"""Peak memory of the whole pipeline (score -> select -> train) on N and 4N generated
ImageNet-shaped JPEGs, streamed: does any process grow with the data?

    .venv/bin/python bench/memory_scale.py [--n 5000] [--factor 4] [--size 64] [--work /tmp/winnow-mem]

Generates a one-folder-per-class tree of JPEGs of 200-500 px a side (10 classes, quality 90),
then for N and factor x N images runs, each as its own job with its own private Ray:

    jobs.score  --proxy-loader stream --scores el2n,forgetting --seeds 1 --epochs 2 --image-size S
    jobs.select --selector topk --column el2n --fraction 0.3
    jobs.train  --loader ray-data --epochs 1 --image-size S --manifest ...

While a job runs, every 0.2 s the RSS of each process in its tree (/proc: the driver, Ray's
GCS, raylet and dashboard, every worker: Ray Train workers, Ray Data read and sort tasks,
scoring actors) is read; the peak per process kind is reported, and the factor x N peak over
the N peak. Also the proxies' training throughput: the same score job with --proxy-loader
memory on N images, against the streamed one (the per-epoch loop lines and the stage time).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_tree(root: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 200-500 px a side in 10 class folders (reused if already there)."""
    from PIL import Image

    from tests.imagenet_tree import _smooth

    if root.is_dir() and sum(1 for _ in root.rglob("*.JPEG")) == n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(200, 501, 2))
        path = root / f"c{i % 10}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth(rng, h, w)).save(path, format="JPEG", quality=90)


def _children(pid: int) -> list:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _rss_and_kind(pid: int):
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, StopIteration):
        return None
    if "jobs." in cmd and "-m" in cmd:
        kind = "driver"
    elif cmd.startswith("ray::"):
        kind = re.sub(r"[:(].*", "", cmd[5:]).strip() or "ray worker"  # e.g. RayTrainWorker, ReadSource->...
        kind = "ray::" + kind.split()[0]
    else:
        kind = next((k for k in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor")
                     if k in cmd), "other")
    return rss, kind


def run_measured(argv: list, env: dict) -> tuple:
    """Run a job; returns (exit code, output, {kind: peak RSS bytes of one process of that kind})."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict = {}
    out: list = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        todo, seen = [proc.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo += _children(pid)
            got = _rss_and_kind(pid)
            if got:
                rss, kind = got
                peaks[kind] = max(peaks.get(kind, 0), rss)
        time.sleep(0.2)
    reader.join(timeout=10)
    return proc.returncode, "".join(out), peaks


def pipeline(data: str, size: int, work: Path, env: dict) -> dict:
    py = sys.executable
    jobs = {
        "score": [py, "-m", "jobs.score", "--data", data, "--image-size", str(size), "--proxy-loader", "stream",
                  "--scores", "el2n,forgetting", "--seeds", "1", "--epochs", "2", "--batch-size", "128",
                  "--out", str(work / "score")],
        "select": [py, "-m", "jobs.select", "--scores", str(work / "score" / "scores.parquet"), "--selector", "topk",
                   "--column", "el2n", "--fraction", "0.3", "--out", str(work / "manifest.parquet")],
        "train": [py, "-m", "jobs.train", "--data", data, "--image-size", str(size), "--loader", "ray-data",
                  "--epochs", "1", "--batch-size", "128", "--manifest", str(work / "manifest.parquet"),
                  "--out", str(work / "train")],
    }
    result = {}
    for name, argv in jobs.items():
        t0 = time.time()
        code, out, peaks = run_measured(argv, env)
        if code != 0:
            raise SystemExit(f"{name} failed ({code}):\n{out[-3000:]}")
        result[name] = {"wall_s": time.time() - t0, "peaks": peaks, "out": out}
    return result


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--work", default="/tmp/winnow-mem")
    a = ap.parse_args()
    work = Path(a.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WINNOW_CACHE": str(work / "cache")}
    env.pop("RAY_ADDRESS", None)
    results = {}
    for n in (a.n, a.n * a.factor):
        t0 = time.time()
        make_tree(work / f"tree-{n}", n)
        print(f"tree of {n} JPEGs ready ({time.time() - t0:.0f}s)", flush=True)
        results[n] = pipeline(f"imagefolder:{work / f'tree-{n}'}", a.size, work / f"run-{n}", env)
        for job, r in results[n].items():
            print(f"N={n} {job}: {r['wall_s']:.0f}s, peaks (GiB) " +
                  ", ".join(f"{k} {_gib(v)}" for k, v in sorted(r["peaks"].items())), flush=True)

    small, large = a.n, a.n * a.factor
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), image size {a.size}, {time.strftime('%Y-%m-%d')}\n")
    print(f"| job | process | peak RSS at N={small} (GiB) | at {a.factor}N={large} (GiB) | ratio |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for job in ("score", "select", "train"):
        kinds = sorted(set(results[small][job]["peaks"]) | set(results[large][job]["peaks"]))
        for k in kinds:
            p1, p4 = results[small][job]["peaks"].get(k, 0), results[large][job]["peaks"].get(k, 0)
            ratio = p4 / p1 if p1 else float("nan")
            if p1 > 50 * 2**20:  # ignore processes of a few MB (shell helpers)
                worst = max(worst, ratio)
            print(f"| {job} | {k} | {_gib(p1)} | {_gib(p4)} | {ratio:.2f} |")
    print(f"\nworst ratio over processes above 50 MB: {worst:.2f}")

    # proxies' throughput: streamed (above) against in memory, N images
    py = sys.executable
    mem = run_measured([py, "-m", "jobs.score", "--data", f"imagefolder:{work / f'tree-{small}'}", "--image-size",
                        str(a.size), "--proxy-loader", "memory", "--scores", "el2n,forgetting", "--seeds", "1",
                        "--epochs", "2", "--batch-size", "128", "--out", str(work / "score-memory")], env)
    for label, out in (("stream", results[small]["score"]["out"]), ("memory", mem[1])):
        stage = re.search(r"stage proxies: .* in ([\d.]+)s", out)
        loops = re.findall(r"proxy seed 0: epoch \d+/\d+ .*?(\d+) rows in ([\d.]+)s", out)
        rates = [f"{int(r) / float(t):.0f}" for r, t in loops]
        print(f"proxies {label}: stage {stage.group(1) if stage else '?'} s for 2 epochs of {small} images; "
              f"loop images/s per epoch: {', '.join(rates) or '?'}")


if __name__ == "__main__":
    main()
