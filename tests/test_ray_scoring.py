"""The Ray Data scoring path (issue 5): equal to direct scorer calls with 1 and 2 actors,
complete and equal after an actor is killed mid-run, and resumable after the driver is killed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.config import ScoreConfig
from engine.data import load_source
from engine.models import build_model
from engine.scores import score_batch
from engine.train import batch_to_input, seed_everything
from tests.drills import kill_when

ROOT = Path(__file__).resolve().parent.parent


def init_states(cfg, seeds=(0, 1)):
    info = load_source(cfg.data).info()
    states = {}
    for s in seeds:
        seed_everything(s)
        model = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
        states[f"s{s}e0"] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


def direct(cfg, states, plan, params=None):
    """The same scores by plain calls over the in-memory arrays, in sample_id order."""
    source = load_source(cfg.data)
    info, arr = source.info(), source.arrays("train")
    models = {}
    for key, state in states.items():
        m = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
        m.load_state_dict(state)
        models[key] = m.eval()
    order = np.argsort(arr.sample_id)
    out = {}
    for i in range(0, len(order), 256):
        idx = order[i:i + 256]
        x = batch_to_input(arr.image[idx], info, torch.device("cpu"))
        y = torch.as_tensor(arr.label[idx])
        for k, v in score_batch(models, x, y, plan, params or {}).items():
            out.setdefault(k, []).append(v)
    return arr.sample_id[order], arr.label[order], {k: np.concatenate(v) for k, v in out.items()}


PLAN = [("el2n", "s0e0"), ("el2n", "s1e0"), ("grand", "s0e0")]


@pytest.mark.parametrize("actors", [1, 2])
def test_ray_data_scores_equal_direct_calls(ray_local, tmp_path, actors):
    from engine.distributed.scoring import score_on_ray

    cfg = ScoreConfig(data="digits", model="small-cnn", actors=actors, score_batch_size=128)
    states = init_states(cfg)
    got = score_on_ray(cfg, states, PLAN, {}, work_dir=tmp_path / "work")
    ids, labels, ref = direct(cfg, states, PLAN)
    np.testing.assert_array_equal(got["sample_id"], ids)
    np.testing.assert_array_equal(got["label"], labels)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6)
    assert set(got) == {"sample_id", "label", *ref}          # no bookkeeping column leaks out


@pytest.mark.slow  # fault drill, 13 s on 2 cores (make test-all)
def test_killed_actor_is_restarted_and_nothing_is_lost(ray_local, tmp_path, capsys):
    from engine.distributed.scoring import score_on_ray
    from tests.drills import KILL_ACTOR as CHAOS_FILE

    cfg = ScoreConfig(data="digits", model="small-cnn", actors=1, score_batch_size=64)
    states = init_states(cfg)
    work = tmp_path / "work"
    work.mkdir()
    (work / CHAOS_FILE).touch()         # the first batch's actor deletes it and exits (code 17)
    got = score_on_ray(cfg, states, PLAN, {}, work_dir=work)
    assert not (work / CHAOS_FILE).exists(), "no actor died: the drill did not run"
    ids, labels, ref = direct(cfg, states, PLAN)
    np.testing.assert_array_equal(got["sample_id"], ids)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # fault drill, 43 s on 2 cores (make test-all)
def test_rerun_after_driver_kill_reuses_shards(ray_local, tmp_path):
    """SIGKILL a real `python -m jobs.score` once some shards are on disk, rerun the same
    command, and check it reuses them and writes the same scores as direct calls."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "jobs.score", "--data", "synthetic:24000,16x16,1", "--model", "small-cnn",
            "--scores", "grand,el2n", "--seeds", "1", "--epochs", "0", "--score-batch-size", "512",
            "--actors", "1", "--out", str(out)]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    shards = out / "_partial" / "shards"
    kill_when(argv, env, ROOT, lambda: len(list(shards.glob("part-*.parquet"))) >= 2, timeout=240)
    finished_first = len(list(shards.glob("part-*.parquet")))
    assert finished_first >= 2 and not (out / "scores.parquet").exists()
    kept = len(list(shards.glob("part-*.parquet")))
    assert kept < 6, "the run had already finished every shard"
    rerun = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming: reusing 1 trained proxies" in rerun.stdout
    assert f"resuming: reusing {kept} finished shard(s)" in rerun.stdout, rerun.stdout
    assert not (out / "_partial").exists()
    table = pq.read_table(out / "scores.parquet").to_pydict()
    cfg = ScoreConfig(data="synthetic:24000,16x16,1", model="small-cnn")
    ids, labels, ref = direct(cfg, init_states(cfg, seeds=(0,)), [("grand", "s0e0"), ("el2n", "s0e0")])
    np.testing.assert_array_equal(table["sample_id"], ids)
    np.testing.assert_array_equal(table["label"], labels)
    np.testing.assert_allclose(table["grand"], ref["grand@s0e0"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table["el2n"], ref["el2n@s0e0"], rtol=1e-4, atol=1e-6)


@pytest.fixture
def telemetry():
    """bench/telemetry.py's columns on the actor calls made in this process."""
    from engine import hooks

    hooks.install("bench.telemetry")
    yield
    hooks.uninstall_all()


def test_actor_scores_whole_blocks_in_mini_batches_exactly_like_score_batch(ray_local, telemetry):
    """A map_batches call gets a whole block (thousands of rows); the actor scores it in
    mini-batches of the score batch size with one device sync per call. Its scores and
    gradient embeddings equal ``score_batch`` / ``grad_embedding`` on the same mini-batches
    bit for bit, the last (short) mini-batch included, and the benchmark telemetry's
    bookkeeping (engine.hooks) is per call."""
    from engine.distributed.scoring import ScoringActor
    from engine.scores.embeddings import grad_embedding

    cfg = ScoreConfig(data="digits", model="small-cnn")
    states = init_states(cfg)
    source = load_source(cfg.data)
    info, arr = source.info(), source.arrays("train")
    n, B = 1000, 128                                    # 7 full mini-batches and one of 104 rows
    block = {"sample_id": arr.sample_id[:n], "label": arr.label[:n], "image": arr.image[:n],
             "part": np.zeros(n, dtype=np.int32)}
    actor = ScoringActor("small-cnn", info, [ray_local.put(states)], PLAN, {}, 0.0, embed=("s1e0", 16),
                         batch_rows=B)
    got = actor(block)
    again = actor(block)
    models = {}
    for key, state in states.items():
        m = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
        m.load_state_dict(state)
        models[key] = m.eval()
    ref = {}
    for i in range(0, n, B):
        j = min(i + B, n)
        x = batch_to_input(arr.image[i:j], info, torch.device("cpu"))
        y = torch.as_tensor(arr.label[i:j])
        for k, v in score_batch(models, x, y, PLAN, {}).items():
            ref.setdefault(k, []).append(v)
        ref.setdefault("grad_embedding", []).append(grad_embedding(models["s1e0"], x, y, 16).numpy())
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], np.concatenate(v), err_msg=k)
        np.testing.assert_array_equal(again[k], got[k], err_msg=k)
    np.testing.assert_array_equal(got["sample_id"], block["sample_id"])
    assert len(set(got["_actor"].tolist())) == 1 and got["_busy"][0] > 0 and not got["_busy"][1:].any()
    assert 0 < got["_init0"][0] <= got["_init1"][0] and not got["_init1"][1:].any()
    assert not again["_init1"].any()                    # the constructor's times come once
    assert np.all(got["_end"] == got["_end"][0]) and again["_end"][0] >= got["_end"][0]


def test_read_plan_keeps_source_blocks_whole():
    """Enough partitions: one read block each (Synthetic's 4,096-row chunks, multiples of the
    score batch size), not Ray Data's default 200+ blocks of a few hundred rows; small inputs
    are cut so that every actor gets work; huge blocks are cut by size."""
    from engine.distributed.scoring import CALL_BYTES, read_plan

    assert read_plan([4096] * 48 + [3392], 3072, 512, 1) == (49, 4096)
    assert read_plan([4096] * 4 + [3616], 224 * 224 * 3, 256, 1) == (5, 4096)
    assert read_plan([1437], 64, 128, 2) == (8, 180)
    blocks, rows = read_plan([100_000], 224 * 224 * 3, 256, 1)
    assert blocks * CALL_BYTES >= 100_000 * 224 * 224 * 3 and rows * 224 * 224 * 3 <= CALL_BYTES


def test_in_memory_sources_reach_read_tasks_by_reference(ray_local):
    """Read tasks of an in-memory source carry object refs, not pixels, and still deliver
    every row exactly as the source's arrays hold it."""
    import ray.cloudpickle as cloudpickle

    from engine.distributed.datasource import SourceDatasource, read_source

    source = load_source("fashion-mnist-mini")
    arrays = source.arrays("train")
    tasks = SourceDatasource(source, "train", target_rows=1024).get_read_tasks(4)
    assert len(tasks) == 4
    assert max(len(cloudpickle.dumps(t)) for t in tasks) < 64 * 1024, "pixels travel inside the task"
    rows = read_source(source, "train", target_rows=1024).take_all()
    got = sorted(rows, key=lambda r: r["sample_id"])
    order = np.argsort(arrays.sample_id)
    assert [r["sample_id"] for r in got] == arrays.sample_id[order].tolist()
    assert np.array_equal(np.stack([r["image"] for r in got]), arrays.image[order])
    assert np.array_equal(np.array([r["label"] for r in got]), arrays.label[order])
