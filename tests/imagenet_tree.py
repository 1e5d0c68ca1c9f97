"""Generated ImageNet-shaped image trees for tests: class folders (wnid-like names), JPEGs of
varied sizes and aspect ratios, and the oddities ImageNet holds: a grayscale JPEG, a CMYK JPEG,
a PNG named .JPEG, palette and RGBA PNGs; optionally a truncated file."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Optional

import numpy as np

ODDITIES = ("gray", "cmyk", "png_named_jpeg", "palette", "rgba")


def _smooth(rng, h: int, w: int) -> np.ndarray:
    """An RGB image with structure (JPEG-friendly), not white noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    img = np.stack([(base[c] + 80 * np.sin(x / (5 + 7 * c)) + 60 * np.cos(y / (6 + 3 * c))) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def write_image(path: Path, kind: str, rng, h: int, w: int) -> None:
    from PIL import Image

    rgb = Image.fromarray(_smooth(rng, h, w))
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jpeg":
        rgb.save(path, format="JPEG", quality=90)
    elif kind == "gray":
        rgb.convert("L").save(path, format="JPEG", quality=90)
    elif kind == "cmyk":
        rgb.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "png_named_jpeg":
        rgb.save(path, format="PNG")
    elif kind == "palette":
        rgb.convert("P", palette=Image.ADAPTIVE, colors=32).save(path, format="PNG")
    elif kind == "rgba":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        rgba.save(path, format="PNG")
    else:
        raise ValueError(kind)


def make_tree(root: Path, classes=("n01440764", "n01443537", "n02102040"), train_per_class: int = 6,
              val_per_class: int = 2, seed: int = 0, ilsvrc: bool = True, truncated: bool = False,
              sizes=((375, 500), (333, 500), (500, 375), (212, 139), (480, 640), (120, 96))) -> Dict[str, str]:
    """Write the tree; returns {kind: relative path} of the odd files (the rest are plain JPEGs
    named ``<wnid>_<i>.JPEG``)."""
    rng = np.random.default_rng(seed)
    odd: Dict[str, str] = {}
    splits = (("train", train_per_class), ("val", val_per_class)) if ilsvrc else (("", train_per_class),)
    k = 0
    for split, n in splits:
        for c in classes:
            for i in range(n):
                rel = f"{split}/{c}/{c}_{i}.JPEG".lstrip("/")
                kind = "jpeg"
                if split in ("train", "") and k < len(ODDITIES) and i == n - 1:
                    kind = ODDITIES[k]
                    odd[kind] = rel
                    k += 1
                h, w = sizes[(i + len(c) + k) % len(sizes)]
                write_image(root / rel, kind, rng, h, w)
    if truncated:
        c = classes[0]
        rel = f"{'train/' if ilsvrc else ''}{c}/{c}_truncated.JPEG"
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(_smooth(rng, 300, 400)).save(buf, format="JPEG", quality=90)
        (root / rel).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        odd["truncated"] = rel
    return odd


def pil_rgb(root: Path, rel: str, size: Optional[int] = None):
    from PIL import Image

    with Image.open(root / rel) as im:
        return im.convert("RGB")


def tree_files(root: Path) -> dict:
    """{split ("train"/"val"): [(relative path, wnid)]} of an ILSVRC-layout tree, sorted."""
    out = {}
    for split in ("train", "val"):
        out[split] = sorted((p.relative_to(root).as_posix(), p.parent.name)
                            for p in (root / split).rglob("*") if p.is_file())
    return out


def to_hf_parquet(root: Path, out: Path, rows_per_group: int = 7) -> None:
    """The tree in the Hugging Face ``datasets`` layout: ``train-00000-of-00001.parquet`` and
    ``validation-...``, ``image`` a struct of the file's bytes and its relative path, ``label``
    an int64, the ClassLabel names in the ``huggingface`` metadata."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = tree_files(root)
    classes = sorted({c for _, c in files["train"]})
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": classes, "_type": "ClassLabel"}}}}
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "validation")):
        image = pa.array([{"bytes": (root / rel).read_bytes(), "path": rel} for rel, _ in files[split]],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        label = pa.array([classes.index(c) for _, c in files[split]], pa.int64())
        table = pa.table({"image": image, "label": label}).replace_schema_metadata(
            {b"huggingface": json.dumps(meta).encode()})
        pq.write_table(table, out / f"{name}-00000-of-00001.parquet", row_group_size=rows_per_group)


def to_webdataset(root: Path, out: Path, per_shard: int = 5) -> None:
    """The tree as WebDataset shards ``train-000.tar``, ... and ``val-000.tar``: members named
    by the relative path (``train/<wnid>/<name>.JPEG`` beside ``train/<wnid>/<name>.cls``)."""
    import tarfile

    files = tree_files(root)
    classes = sorted({c for _, c in files["train"]})
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        rows = files[split]
        for s, i in enumerate(range(0, len(rows), per_shard)):
            with tarfile.open(out / f"{split}-{s:03d}.tar", "w") as tar:
                for rel, c in rows[i:i + per_shard]:
                    tar.add(root / rel, arcname=rel)
                    data = str(classes.index(c)).encode()
                    info = tarfile.TarInfo(rel.rsplit(".", 1)[0] + ".cls")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
