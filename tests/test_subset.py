"""The chosen subset in anyone's own trainer (issue 31, slice 4): a manifest mapped onto a
torchvision ImageFolder's positions, as a Sampler (shuffled, DDP-split, weighted) and a Subset
with per-sample weights."""
from __future__ import annotations

import numpy as np
import pytest

from engine import artifacts
from engine.data import load_source
from engine.errors import DataError
from engine.subset import ManifestSubset, ids_from_paths
from tests.imagenet_tree import make_tree


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    make_tree(root, train_per_class=7, val_per_class=1)
    rows = load_source(f"imagefolder,size=16:{root}").arrays("train")
    pick = np.arange(len(rows)) % 3 != 0
    ids, labels = rows.sample_id[pick], rows.label[pick]
    weight = np.linspace(0.5, 3.0, len(ids))
    manifest = root / "manifest.parquet"
    artifacts.write_manifest(manifest, ids, weight, {})
    return root, manifest, dict(zip(ids.tolist(), labels.tolist())), dict(zip(ids.tolist(), weight.tolist()))


def test_manifest_onto_a_torchvision_image_folder(chosen):
    from torchvision.datasets import ImageFolder

    root, manifest, label_of, weight_of = chosen
    ds = ImageFolder(str(root / "train"))
    ids = ids_from_paths([p for p, _ in ds.samples], root)
    sub = ManifestSubset(manifest, ids)
    assert len(sub) == len(label_of) and sorted(ids[sub.indices].tolist()) == sorted(label_of)
    # torchvision's class indices are Winnow's: the same label for every chosen file
    assert all(ds.targets[i] == label_of[int(ids[i])] for i in sub.indices)
    subset = sub.subset(ds)
    assert len(subset) == len(sub) and subset.indices == sub.indices.tolist()
    w = np.array([weight_of[int(ids[i])] for i in sub.indices])
    np.testing.assert_allclose(sub.weights, w / w.mean())  # aligned with subset's items, mean 1


def test_sampler_shuffles_per_epoch_and_splits_across_ranks(chosen):
    from torchvision.datasets import ImageFolder

    root, manifest, _, _ = chosen
    ds = ImageFolder(str(root / "train"))
    sub = ManifestSubset(manifest, ids_from_paths([p for p, _ in ds.samples], root))
    s = sub.sampler(seed=3)
    first = list(s)
    assert sorted(first) == sorted(sub.indices.tolist()) and len(s) == len(sub)
    assert list(sub.sampler(seed=3)) == first  # reproducible
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == sorted(first)
    assert list(sub.sampler(shuffle=False)) == sub.indices.tolist()
    parts = [list(sub.sampler(seed=3, num_replicas=4, rank=r)) for r in range(4)]
    assert len({len(p) for p in parts}) == 1 and set(sum(parts, [])) == set(first)
    assert sum(len(p) for p in parts) == 4 * -(-len(sub) // 4)  # padded as DistributedSampler pads
    with pytest.raises(ValueError, match="rank 4 is not in"):
        sub.sampler(num_replicas=4, rank=4)


def test_weighted_sampler_follows_the_weights(chosen):
    from torchvision.datasets import ImageFolder

    root, manifest, _, _ = chosen
    ds = ImageFolder(str(root / "train"))
    sub = ManifestSubset(manifest, ids_from_paths([p for p, _ in ds.samples], root))
    draws = np.array(list(sub.weighted_sampler(num_samples=60000, seed=1)))
    freq = np.array([(draws == i).mean() for i in sub.indices])
    np.testing.assert_allclose(freq, sub.weights / sub.weights.sum(), atol=0.01)


def test_mismatched_ids_are_refused(chosen, tmp_path):
    root, manifest, _, _ = chosen
    with pytest.raises(DataError, match=r"names \d+ sample_id\(s\) that the dataset does not hold"):
        ManifestSubset(manifest, np.arange(100))
    with pytest.raises(DataError, match="holds a sample id twice"):
        ManifestSubset(manifest, np.zeros(5, dtype=np.int64))
    with pytest.raises(DataError, match="is not under"):
        ids_from_paths([str(tmp_path / "x.JPEG")], root)
