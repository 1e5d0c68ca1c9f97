"""Proxies trained through Ray Train from Ray Data (issue 31, slice 2): the streamed path gives
the in-memory path's scores for the same seeds, with a training transform too, keeps the
forgetting history by sample_id, and resumes from its checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

from engine import artifacts
from engine.train.loops import keyed_batches, order_key


def test_order_key_is_a_function_of_the_id_seed_and_epoch():
    ids = np.arange(1000, dtype=np.int64) * 7919 + 3
    k = order_key(ids, 1, 2)
    assert k.dtype == np.uint64 and len(np.unique(k)) == len(ids)
    assert np.array_equal(order_key(ids[::-1], 1, 2), k[::-1])  # per id, whatever the row order
    assert not np.array_equal(np.argsort(k), np.argsort(order_key(ids, 1, 3)))
    assert not np.array_equal(np.argsort(k), np.argsort(order_key(ids, 2, 2)))
    perm = np.concatenate(keyed_batches(ids, 64, 1, 2))
    assert sorted(perm) == list(range(len(ids))) and np.all(np.diff(k[perm].astype(np.float64)) >= 0)


def _score(run_job, out, data, *extra):
    from jobs import score

    return run_job(score, ["--data", data, "--scores", "el2n,forgetting", "--seeds", "2", "--epochs", "2",
                           "--batch-size", "64", "--score-epochs", "0,2", "--out", out, *extra])


@pytest.mark.parametrize("data, extra", [("digits", ()), ("digits", ("--train-transform", "pad-crop-flip")),
                                         ("tree", ()), ("tree48", ())],
                         ids=["plain", "augmented", "jpeg-tree-rrc", "jpeg-tree-pad-crop-flip"])
def test_streamed_proxies_give_the_in_memory_scores(ray_local, run_job, tmp_path, data, extra):
    """digits: Ray Data sorts each pass into its order; the JPEG trees (one file per image) are
    read in that order directly (``Source.partitions_in_order``): as encoded bytes for rrc-flip
    (72 px), as decoded images for pad-crop-flip (48 px)."""
    if data.startswith("tree"):  # encoded images streamed as bytes, decoded and cropped (rrc-flip) downstream
        from tests.imagenet_tree import make_tree

        make_tree(tmp_path / "tree", train_per_class=6, val_per_class=1)
        data = f"imagefolder,size={48 if data == 'tree48' else 72}:{tmp_path / 'tree'}"
    tables = {}
    for loader in ("memory", "stream"):
        code, out, err = _score(run_job, tmp_path / loader, data, "--proxy-loader", loader, *extra)
        assert code == 0, err
        assert ("streamed through Ray Train" in out) == (loader == "stream"), out
        tables[loader] = artifacts.read_table(tmp_path / loader / "scores.parquet", "score table")
    (a, meta), (b, _) = tables["memory"], tables["stream"]
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    assert meta["config"]["proxy_loader"] == "memory"
    expected = ("pad-crop-flip" if "size=48" in data else "rrc-flip") if "imagefolder" in data else \
        (extra[-1] if extra else "none")
    assert meta["transforms"]["train"] == expected
    for col in a.column_names:
        if col in ("sample_id", "label"):
            continue
        np.testing.assert_allclose(b.column(col).to_numpy(), a.column(col).to_numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=col)
    assert np.ptp(a.column("forgetting").to_numpy()) > 0 or np.ptp(a.column("el2n_e2").to_numpy()) > 0


@pytest.mark.slow  # fault drill, about 90 s on 2 cores (make test-all)
def test_rerun_after_a_killed_driver_resumes_the_streamed_proxy(ray_local, run_job, tmp_path):
    """SIGKILL a real `python -m jobs.score --proxy-loader stream` once its proxy has a pass's
    checkpoint, rerun the same command: it resumes after that pass and writes the scores of an
    uninterrupted run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.drills import kill_when

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "jobs.score", "--data", "digits", "--scores", "el2n,forgetting", "--seeds", "1",
            "--epochs", "3", "--batch-size", "64", "--proxy-loader", "stream", "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(root)}
    # once Ray Train has registered a pass's checkpoint (its snapshot is written after)
    kill_when(argv, env, root, lambda: bool(list((out / "_partial" / "proxy_train").glob(
        "*/checkpoint_manager_snapshot.json"))))
    assert not (out / "scores.parquet").exists()
    rerun = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "proxy seed 0: resuming after epoch" in rerun.stdout + rerun.stderr, rerun.stdout + rerun.stderr
    code, _, err = run_job(__import__("jobs.score", fromlist=["score"]),
                           [*argv[3:-2], "--proxy-loader", "memory", "--out", tmp_path / "clean"])
    assert code == 0, err
    a, _ = artifacts.read_table(out / "scores.parquet", "score table")
    b, _ = artifacts.read_table(tmp_path / "clean" / "scores.parquet", "score table")
    for col in ("el2n", "forgetting"):
        np.testing.assert_allclose(a.column(col).to_numpy(), b.column(col).to_numpy(), rtol=1e-4, atol=1e-5)
