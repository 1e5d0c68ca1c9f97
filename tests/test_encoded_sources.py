"""Parquet of encoded images of any size (incl. the Hugging Face layout) and WebDataset tar
shards (brace patterns): the same images as an image folder give the same rows (issue 30,
slice 3)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data import load_source
from engine.data.base import stable_id
from engine.data.webdataset import expand_braces
from engine.errors import ConfigError, DataError
from tests.imagenet_tree import make_tree, to_hf_parquet, to_webdataset

CLASSES = ("n01440764", "n01443537", "n02102040")


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    odd = make_tree(base / "folder", CLASSES, train_per_class=5, val_per_class=2)
    to_hf_parquet(base / "folder", base / "hf")
    to_webdataset(base / "folder", base / "wds", per_shard=4)
    return base, odd


def _specs(base, size=48):
    n, v = (len(list((base / "wds").glob(f"{split}-*.tar"))) for split in ("train", "val"))
    return {"imagefolder": f"imagefolder,size={size}:{base / 'folder'}",
            "parquet": f"parquet,size={size}:{base / 'hf'}",
            "webdataset": f"webdataset,size={size}:{base / 'wds'}/{{train-{{000..{n - 1:03d}}},val-{{000..{v - 1:03d}}}}}.tar"}


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{train,val}-{8..10}.tar") == ["train-8.tar", "train-9.tar", "train-10.tar",
                                                        "val-8.tar", "val-9.tar", "val-10.tar"]
    assert expand_braces("{train-{0..1},val-0}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar"]
    for bad, why in (("s-{1..}.tar", "neither a range"), ("s-{3..1}.tar", "empty range"),
                     ("s-{0..2.tar", "unbalanced"), ("s-0..2}.tar", "unbalanced")):
        with pytest.raises(ConfigError, match=why):
            expand_braces(bad)


def test_three_formats_give_the_same_rows(formats):
    base, _ = formats
    sources = {k: load_source(v) for k, v in _specs(base).items()}
    ref = sources["imagefolder"]
    for name, src in sources.items():
        info = src.info()
        assert info.image_shape == (48, 48, 3) and info.num_classes == 3, name
        assert info.train_transform == "pad-crop-flip" and info.eval_transform == "center-crop", name
        for split in ("train", "test"):
            a, b = ref.arrays(split), src.arrays(split)
            order_a, order_b = np.argsort(a.sample_id), np.argsort(b.sample_id)
            assert np.array_equal(a.sample_id[order_a], b.sample_id[order_b]), (name, split)
            assert np.array_equal(a.label[order_a], b.label[order_b]), (name, split)
            assert np.array_equal(a.image[order_a], b.image[order_b]), (name, split)
    assert sources["parquet"].info().class_names == CLASSES  # the Hugging Face ClassLabel names
    # rrc-flip decodes the original bytes, the same in every format
    rows = ref.arrays("train")
    want = ref.augment(rows.image, rows.sample_id, "rrc-flip", 1, 2)
    for name in ("parquet", "webdataset"):
        assert np.array_equal(sources[name].augment(rows.image, rows.sample_id, "rrc-flip", 1, 2), want), name


def test_partitions_cover_every_row_once(formats):
    base, _ = formats
    for name, spec in _specs(base).items():
        src = load_source(spec)
        ids = np.concatenate([b["sample_id"] for p in src.partitions("train", target_rows=3) for b in p.read()])
        assert sorted(ids) == sorted(src.arrays("train").sample_id) and len(ids) == src.num_rows("train"), name


def test_default_size_and_plain_binary_images(tmp_path):
    """A column of bytes with no declared shape (another tool's writer): images of any size."""
    from tests.imagenet_tree import _smooth

    rng = np.random.default_rng(0)
    data, labels = [], []
    for i, (h, w) in enumerate([(90, 120), (150, 100), (77, 77), (300, 200)] * 3):
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(_smooth(rng, h, w)).save(buf, format="JPEG" if i % 2 else "PNG")
        data.append(buf.getvalue())
        labels.append(i % 2)
    pq.write_table(pa.table({"image": pa.array(data, pa.binary()), "label": pa.array(labels, pa.int64())}),
                   tmp_path / "d.parquet")
    src = load_source(f"parquet:{tmp_path / 'd.parquet'}")
    assert src.info().image_shape == (90, 90, 3)  # the first training image's shorter side
    assert src.info().train_transform == "rrc-flip"
    assert src.num_rows("train") + src.num_rows("test") == 12
    rows = src.arrays("train")
    assert rows.image.shape[1:] == (90, 90, 3)
    assert list(rows.sample_id) == [stable_id(f"d.parquet:{i}") for i in range(12)
                                    if stable_id(f"d.parquet:{i}") in set(rows.sample_id)]


def test_declared_fixed_shape_files_stay_as_stored_unless_resized(tmp_path):
    from engine.data import write_parquet_source

    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28, 1), dtype=np.uint8)
    write_parquet_source(tmp_path / "g.parquet", images, np.arange(10) % 2, np.arange(10))
    assert load_source(f"parquet:{tmp_path / 'g.parquet'}").info().image_shape == (28, 28, 1)
    resized = load_source(f"parquet,size=28:{tmp_path / 'g.parquet'}")
    assert resized.info().image_shape == (28, 28, 3) and resized.info().eval_transform == "center-crop"
    write_parquet_source(tmp_path / "raw.parquet", images, np.arange(10) % 2, np.arange(10), encode=None)
    with pytest.raises(ConfigError, match="stores fixed-size images; size=, eval= and bad= apply"):
        load_source(f"parquet,size=32:{tmp_path / 'raw.parquet'}").info()


def _truncate_one(tmp_path, formats):
    """Copies of the HF parquet and the shards with one training image cut in half."""
    base, odd = formats
    victim = next(rel for rel in sorted(p.relative_to(base / "folder").as_posix()
                                        for p in (base / "folder" / "train").rglob("*.JPEG")) if rel not in odd.values())
    t = pq.read_table(base / "hf" / "train-00000-of-00001.parquet")
    rows = t.column("image").to_pylist()
    rows = [{"bytes": r["bytes"][: len(r["bytes"]) // 2] if r["path"] == victim else r["bytes"], "path": r["path"]}
            for r in rows]
    (tmp_path / "hf").mkdir()
    pq.write_table(t.set_column(0, "image", pa.array(rows, t.column("image").type)),
                   tmp_path / "hf" / "train-00000-of-00001.parquet", row_group_size=7)
    (tmp_path / "hf" / "validation-00000-of-00001.parquet").write_bytes(
        (base / "hf" / "validation-00000-of-00001.parquet").read_bytes())
    (tmp_path / "wds").mkdir()
    for shard in sorted((base / "wds").glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(tmp_path / "wds" / shard.name, "w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if m.name == victim:
                    data = data[: len(data) // 2]
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    return victim


def test_bad_images_fail_or_skip(tmp_path, formats, monkeypatch):
    monkeypatch.setenv("WINNOW_CACHE", str(tmp_path / "cache"))
    victim = _truncate_one(tmp_path, formats)
    specs = {"parquet": f"parquet,size=32:{tmp_path / 'hf'}", "webdataset": f"webdataset,size=32:{tmp_path / 'wds'}"}
    for name, spec in specs.items():
        with pytest.raises(DataError, match=rf"{name}: cannot decode image .*(row \d+|{victim}).*read before it"):
            load_source(spec).arrays("train")
        skip = load_source(spec.replace("size=32", "size=32,bad=skip"))
        assert len(skip.skipped) == 1 and "truncated" in skip.skipped[0][1], name
        rows = skip.arrays("train")
        assert stable_id(victim) not in set(rows.sample_id) and len(rows) == 14, name


def test_bad_shards_and_members_are_named(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(DataError, match="junk.tar is not a readable tar shard"):
        load_source(f"webdataset:{tmp_path / 'junk.tar'}")
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"webdataset:{tmp_path}/s-{{0..1}}.tar")
    with tarfile.open(tmp_path / "nocls.tar", "w") as tar:
        info = tarfile.TarInfo("a/x.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match="sample 'a/x' has no .cls member"):
        load_source(f"webdataset:{tmp_path / 'nocls.tar'}")
    with tarfile.open(tmp_path / "badcls.tar", "w") as tar:
        for name, data in (("x.png", b"abc"), ("x.cls", b"cat")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="x.cls must hold a class index >= 0, got 'cat'"):
        load_source(f"webdataset:{tmp_path / 'badcls.tar'}")


def test_ids_labels_and_manifest_checks_decode_no_image(formats, tmp_path, monkeypatch):
    """Issue 31, slice 1: ids and labels come from the listing, the Parquet columns or the tar
    member names; checking a manifest against the data decodes nothing."""
    from engine import artifacts
    from engine.config import TrainConfig
    from engine.data import files, images
    from engine.stages.train import load_subset

    base, _ = formats
    specs = _specs(base)
    expect = {name: (load_source(spec).arrays("train"), load_source(spec).arrays("test"))
              for name, spec in specs.items()}

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(images, "decode_rgb", no_decoding)
    monkeypatch.setattr(files, "decode_image", no_decoding)
    for name, spec in specs.items():
        src = load_source(spec)
        for split, rows in zip(("train", "test"), expect[name]):
            ids, labels = src.ids_and_labels(split)
            assert np.array_equal(ids, rows.sample_id) and np.array_equal(labels, rows.label), (name, split)
            assert src.num_rows(split) == len(rows)
        manifest = tmp_path / f"{name}.parquet"
        chosen = expect[name][0].sample_id[::2]
        artifacts.write_manifest(manifest, chosen, np.ones(len(chosen)), {})
        subset_ids, _, n, _ = load_subset(TrainConfig(data=spec, manifest=str(manifest)))
        assert n == len(subset_ids) == len(chosen), name
