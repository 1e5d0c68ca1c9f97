"""Where a short retraining run's wall time goes, and a sweep trial's (issue 35's measurement).

    python bench/overhead.py run --runs 3 --epochs 3      # jobs.train's stage, 1 worker, fashion-mnist-mini
    python bench/overhead.py run --executor ray-train     # the same on a one-worker TorchTrainer
    python bench/overhead.py sweep --trials 3 --epochs 3  # full-data trials through Tune, one at a time
    python bench/overhead.py sweep --trials 6 --concurrent 2  # two at a time (the wall per trial)

Every phase a run reaches is recorded through ``engine.hooks`` (``train.timing``, written by
``bench/telemetry.py`` from the driver, rank 0 and a sweep's Tune function into one file), and a
run's wall time is cut into:

    stage setup      stage_start -> fit_start    manifest and data checks, TorchTrainer built
    Ray Train start  fit_start -> loop_start     controller, worker group, worker process, imports
                                                 (in-process: the checkpoint check only)
    worker setup     loop_start -> ready         data loaded, model built, DDP wrap, restore
    training         pass_start -> trained       the optimizer loop (sum over passes)
    evaluation       trained -> evaluated        test accuracy (+ the final pass's extra metrics)
    checkpoint       evaluated -> reported       state saved, ray.train.report with the checkpoint
    between passes   reported -> pass_start      (the next pass's)
    after the loop   reported -> loop_end        last report to the loop's end
    Ray Train stop   loop_end -> fit_end         controller notices the end, worker group shut down
    stage finish     fit_end -> stage_end        final checkpoint read, model.pt, metrics.json

``overhead`` is the wall time minus training and evaluation. For a sweep, ``Tune`` is the time
outside the trials' ``train_stage`` (from the sweep stage's start, between trials, to its end)
divided over the trials, and ``trial function`` the time inside a trial outside its stage. The
first run of a process pays Ray's start-up and imports: rows after the first are the steady cost.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PHASES = [("stage setup", "stage_start", "fit_start"), ("Ray Train start", "fit_start", "loop_start"),
          ("worker setup", "loop_start", "ready"), ("Ray Train stop", "loop_end", "fit_end"),
          ("stage finish", "fit_end", "stage_end")]
PER_PASS = [("training", "pass_start", "trained"), ("evaluation", "trained", "evaluated"),
            ("checkpoint", "evaluated", "reported")]


def runs_of(records: list, by_process: bool = False) -> list:
    """The records cut into runs, each from a ``stage_start`` to the next (``by_process``: within
    each process, for trials that ran at the same time in processes of their own)."""
    if by_process:
        return [run for pid in sorted({r["pid"] for r in records})
                for run in runs_of([r for r in records if r["pid"] == pid])]
    out = []
    for r in sorted(records, key=lambda r: r["t"]):
        if r["phase"] == "stage_start":
            out.append([])
        if out:
            out[-1].append(r)
    return out


def breakdown(run: list) -> dict:
    first = {}
    for r in run:
        first.setdefault(r["phase"], r["t"])
    row = {name: first[b] - first[a] for name, a, b in PHASES if a in first and b in first}
    passes = sorted({r["epoch"] for r in run if r["epoch"] is not None})
    at = {(r["phase"], r["epoch"]): r["t"] for r in run}
    for name, a, b in PER_PASS:
        row[name] = sum(at[(b, e)] - at[(a, e)] for e in passes if (a, e) in at and (b, e) in at)
    row["between passes"] = sum(at[("pass_start", e)] - at[("reported", e - 1)] for e in passes
                                if ("reported", e - 1) in at and ("pass_start", e) in at)
    if passes and ("reported", passes[-1]) in at and "loop_end" in first:
        row["after the loop"] = first["loop_end"] - at[("reported", passes[-1])]
    row["wall"] = first["stage_end"] - first["stage_start"]
    row["overhead"] = row["wall"] - row["training"] - row["evaluation"]
    row["passes"] = len(passes)
    return row


def print_table(rows: list, extra: tuple = ()) -> None:
    cols = [n for n, _, _ in PHASES[:3]] + [n for n, _, _ in PER_PASS] + ["between passes", "after the loop",
                                                                           "Ray Train stop", "stage finish", *extra,
                                                                           "wall", "overhead"]
    print("| run | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for i, r in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(f"{r.get(c, float('nan')):.2f}" for c in cols) + " |")
    if len(rows) > 1:
        steady = rows[1:]
        print("| mean of runs 2+ | " + " | ".join(f"{statistics.mean(r.get(c, float('nan')) for r in steady):.2f}"
                                                   for c in cols) + " |")


def bench_runs(a, records_file: Path) -> list:
    from engine.config import TrainConfig
    from engine.stages.train import train_stage

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            train_stage(TrainConfig(data=a.data, model=a.model, epochs=a.epochs, seed=i, out=f"{tmp}/run{i}",
                                    executor=a.executor))
    return [breakdown(r) for r in runs_of(_read(records_file))]


def bench_sweep(a, records_file: Path) -> list:
    from engine.stages.sweep import sweep_stage
    from engine.sweep import sweep_from_dict

    cfg = sweep_from_dict({"name": "overhead", "data": a.data, "model": a.model, "train": {"epochs": a.epochs},
                           "param_space": {"selector": ["full"], "seed": list(range(a.trials))},
                           "resources": {"cpus_per_trial": 1.0, "max_concurrent_trials": a.concurrent}})
    with tempfile.TemporaryDirectory() as tmp:
        _record("sweep_start")
        sweep_stage(cfg, Path(tmp) / "sweep", "bench/overhead.py", report=False)
        _record("sweep_end")
    records = _read(records_file)
    rows = [breakdown(r) for r in runs_of([r for r in records if r["phase"] not in TRIAL_PHASES], a.concurrent > 1)]
    t = {p: sorted(r["t"] for r in records if r["phase"] == p) for p in (*TRIAL_PHASES, "stage_start", "stage_end")}
    total = t["sweep_end"][0] - t["sweep_start"][0]
    outside = total - sum(e - s for s, e in zip(t["trial_start"], t["trial_end"]))
    print(f"sweep: {len(t['trial_start'])} trial(s), {a.concurrent} at a time: {total:.2f} s, "
          f"{total / max(1, len(t['trial_start'])):.2f} s per trial", flush=True)
    if a.concurrent > 1:  # trials overlap: the per-trial rows are their own phases only
        return rows
    for row, s, e, ss, se in zip(rows, t["trial_start"], t["trial_end"], t["stage_start"], t["stage_end"]):
        row["trial function"] = (e - s) - (se - ss)
        row["Tune"] = outside / len(rows)
        row["wall"] += row["trial function"] + row["Tune"]
        row["overhead"] += row["trial function"] + row["Tune"]
    return rows


TRIAL_PHASES = ("sweep_start", "sweep_end", "trial_start", "trial_end")


def _record(phase: str) -> None:
    with open(os.environ["WINNOW_TIMING_FILE"], "a") as f:
        f.write(json.dumps({"phase": phase, "epoch": None, "t": time.time(), "pid": os.getpid()}) + "\n")


def _read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("run", "sweep"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--data", default="fashion-mnist-mini")
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--concurrent", type=int, default=1, help="sweep: trials at a time (default 1)")
    p.add_argument("--executor", default="auto", choices=("auto", "ray-train", "in-process"),
                   help="run: jobs.train's --executor (auto: in-process here)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    records = Path(tempfile.mkdtemp()) / "timing.jsonl"
    os.environ["WINNOW_HOOKS"] = "bench.telemetry"  # before Ray starts: its workers inherit both
    os.environ["WINNOW_TIMING_FILE"] = str(records)
    from engine.distributed.runtime import ray_session

    t0 = time.time()
    with ray_session():
        print(f"ray_session start: {time.time() - t0:.1f} s", flush=True)
        rows = bench_runs(a, records) if a.what == "run" else bench_sweep(a, records)
    print(f"\n{a.what}: {a.data}, {a.model}, {a.epochs} epoch(s), 1 worker, {os.cpu_count()} CPUs; seconds\n")
    print_table(rows, extra=("trial function", "Tune") if a.what == "sweep" else ())
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
