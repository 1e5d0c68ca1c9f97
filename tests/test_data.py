"""Data sources: ids, shapes, labels, partitions, stability, round trips and bad input."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import DATASETS, load_source, normalize, validate_rows, write_parquet_source
from engine.data.base import ArraySplit
from engine.data.make_mini import cut
from engine.errors import ConfigError, DataError


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_fashion(tmp: Path, n_train=60, n_test=20, gz=True, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(tmp / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(tmp / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return tmp


def tiny_arrays(n=40, shape=(6, 5, 3), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), (np.arange(n) % classes).astype(np.int64)


def image_folder(root: Path, n_per_class=6, classes=("cat", "dog", "eel")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def shards(folder: Path, out: Path, per_shard: int = 7) -> Path:
    """The image folder's files as WebDataset shards ``shard-000.tar``, ... (a ``.cls`` per image)."""
    import io
    import tarfile

    files = sorted(p for p in folder.rglob("*.png"))
    classes = sorted({p.parent.name for p in files})
    out.mkdir(parents=True)
    for s, i in enumerate(range(0, len(files), per_shard)):
        with tarfile.open(out / f"shard-{s:03d}.tar", "w") as tar:
            for p in files[i:i + per_shard]:
                rel = p.relative_to(folder).as_posix()
                tar.add(p, arcname=rel)
                data = str(classes.index(p.parent.name)).encode()
                info = tarfile.TarInfo(rel[:-4] + ".cls")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture
def specs(tmp_path):
    """A spec for every registered dataset, built from small files where it needs files."""
    pq_path = tmp_path / "pq" / "data.parquet"
    images, labels = tiny_arrays()
    write_parquet_source(pq_path, images, labels)
    out = {
        "fashion-mnist-mini": "fashion-mnist-mini",
        "fashion-mnist": f"fashion-mnist:{fake_fashion(tmp_path / 'fm')}",
        "digits": "digits",
        "parquet": f"parquet:{pq_path}",
        "imagefolder": f"imagefolder:{image_folder(tmp_path / 'if')}",
        "synthetic": "synthetic:5000,8x8,3",
        "webdataset": f"webdataset:{shards(tmp_path / 'if', tmp_path / 'wds')}/shard-{{000..002}}.tar",
    }
    assert set(out) == set(DATASETS.names()), "every registered dataset needs a case here"
    return out


@pytest.mark.parametrize("name", sorted(DATASETS.names()))
def test_source_contract(specs, name):
    src = load_source(specs[name])
    info = src.info()
    seen = {}
    for split in ("train", "test"):
        rows = src.arrays(split)
        assert rows.sample_id.dtype == np.int64 and rows.label.dtype == np.int64
        assert rows.image.dtype == np.uint8 and rows.image.shape[1:] == info.image_shape
        assert len(np.unique(rows.sample_id)) == len(rows) == src.num_rows(split) > 0
        assert rows.label.min() >= 0 and rows.label.max() < info.num_classes
        parts = [b for p in src.partitions(split, target_rows=16) for b in p.read()]
        assert sum(p.num_rows for p in src.partitions(split, target_rows=16)) == len(rows)
        ids = np.concatenate([b["sample_id"] for b in parts])
        order, ref = np.argsort(ids), np.argsort(rows.sample_id)
        np.testing.assert_array_equal(ids[order], rows.sample_id[ref])
        np.testing.assert_array_equal(np.concatenate([b["image"] for b in parts])[order], rows.image[ref])
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in parts])[order], rows.label[ref])
        ids, labels = src.ids_and_labels(split)  # without pixels: the same rows in the same order
        np.testing.assert_array_equal(ids, rows.sample_id)
        np.testing.assert_array_equal(labels, rows.label)
        np.testing.assert_array_equal(src.sample_ids(split), rows.sample_id)
        some = rows.sample_id[::-3]
        picked, want = src.rows_of(split, some), rows.subset(some)
        for k in ("sample_id", "image", "label"):
            np.testing.assert_array_equal(getattr(picked, k), getattr(want, k))
        with pytest.raises(DataError, match="absent from the data"):
            src.rows_of(split, np.array([-5], dtype=np.int64))
        again = load_source(specs[name]).arrays(split)
        np.testing.assert_array_equal(again.sample_id, rows.sample_id)
        np.testing.assert_array_equal(again.image, rows.image)
        seen[split] = rows.sample_id
    if name in ("digits", "parquet", "imagefolder", "synthetic", "webdataset"):  # one id space for both splits
        assert not np.intersect1d(seen["train"], seen["test"]).size


def test_partitions_pickle(specs):
    import pickle

    for spec in specs.values():
        for p in load_source(spec).partitions("train", 16)[:2]:
            clone = pickle.loads(pickle.dumps(p))
            np.testing.assert_array_equal(next(iter(clone.read()))["sample_id"], next(iter(p.read()))["sample_id"])


def test_mini_is_class_balanced():
    src = load_source("fashion-mnist-mini")
    for split, per in (("train", 600), ("test", 100)):
        rows = src.arrays(split)
        assert np.bincount(rows.label, minlength=10).tolist() == [per] * 10
        assert rows.sample_id.max() < (60000 if split == "train" else 10000)


def test_make_mini_is_deterministic(tmp_path):
    src = fake_fashion(tmp_path, n_train=100, n_test=50, gz=False)
    a = cut(str(src), {"train": 3, "test": 2})
    b = cut(str(src), {"train": 3, "test": 2})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert np.bincount(a["train_label"]).tolist() == [3] * 10


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_full_fashion_mnist_and_mini_agree():
    full = load_source("fashion-mnist").arrays("train")
    assert len(full) == 60000
    mini = load_source("fashion-mnist-mini").arrays("train")
    np.testing.assert_array_equal(full.image[mini.sample_id], mini.image)
    np.testing.assert_array_equal(full.label[mini.sample_id], mini.label)


def test_gz_and_raw_idx_agree(tmp_path):
    a = load_source(f"fashion-mnist:{fake_fashion(tmp_path / 'a', gz=True)}").arrays("train")
    b = load_source(f"fashion-mnist:{fake_fashion(tmp_path / 'b', gz=False)}").arrays("train")
    np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("encode", ["png", None])
def test_parquet_round_trip(tmp_path, encode):
    images, labels = tiny_arrays(30, (5, 4, 1))
    ids = np.arange(100, 130, dtype=np.int64)
    write_parquet_source(tmp_path / "train.parquet", images[:20], labels[:20], ids[:20], encode=encode)
    write_parquet_source(tmp_path / "test.parquet", images[20:], labels[20:], ids[20:], encode=encode)
    src = load_source(f"parquet:{tmp_path}")
    tr, te = src.arrays("train"), src.arrays("test")
    np.testing.assert_array_equal(tr.sample_id, ids[:20])
    np.testing.assert_array_equal(tr.image, images[:20])
    np.testing.assert_array_equal(te.label, labels[20:])
    assert src.info().image_shape == (5, 4, 1)


def test_parquet_derived_ids_stable_unique_and_holdout(tmp_path):
    images, labels = tiny_arrays(200)
    write_parquet_source(tmp_path / "d.parquet", images, labels, row_group_size=64)
    a, b = load_source(f"parquet:{tmp_path}"), load_source(f"parquet:{tmp_path}")
    ids = np.concatenate([a.arrays("train").sample_id, a.arrays("test").sample_id])
    assert len(np.unique(ids)) == 200
    np.testing.assert_array_equal(a.arrays("test").sample_id, b.arrays("test").sample_id)
    assert 5 <= len(a.arrays("test")) <= 40  # about 10% held out


def test_unknown_and_malformed_specs(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; known: .*fashion-mnist-mini"):
        load_source("nope")
    for bad in ("synthetic:", "synthetic:abc", "synthetic:10,3x", "synthetic:0"):
        with pytest.raises(ConfigError, match="synthetic"):
            load_source(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"parquet:{tmp_path / 'missing.parquet'}")
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"fashion-mnist:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="not a directory"):
        load_source(f"imagefolder:{tmp_path / 'missing'}")


def test_corrupt_idx_is_named(tmp_path):
    d = fake_fashion(tmp_path, gz=False)
    f = d / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*holds"):
        load_source(f"fashion-mnist:{d}").arrays("train")
    (d / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DataError, match="bad magic"):
        load_source(f"fashion-mnist:{d}").arrays("test")


def test_corrupt_png_in_parquet_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = tiny_arrays(4)
    write_parquet_source(tmp_path / "x.parquet", images, labels, np.arange(4))
    t = pq.read_table(tmp_path / "x.parquet")
    col = t.column("image").to_pylist()
    col[2] = b"\x89PNG broken"
    pq.write_table(t.set_column(0, "image", pa.array(col, pa.binary())), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="x.parquet row 2"):
        load_source(f"parquet:{tmp_path / 'x.parquet'}").arrays("train")


def test_validate_rows_and_subset():
    with pytest.raises(DataError, match="duplicate sample_id 3"):
        validate_rows(np.array([1, 3, 3]), np.array([0, 0, 1]), 2, "t")
    with pytest.raises(DataError, match="label 5 of sample_id 2 is outside"):
        validate_rows(np.array([1, 2]), np.array([0, 5]), 3, "t")
    rows = ArraySplit(np.array([5, 7, 9]), np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1, 2]))
    np.testing.assert_array_equal(rows.subset(np.array([9, 5])).label, [2, 0])
    with pytest.raises(DataError, match=r"1 sample_id\(s\) are absent.*\[8\]"):
        rows.subset(np.array([5, 8]))


def test_normalize():
    x = np.array([[[[0, 255]]]], dtype=np.uint8)  # N=1, H=1, W=1, C=2
    out = normalize(x, (0.0, 0.5), (1.0, 0.5))
    assert out.shape == (1, 2, 1, 1) and out.dtype == torch.float32
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 1.0])


# ----------------------------------------------------------------------------- further cases
# Layouts and failure modes the contract test above does not reach.


def test_subset_of_empty_split_names_the_absent_id():
    empty = ArraySplit(np.zeros(0, np.int64), np.zeros((0, 2, 2, 1), np.uint8), np.zeros(0, np.int64))
    assert len(empty.subset(np.zeros(0, np.int64))) == 0
    with pytest.raises(DataError, match=r"1 sample_id\(s\) are absent.*\[99\]"):
        empty.subset(np.array([99]))
    rows = ArraySplit(np.array([5, 7, 9]), np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"7 sample_id\(s\).*\[1, 2, 3, 4, 6\]"):
        rows.subset(np.array([5, 1, 2, 3, 4, 6, 8, 10]))
    assert [len(b["sample_id"]) for b in rows.batches(2)] == [2, 1]


def test_dotted_idx_names_and_damaged_gzip_stream(tmp_path):
    d = fake_fashion(tmp_path / "dot", gz=False)
    for f in d.iterdir():  # train-images-idx3-ubyte -> train-images.idx3-ubyte
        f.rename(f.with_name(f.name.replace("-idx", ".idx")))
    assert len(load_source(f"fashion-mnist:{d}").arrays("train")) == 60
    g = fake_fashion(tmp_path / "gz", gz=True)
    f = g / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:30] + b"\xff" * 40)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_source(f"fashion-mnist:{g}").arrays("train")


def test_make_mini_cli_writes_the_documented_file(tmp_path):
    from engine.data import make_mini

    src = fake_fashion(tmp_path / "fm", n_train=6100, n_test=1010)
    outs = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for out in outs:
        make_mini.main(["--src", str(src), "--out", str(out)])
    a, b = np.load(outs[0]), np.load(outs[1])
    assert sorted(a.files) == sorted(f"{s}_{k}" for s in ("train", "test") for k in ("id", "image", "label"))
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    assert np.bincount(a["train_label"]).tolist() == [600] * 10 and np.bincount(a["test_label"]).tolist() == [100] * 10
    full = load_source(f"fashion-mnist:{src}").arrays("test")
    np.testing.assert_array_equal(full.image[a["test_id"]], a["test_image"])  # ids are original indices
    embedded = Path(make_mini.MINI_FILE)
    assert embedded.stat().st_size < 4 * 2**20 and (embedded.parent / "LICENSE-fashion-mnist.txt").is_file()


def test_mini_statistics_match_the_hard_coded_ones():
    src = load_source("fashion-mnist-mini")
    x = src.arrays("train").image / 255.0
    assert abs(x.mean() - src.info().mean[0]) < 0.01 and abs(x.std() - src.info().std[0]) < 0.01
    assert src.info().class_names[0] == "T-shirt/top" and src.info().class_names[9] == "Ankle boot"


def test_synthetic_is_lazy_and_independent_of_partitioning():
    import pickle

    big = load_source("synthetic:1000000,32x32,3")
    assert (big.num_rows("train"), big.num_rows("test")) == (1_000_000, 10_000)
    parts = big.partitions("train")
    assert sum(p.num_rows for p in parts) == 1_000_000 and len(pickle.dumps(parts)) < 100_000
    small = load_source("synthetic:9000,4x4,1")
    cat = lambda ps, k: np.concatenate([b[k] for p in ps for b in p.read()])
    for k in ("sample_id", "image", "label"):
        np.testing.assert_array_equal(cat(small.partitions("train", 4096), k), cat(small.partitions("train", 10**6), k))
    test = small.arrays("test")
    assert len(test) == 900 and test.sample_id.min() == 9000
    for bad in ("synthetic", "synthetic:100,32", "synthetic:100,32x32,3,1", "synthetic:-5"):
        with pytest.raises(ConfigError, match="synthetic"):
            load_source(bad)


def test_parquet_split_dirs_raw_lists_and_lazy_size(tmp_path, monkeypatch):
    import engine.data.files as files

    images, labels = tiny_arrays(50, (3, 7, 2))
    write_parquet_source(tmp_path / "train" / "p0.parquet", images[:20], labels[:20], np.arange(20), encode=None)
    write_parquet_source(tmp_path / "train" / "p1.parquet", images[20:40], labels[20:40], np.arange(20, 40), encode=None)
    write_parquet_source(tmp_path / "test" / "p0.parquet", images[40:], labels[40:], np.arange(40, 50), encode=None)
    calls = []
    real = files.decode_image
    monkeypatch.setattr(files, "decode_image", lambda *a: calls.append(1) or real(*a))
    src = load_source(f"parquet:{tmp_path}")
    assert (src.num_rows("train"), src.num_rows("test")) == (40, 10) and src.info().image_shape == (3, 7, 2)
    assert not calls  # sizes come from metadata, no image is decoded
    png, _ = tiny_arrays(300, (4, 4, 1))
    write_parquet_source(tmp_path / "png" / "d.parquet", png, np.arange(300) % 3, row_group_size=64)
    lazy = load_source(f"parquet:{tmp_path / 'png'}")
    assert lazy.num_rows("train") + lazy.num_rows("test") == 300 and len(calls) <= 1  # first image: its shape
    rows = src.arrays("train").subset(np.arange(40))
    np.testing.assert_array_equal(rows.image, images[:40])
    np.testing.assert_array_equal(src.arrays("test").label, labels[40:])


def test_parquet_bad_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = [b"x"] * 3
    pq.write_table(pa.table({"image": img, "target": [0, 1, 2]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match="lacks column 'label'"):
        load_source(f"parquet:{tmp_path / 'nolabel.parquet'}").info()
    images, _ = tiny_arrays(3, (4, 4, 1))
    write_parquet_source(tmp_path / "f.parquet", images, np.zeros(3))
    t = pq.read_table(tmp_path / "f.parquet")
    pq.write_table(t.set_column(1, "label", pa.array([0.0, 1.5, 2.0])), tmp_path / "f.parquet")
    with pytest.raises(DataError, match="'label' must be integer"):
        load_source(f"parquet:{tmp_path / 'f.parquet'}").info()


def test_imagefolder_split_dirs_and_corrupt_file(tmp_path):
    root = tmp_path / "f"
    image_folder(root / "train", n_per_class=3, classes=("a", "b"))
    image_folder(root / "test", n_per_class=2, classes=("a", "b"))
    src = load_source(f"imagefolder:{root}")
    assert (src.num_rows("train"), src.num_rows("test")) == (6, 4) and src.info().class_names == ("a", "b")
    assert src.arrays("test").label.tolist() == [0, 0, 1, 1]
    assert not np.intersect1d(src.arrays("train").sample_id, src.arrays("test").sample_id).size
    (root / "train" / "b" / "zzz.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"zzz\.png"):
        load_source(f"imagefolder:{root}").arrays("train")


def test_validate_rows_rejects_wrong_types_and_shapes():
    with pytest.raises(DataError, match="must be integers"):
        validate_rows(np.array([1.0, 2.0]), np.array([0, 1]), 2, "t")
    with pytest.raises(DataError, match="1-d of equal length"):
        validate_rows(np.array([1, 2, 3]), np.array([0, 1]), 2, "t")
    with pytest.raises(DataError, match="label -1"):
        validate_rows(np.array([1, 2]), np.array([0, -1]), 2, "t")


def test_normalize_torch_input_layout_and_values():
    img = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8)  # N=1, H=1, W=2, C=2
    out = normalize(torch.from_numpy(img), (0.5, 0.0), (0.5, 2.0))
    assert out.shape == (1, 2, 1, 2) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, -0.6]], [[0.5, 0.2]]]]))


def test_content_key_follows_the_data_not_just_the_spec(specs, tmp_path):
    """Resumable scoring shards are keyed by ``content_key``: it must stay put for unchanged data
    and move when a file-backed source's training files change in place."""
    import os

    from engine.data.sources import SYNTH_GENERATOR

    keys = {name: load_source(spec).content_key() for name, spec in specs.items()}
    for name, spec in specs.items():
        assert load_source(spec).content_key() == keys[name], f"{name}: key not stable"
        assert keys[name].startswith(load_source(spec).spec)
    assert SYNTH_GENERATOR in keys["synthetic"]

    def bump(path: Path, data: bytes | None = None):
        if data is not None:
            path.write_bytes(data)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    pq_path = Path(specs["parquet"].split(":", 1)[1])
    images, labels = tiny_arrays(seed=1)
    write_parquet_source(pq_path, images, labels)
    bump(pq_path)
    fm_dir = Path(specs["fashion-mnist"].split(":", 1)[1])
    bump(fm_dir / "train-labels-idx1-ubyte.gz")
    bump(tmp_path / "if" / "dog" / "002.png")
    for name in ("parquet", "fashion-mnist", "imagefolder"):
        assert load_source(specs[name]).content_key() != keys[name], f"{name}: change not seen"
    # the test split's files are not part of the training rows' identity
    before = load_source(specs["fashion-mnist"]).content_key()
    bump(fm_dir / "t10k-images-idx3-ubyte.gz")
    assert load_source(specs["fashion-mnist"]).content_key() == before


def test_scoring_fingerprint_uses_the_content_key():
    from engine.config import ScoreConfig
    from engine.distributed.scoring import fingerprint

    cfg = ScoreConfig(data="digits", model="small-cnn")
    states = {"s0": {"w": torch.zeros(3)}}
    base = fingerprint(cfg, states, [("el2n", "s0")], {}, None, 2048)
    assert base == fingerprint(cfg, states, [("el2n", "s0")], {}, None, 2048, "digits")
    assert base != fingerprint(cfg, states, [("el2n", "s0")], {}, None, 2048, "digits;files=1;0123")
    assert base != fingerprint(cfg, {"s0": {"w": torch.ones(3)}}, [("el2n", "s0")], {}, None, 2048)
