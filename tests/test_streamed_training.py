"""Retraining streamed (issue 31, slice 3): --loader auto picks the streamed loader above the
threshold, evaluation streams the test split a partition at a time with the same accuracy, and
image files' rows travel as bytes when the transform must crop the original."""
from __future__ import annotations

import json

import numpy as np
import torch

from engine.data import load_source
from engine.data.base import StreamedSplit
from engine.models import build_model
from engine.train import evaluate


def test_streamed_test_split_evaluates_like_the_one_in_memory():
    src = load_source("digits")
    info = src.info()
    torch.manual_seed(0)
    model = build_model("small-cnn", info.image_shape[2], info.num_classes, info.image_shape[0])
    streamed = StreamedSplit(src, "test", target_rows=50)
    assert len(streamed) == src.num_rows("test") and len(src.partitions("test", 50)) > 1
    assert evaluate(model, streamed, info, torch.device("cpu"), batch_size=64) == \
        evaluate(model, src.arrays("test"), info, torch.device("cpu"), batch_size=64)
    head = streamed.head(77)
    whole = src.arrays("test")
    assert np.array_equal(head.sample_id, whole.sample_id[:77]) and np.array_equal(head.image, whole.image[:77])
    assert len(streamed.head(0)) == len(whole)


def _train(run_job, out, *extra):
    from jobs import train

    return run_job(train, ["--data", "digits", "--epochs", "1", "--batch-size", "128", "--out", out, *extra])


def test_auto_loader_streams_above_the_threshold(ray_local, run_job, tmp_path, monkeypatch):
    code, _, err = _train(run_job, tmp_path / "small")
    assert code == 0, err
    assert json.loads((tmp_path / "small" / "metrics.json").read_text())["loader"] == "memory"
    monkeypatch.setenv("WINNOW_STREAM_BYTES", "1000")  # digits' 1,437 8x8 images are 92 kB
    code, _, err = _train(run_job, tmp_path / "large", "--geometry", "--eval-samples", "50")
    assert code == 0, err
    m = json.loads((tmp_path / "large" / "metrics.json").read_text())
    assert m["loader"] == "ray-data" and m["config"]["loader"] == "auto" and m["geometry"]["samples"] == 50
    assert m["samples_seen"] == load_source("digits").num_rows("train")
    code, _, err = _train(run_job, tmp_path / "sampling", "--weighting", "sampling")
    assert code == 2 and "--weighting sampling needs the in-memory loader" in err, err
