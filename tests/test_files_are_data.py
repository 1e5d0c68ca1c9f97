"""Files are data, never code (issue 29, slice 1): proxies, Ray Train checkpoints and the final
model are read with torch's weights-only unpickler. A planted pickle whose ``__reduce__`` runs a
shell command is refused with one line naming the file, and its command never runs."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import artifacts
from engine.data import load_source
from engine.errors import DamagedFileError, RefusedFileError
from engine.stages import score as score_stage
from engine.train import ProxyRun
from jobs import score, train


class Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, how: str = "torch") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"model": {"weight": torch.zeros(2)}, "extra": Payload(marker)}
    if how == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))


def test_the_payload_runs_when_loaded_as_code(tmp_path):
    """The planted file is a real attack: the old ``weights_only=False`` load runs it."""
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_load_tensors_refuses_a_planted_pickle(tmp_path, how):
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pt", marker, how)
    with pytest.raises(RefusedFileError, match=r"x\.pt: refused to load the thing"):
        artifacts.load_tensors(tmp_path / "x.pt", "the thing")
    assert not marker.exists()


def test_load_tensors_reports_a_truncated_file(tmp_path):
    artifacts.save_tensors(tmp_path / "ok.pt", {"w": torch.arange(1000.0), "n": 3, "s": "x", "l": [1.5, None]})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError, match=r"cut\.pt: the thing is damaged or truncated"):
        artifacts.load_tensors(tmp_path / "cut.pt", "the thing")
    back = artifacts.load_tensors(tmp_path / "ok.pt", "the thing")
    assert back["n"] == 3 and back["s"] == "x" and back["l"] == [1.5, None]
    torch.testing.assert_close(back["w"], torch.arange(1000.0))


def test_proxy_runs_round_trip_as_tensors(tmp_path):
    run = ProxyRun(seed=3, states={0: {"w": torch.ones(2, 2)}, 2: {"w": torch.zeros(2, 2)}},
                   correct=np.array([[True, False, True]]), sample_id=np.array([5, 1, 9]),
                   train_loss=[np.float64(0.5), 0.25], label=np.array([0, 1, 1]))
    artifacts.save_tensors(tmp_path / "p.pt", [run.to_tensors()])
    back = score_stage.load_proxies(tmp_path / "p.pt")[0]
    assert back.seed == 3 and back.train_loss == [0.5, 0.25] and sorted(back.states) == [0, 2]
    np.testing.assert_array_equal(back.correct, run.correct)
    np.testing.assert_array_equal(back.sample_id, run.sample_id)
    np.testing.assert_array_equal(back.label, run.label)
    assert back.correct.dtype == bool and back.sample_id.dtype == np.int64
    torch.testing.assert_close(back.states[0]["w"], torch.ones(2, 2))
    # arrays of different dtypes over one buffer (as Ray hands them back from the object store)
    raw = np.arange(4, dtype=np.int64)
    shared = ProxyRun(seed=0, states={0: {"w": torch.ones(1)}}, correct=raw.view(bool)[:3][None],
                      sample_id=raw[:3], train_loss=[], label=raw[1:])
    artifacts.save_tensors(tmp_path / "e.pt", [shared.to_tensors()])
    back = score_stage.load_proxies(tmp_path / "e.pt")[0]
    np.testing.assert_array_equal(back.sample_id, [0, 1, 2])
    np.testing.assert_array_equal(back.label, [1, 2, 3])
    artifacts.save_tensors(tmp_path / "other.pt", [{"seed": 1}])  # tensors only, but not our layout
    with pytest.raises(DamagedFileError, match="do not have the layout"):
        score_stage.load_proxies(tmp_path / "other.pt")


def test_score_refuses_planted_proxies(ray_local, run_job, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", "digits", "--scores", "el2n", "--seeds", "1", "--epochs", "1", "--out", str(out)]
    cfg = score.config_from(argv)
    _, keep, _, _ = score_stage.scoring_plan(cfg, load_source(cfg.data).info())
    path = score_stage.proxies_path(cfg, keep, out / score_stage.PARTIAL)
    marker = tmp_path / "pwned"
    plant(path, marker)
    code, _, err = run_job(score, argv)
    assert code == 2 and "Traceback" not in err, err
    assert f"{path}: refused to load the saved proxies" in err and "rerun with --fresh" in err
    assert not marker.exists() and not (out / "scores.parquet").exists()
    code, stdout, err = run_job(score, argv + ["--fresh"])  # the documented way to start over
    assert code == 0, err
    assert f"--fresh: removed {out / score_stage.PARTIAL}" in stdout and "resuming" not in stdout
    assert not marker.exists() and (out / "scores.parquet").is_file() and not path.exists()


def test_fresh_removes_partial_work_and_the_runs_checkpoint_storage(tmp_path, capsys):
    from jobs._cli import start_fresh

    out, storage = tmp_path / "run", tmp_path / "ckpt"
    (out / "_partial" / "shards").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (storage / "run" / "run-abc").mkdir(parents=True)
    (storage / "other" / "run-abc").mkdir(parents=True)  # another run's checkpoints
    start_fresh(out, str(storage))
    assert not (out / "_partial").exists() and (out / "metrics.json").exists()
    assert not (storage / "run").exists() and (storage / "other" / "run-abc").is_dir()
    assert "--fresh: removed" in capsys.readouterr().out
    start_fresh(out, str(storage))
    assert capsys.readouterr().out.strip() == "--fresh: nothing to discard"


@pytest.mark.parametrize("executor,older", [("ray-train", "checkpoint_2000-01-01_00-00-00.000000"),
                                            ("in-process", "checkpoint_000000")])
def test_train_refuses_a_planted_or_damaged_checkpoint_and_resumes_from_a_genuine_one(ray_local, run_job, tmp_path,
                                                                                      executor, older):
    """A run killed after its first pass leaves a checkpoint. Its state.pt replaced by a planted
    pickle is refused before any worker starts; a truncated one, with no other checkpoint, is
    reported by name; with an older good checkpoint beside it the run falls back to that one, and
    the resuming worker reads it as data and finishes the run. Ray Train's checkpoints and the
    in-process runner's alike."""
    import shutil

    from engine import hooks

    hooks.install("tests.drills")  # an in-process run's loop runs in this process
    out = tmp_path / "run"
    (out / "_partial").mkdir(parents=True)
    (out / "_partial" / "chaos-fail-worker").touch()  # rank 0 exits after pass 1's checkpoint
    argv = ["--data", "digits", "--epochs", "2", "--batch-size", "128", "--max-failures", "0", "--out", str(out),
            "--executor", executor]
    try:
        code, _, err = run_job(train, argv)
    finally:
        hooks.uninstall_all()
    assert code == 1 and "rerun the same command to resume" in err, err
    states = sorted((out / "_partial" / executor.replace("-", "_")).glob("run-*/checkpoint_*/state.pt"))
    assert states, "the failed run kept no checkpoint"
    state = states[-1]
    shutil.copy(state, tmp_path / "genuine.pt")
    shutil.copytree(state.parent, tmp_path / "genuine")
    marker = tmp_path / "pwned"
    plant(state, marker)
    code, _, err = run_job(train, argv)
    assert code == 2 and "Traceback" not in err, err
    assert f"{state}: refused to load" in err and not marker.exists()
    assert not (out / "metrics.json").exists()
    state.write_bytes((tmp_path / "genuine.pt").read_bytes()[:100])
    code, _, err = run_job(train, argv)
    assert code == 2 and f"{state}: a file of a training checkpoint is damaged or truncated" in err, err
    assert "no checkpoint of this run reads back: rerun with --fresh" in err
    # an older good checkpoint of the same run (its name sorts first, as an earlier pass's does)
    shutil.copytree(tmp_path / "genuine", state.parent.with_name(older))
    code, stdout, err = run_job(train, argv)
    assert code == 0, err
    assert f"{state}: a file of a training checkpoint is damaged" in stdout and "resumes from the newest" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["restarts"] == 1 and metrics["passes"] == 2
    assert isinstance(artifacts.load_tensors(out / "model.pt", "the model"), dict)
