"""Outputs to URIs: staged locally, uploaded after success with _SUCCESS last, nothing uploaded
after a failure; jobs.select writes a manifest to a file:// URI."""
from __future__ import annotations

import numpy as np
import pytest

from engine import artifacts, storage


def test_local_paths_pass_through(tmp_path):
    with storage.staged_output(str(tmp_path / "x")) as local:
        assert local == str(tmp_path / "x")
    assert not storage.is_uri("runs/x") and storage.is_uri("s3://b/p") and storage.is_uri("file:///tmp/x")


def test_upload_after_success(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_STAGING", str(tmp_path / "stage"))
    dest = tmp_path / "remote" / "run"
    uri = f"file://{dest}"
    with storage.staged_output(uri) as local:
        (tmp_path / "stage").exists()
        from pathlib import Path

        Path(local, "sub").mkdir(parents=True)
        Path(local, "scores.parquet").write_bytes(b"abc")
        Path(local, "sub", "m.json").write_text("{}")
        Path(local, "_partial").mkdir()
        Path(local, "_partial", "shard").write_bytes(b"x")
        assert not dest.exists()  # nothing is uploaded before the job succeeds
    assert (dest / "scores.parquet").read_bytes() == b"abc"
    assert (dest / "sub" / "m.json").read_text() == "{}"
    assert not (dest / "_partial").exists()
    assert (dest / "_SUCCESS").read_text().startswith("2 files")


def test_no_upload_after_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("WINNOW_STAGING", str(tmp_path / "stage"))
    dest = tmp_path / "remote" / "run"
    with pytest.raises(RuntimeError):
        with storage.staged_output(f"file://{dest}") as local:
            from pathlib import Path

            Path(local, "half.parquet").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not (dest / "_SUCCESS").exists() and not (dest / "half.parquet").exists()


def test_bad_uri_is_a_config_error(run_job, tmp_path):
    from jobs import select

    code, _, err = run_job(select, ["--scores", tmp_path / "s.parquet", "--selector", "random", "--fraction", "0.5",
                                    "--out", "nosuchscheme://bucket/m.parquet"])
    assert code == 2 and "nosuchscheme" in err and "Traceback" not in err


def test_select_to_file_uri(tmp_path, run_job, monkeypatch):
    import pyarrow as pa

    from jobs import select

    monkeypatch.setenv("WINNOW_STAGING", str(tmp_path / "stage"))
    ids = np.arange(100, dtype=np.int64)
    table = pa.table({"sample_id": ids, "label": ids % 4, "el2n": np.linspace(0, 1, 100).astype(np.float32),
                      "el2n_std": np.zeros(100, np.float32)})
    artifacts.write_table(tmp_path / "scores.parquet", table, {"kind": "scores"})
    dest = tmp_path / "remote" / "m.parquet"
    code, out, err = run_job(select, ["--scores", tmp_path / "scores.parquet", "--selector", "topk", "--column", "el2n",
                                      "--fraction", "0.5", "--out", f"file://{dest}"])
    assert code == 0, err
    ids_sel, weight, meta = artifacts.read_manifest(dest)
    assert len(ids_sel) == 50 and meta["selector"] == "topk"
