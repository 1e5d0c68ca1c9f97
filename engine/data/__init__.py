"""Data sources -> rows ``{sample_id:int64, image:uint8 HWC, label:int64}``.

``load_source(spec)`` picks a registry entry by the spec's name (``fashion-mnist-mini``,
``fashion-mnist[:DIR]``, ``digits``, ``parquet:PATH``, ``imagefolder:PATH``,
``synthetic:N[,HxW[,C]]``); a source gives its splits in memory (``arrays``) or as
picklable partitions that Ray Data reads in parallel (``partitions``).
"""
from engine.data.base import ArraySplit, DataInfo, Partition, Source, validate_rows  # noqa: F401
from engine.data.transforms import normalize  # noqa: F401
from engine.data.sources import DATASETS, load_source  # noqa: F401
from engine.data import files as _files  # noqa: F401,E402  (registers parquet, imagefolder)
from engine.data.files import write_parquet_source  # noqa: F401,E402
