"""Data sources -> rows ``{sample_id:int64, image:uint8 HWC, label:int64}``.

``load_source(spec)`` picks a registry entry by the spec's name (``fashion-mnist-mini``,
``fashion-mnist[:DIR]``, ``digits``, ``parquet:PATH``, ``imagefolder:PATH``,
``synthetic:N[,HxW[,C]]``); a source gives its splits in memory (``arrays``) or as
picklable partitions that Ray Data reads in parallel (``partitions``).
"""
from engine.data.base import ArraySplit, DataInfo, Partition, Source, validate_rows
from engine.data.files import write_parquet_source
from engine.data.sources import DATASETS, load_source
from engine.data.transforms import normalize
from engine.registry import import_submodules

# each module registers its sources on import (sources, files, any new file); make_mini is a script
import_submodules(__name__, __path__, skip=("make_mini",))

__all__ = ["ArraySplit", "DATASETS", "DataInfo", "Partition", "Source", "load_source", "normalize",
           "validate_rows", "write_parquet_source"]
