"""Typed, flat, frozen configs for each job, validated at the edge.

Each job's argparse flags map one-to-one onto a config's fields (``--score-batch-size`` ->
``score_batch_size``); ``from_dict`` loads the same fields from YAML (Tune sweeps) and
rejects unknown keys. ``validate()`` raises ConfigError naming the field.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Tuple, Type, TypeVar

from engine.errors import ConfigError
from engine.units import L_INF_STEP

C = TypeVar("C")


BUDGETS = ("epochs", "steps")  # TrainConfig.budget; a sweep grids over them (param_space.budget)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and batching shared by proxy training and retraining."""

    batch_size: int = 128          # samples per optimiser step (per worker on Ray Train)
    lr: float = 0.05               # peak SGD learning rate (cosine decay to 0 over the run)
    momentum: float = 0.9          # SGD Nesterov momentum
    weight_decay: float = 5e-4     # L2 on all parameters

    def validate(self) -> None:
        check_types(self)
        _positive(self, "batch_size", "lr")
        _in_range(self, "momentum", 0.0, 1.0)
        _in_range(self, "weight_decay", 0.0, 1.0)


@dataclass(frozen=True)
class ScoreConfig:
    """``jobs.score``: train proxies, score every training sample, write scores.parquet."""

    data: str = "fashion-mnist-mini"   # data source spec (engine.data registry)
    model: str = "small-cnn"           # proxy model (engine.models registry)
    scores: Tuple[str, ...] = ("el2n", "forgetting")  # score names (engine.scores registries)
    seeds: int = 2                     # proxies with seeds 0..seeds-1; scores averaged over them
    epochs: int = 4                    # proxy training epochs
    score_epochs: Optional[Tuple[int, ...]] = None  # epochs at which model scores are taken (0 = init); default: last
    actors: int = 1                    # most scoring actors in the Ray Data pool (it grows to this with the backlog)
    min_actors: int = 1                # actors started up front (the pool never shrinks below this)
    cpus_per_actor: float = 1.0        # logical CPUs each scoring actor reserves (torch threads: max(1, floor))
    gpus_per_actor: float = 0.0        # GPUs per scoring actor (fractions allowed)
    score_batch_size: int = 512        # rows per scoring batch
    score_params: dict = field(default_factory=dict)  # {score: {param: value}}, e.g. {"nc": {"iters": 20}}
    embedding_dim: int = 0             # >0: also write embeddings.parquet (last-layer gradients, seed 0, last epoch)
    precision: str = "float32"         # "bf16": autocast for the scorers that allow it (engine.scores.runs_in_bf16)
    train_transform: Optional[str] = None  # the proxies' training augmentation; None: the source's default
    proxy_loader: str = "auto"         # proxies: "memory" (each holds the split), "stream" (Ray Train from Ray Data), "auto" (stream above 1 GiB of images)
    proxy_workers: int = 1             # Ray Train workers per proxy when streamed
    optim: OptimConfig = OptimConfig()
    out: str = "runs/score"            # run directory

    def validate(self) -> None:
        check_types(self)
        _positive(self, "seeds", "actors", "min_actors", "score_batch_size")
        if self.min_actors > self.actors:
            raise ConfigError(f"min_actors ({self.min_actors}) is more than actors ({self.actors})")
        _in_range(self, "cpus_per_actor", 0.01, 1024.0)
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs must be 0 (score the initialisations only) or more, got {self.epochs!r}")
        _in_range(self, "gpus_per_actor", 0.0, 64.0)
        from engine.scores import check_precision

        check_precision(self.precision)
        if self.train_transform is not None:
            from engine.data.transforms import check_train_transform

            check_train_transform(self.train_transform)
        if self.proxy_loader not in ("auto", "memory", "stream"):
            raise ConfigError(f"proxy_loader must be 'auto', 'memory' or 'stream', got {self.proxy_loader!r}")
        _positive(self, "proxy_workers")
        for e in self.score_epochs or ():
            if not 0 <= e <= self.epochs:
                raise ConfigError(f"score_epochs: epoch {e} is outside 0..epochs ({self.epochs})")
        if self.embedding_dim < 0:
            raise ConfigError(f"embedding_dim must be 0 (none) or more, got {self.embedding_dim!r}")
        from engine.scores import HISTORY_SCORERS, check_params

        history = [s for s in self.scores if s in HISTORY_SCORERS]
        if self.epochs == 0 and history:
            raise ConfigError(f"--epochs 0 trains no proxy, so there is no training history for {', '.join(history)}; "
                              f"use --epochs 1 or more")

        check_params(self.score_params)
        self.optim.validate()

    @property
    def model_score_epochs(self) -> Tuple[int, ...]:
        return tuple(sorted(set(self.score_epochs))) if self.score_epochs else (self.epochs,)


@dataclass(frozen=True)
class AdaptiveConfig:
    """Adaptive selection during retraining (``jobs.train --reselect-every R``): every ``every``
    passes the selector's input (a score, or CRAIG's and GRAD-MATCH's gradient embeddings) is
    recomputed on the current model over the whole training split, and training continues on
    the new per-class subset with its weights (``engine.train.adaptive``)."""

    every: int = 0                     # R: reselect before pass 1, 1 + R, 1 + 2R, ... (0: off)
    selector: str = "gradmatch"        # NAME, or NAME:SCORER for a ranking selector (topk:el2n)
    fraction: float = 0.1              # of each class, as jobs.select's --fraction
    params: dict = field(default_factory=dict)  # the selector's own parameters (lam, offset, beta, ...)
    warm_start: str = "none"           # "full:K": whole split for passes 1..K, first selection before K+1; "geda"
    precision: str = "float32"         # "bf16": the recomputation's forward under bf16 autocast (as jobs.score --precision)

    def validate(self) -> None:
        check_types(self)
        if self.every < 0:
            raise ConfigError(f"reselect_every must be 0 (off) or more, got {self.every}")
        from engine.scores import check_precision

        check_precision(self.precision)
        if not self.every:
            return
        from engine.train.adaptive import check_adaptive

        check_adaptive(self)


@dataclass(frozen=True)
class TrainConfig:
    """``jobs.train``: (re)train on a manifest's subset, or on everything, with Ray Train."""

    data: str = "fashion-mnist-mini"   # data source spec
    model: str = "small-cnn"           # model to train
    manifest: Optional[str] = None     # manifest.parquet; None = the full training split
    epochs: int = 10                   # passes over the (sub)set
    workers: int = 1                   # Ray Train workers
    gpus: float = 0                    # GPUs per worker (0 = CPU; fractions share a GPU between trials)
    seed: int = 0                      # init and shuffling seed
    budget: str = "epochs"             # "epochs": `epochs` passes over the subset; "steps": the optimizer steps of `epochs` full-data passes
    weighting: str = "loss"            # manifest weights as per-sample loss weights ("loss") or sampling probabilities ("sampling")
    loader: str = "auto"               # "memory": each worker holds the split; "ray-data": workers stream their shard of a Ray Dataset; "auto": ray-data above 1 GiB of decoded images
    train_transform: Optional[str] = None  # training augmentation (engine.data.transforms.TRAIN_TRANSFORMS); None: the source's default
    curvature_lambda: float = 0.0      # SLo-Curves regulariser: CE + λ·Curv(X)
    curvature_eps: float = L_INF_STEP  # Curv's step per input coordinate, in [0, 1] pixel units (8/255)
    gradreg: float = 0.0               # LCNN GradReg weight μ (input-gradient norm penalty)
    activation: str = "relu"           # model option: "relu" or "centered_softplus" (LCNN)
    beta: Optional[float] = None       # centered softplus β (None: the model's default)
    spectral_norm: bool = False        # model option: spectral-normalised convs and linear layers (LCNN)
    bn_gamma: Optional[float] = None   # model option: γ-Lipschitz BatchNorm (LCNN); None = plain BatchNorm
    geometry: bool = False             # metrics: E‖∇f‖, E‖∇²f‖, E C_f on the test set (LCNN's table)
    pgd_eps: Tuple[float, ...] = ()    # metrics: ℓ2 PGD robust accuracy at these radii (pixel units), e.g. 0.05,0.1,0.15,0.2
    pgd_steps: int = 20                # PGD iterations
    pgd_step_size: Optional[float] = None  # PGD step (None: 2.5·ε/steps)
    eval_samples: int = 1000           # test samples for geometry and PGD (0 = all)
    max_failures: int = 2              # restarts from the last checkpoint (Ray Train FailureConfig; in-process: of the loop)
    executor: str = "auto"             # "ray-train"; "in-process": one worker in the job's process, own checkpoints; "auto": in-process for one worker on the job's own machine
    cpus_per_worker: Optional[float] = None  # CPUs each Ray Train worker reserves (None: the cluster's CPUs / workers)
    checkpoint_storage: Optional[str] = None  # Ray Train storage_path for checkpoints (None: OUT/_partial; a multi-node cluster needs shared storage, e.g. s3://...)
    optim: OptimConfig = OptimConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()  # reselect the subset during training (off unless adaptive.every)
    out: str = "runs/train"            # run directory (metrics.json, checkpoints)

    def validate(self) -> None:
        check_types(self)
        _positive(self, "epochs", "workers", "pgd_steps")
        if self.seed < 0:
            raise ConfigError(f"seed must be 0 or more, got {self.seed!r}")
        if self.checkpoint_storage is not None:
            from engine.storage import check_uri

            check_uri(self.checkpoint_storage, "checkpoint_storage")
        _in_range(self, "gpus", 0, 64)
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget must be 'epochs' or 'steps', got {self.budget!r}")
        if self.weighting not in ("loss", "sampling"):
            raise ConfigError(f"weighting must be 'loss' or 'sampling', got {self.weighting!r}")
        if self.executor not in ("auto", "ray-train", "in-process"):
            raise ConfigError(f"executor must be 'auto', 'ray-train' or 'in-process', got {self.executor!r}")
        if self.executor == "in-process":  # the GPU is checked when the run starts, where it runs
            from engine.distributed.in_process import check_in_process

            check_in_process(self, self.loader == "ray-data", gpu=True)
        if self.loader not in ("auto", "memory", "ray-data"):
            raise ConfigError(f"loader must be 'auto', 'memory' or 'ray-data', got {self.loader!r}")
        if self.loader == "ray-data" and self.weighting == "sampling":
            raise ConfigError("loader 'ray-data' streams each row once per pass: use weighting 'loss' "
                              "(weighted sampling needs the in-memory loader)")
        if self.train_transform is not None:
            from engine.data.transforms import check_train_transform

            check_train_transform(self.train_transform)
        _in_range(self, "curvature_lambda", 0.0, 1e6)
        _in_range(self, "curvature_eps", 1e-6, 1.0)
        _in_range(self, "gradreg", 0.0, 1e6)
        if self.activation not in ("relu", "centered_softplus"):
            raise ConfigError(f"activation must be 'relu' or 'centered_softplus', got {self.activation!r}")
        if self.beta is not None:
            _in_range(self, "beta", 1e-3, 1e4)
        if self.bn_gamma is not None:
            _in_range(self, "bn_gamma", 1e-3, 1e4)
        for e in self.pgd_eps:
            if not isinstance(e, (int, float)) or not 0 < e <= 10:
                raise ConfigError(f"pgd_eps: radius {e!r} must be in (0, 10] (pixel units)")
        if self.pgd_step_size is not None:
            _in_range(self, "pgd_step_size", 1e-6, 10.0)
        if not isinstance(self.eval_samples, int) or self.eval_samples < 0:
            raise ConfigError(f"eval_samples must be 0 (all) or more, got {self.eval_samples!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError(f"max_failures must be 0 or more, got {self.max_failures!r}")
        if self.cpus_per_worker is not None:
            _in_range(self, "cpus_per_worker", 0.01, 1024.0)
        self.optim.validate()
        self.adaptive.validate()
        if self.adaptive.every and self.loader == "ray-data":
            raise ConfigError("--reselect-every needs the in-memory loader (each worker scores the whole training split)")
        if self.adaptive.every and self.adaptive.selector == "infobatch" and (self.budget != "epochs" or
                                                                            self.weighting != "loss"):
            raise ConfigError("--selector infobatch prunes passes and rescales losses: it needs --budget epochs and "
                              "--weighting loss")

    @property
    def model_options(self) -> dict:
        """Keyword options for ``build_model`` (empty for the plain models)."""
        opts = {}
        if self.activation != "relu":
            opts["activation"] = self.activation
        if self.beta is not None:
            opts["beta"] = self.beta
        if self.spectral_norm:
            opts["spectral_norm"] = True
        if self.bn_gamma is not None:
            opts["bn_gamma"] = self.bn_gamma
        return opts


@dataclass(frozen=True)
class SelectConfig:
    """``jobs.select``: a score table (and embeddings) -> manifest.parquet."""

    scores: str                        # scores.parquet written by jobs.score
    selector: str                      # engine.select registry name
    fraction: float                    # fraction of the samples to keep, in (0, 1]
    out: str                           # manifest.parquet to write
    column: Optional[str] = None       # score column that ranks samples (default: the selector's)
    seed: int = 0                      # seed for random choices and tie-breaks
    global_rank: bool = False          # rank across all classes instead of per class
    embeddings: Optional[str] = None   # embeddings.parquet (craig, gradmatch; default: beside scores; geda: weights)
    params: dict = field(default_factory=dict)  # the selector's own: solver, nodes, time_limit, lam, tol, quantiles, offset

    def validate(self) -> None:
        from engine.select import check_selector_params
        from engine.select.quota import check_fraction

        check_fraction(self.fraction)
        check_types(self)
        check_selector_params(self.selector, {**self.params, "seed": self.seed})


def check_types(cfg: Any) -> None:
    """Every field of a config dataclass holds a value of its declared type: an ``int`` field an
    integer (not 2.5, not true), a ``float`` field a finite number (not NaN, not inf, not a
    string), a ``bool`` field true or false, tuples their element type; ConfigError names the
    field. Runs first in every ``validate()``, so a YAML and a flag are held to the same types."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        _check_type(f.name, getattr(cfg, f.name), hints[f.name])


def _check_type(name: str, v: Any, tp: Any) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if v is None and type(None) in args:
            return
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, tp):
            raise ConfigError(f"{name} must be a {tp.__name__}, got {v!r}")
        check_types(v)
        return
    if origin is tuple:
        if not isinstance(v, (tuple, list)):
            raise ConfigError(f"{name} must be a list, got {v!r}")
        for i, item in enumerate(v):
            _check_type(f"{name}[{i}]", item, args[0])
        return
    if tp in _PROTOTYPE:  # the scalar types: the same check as a method's declared parameters
        from engine.params import check_value

        check_value(name, v, _PROTOTYPE[tp])
    elif (tp is dict or origin is dict) and not isinstance(v, dict):
        raise ConfigError(f"{name} must be a mapping, got {v!r}")


_PROTOTYPE = {bool: False, int: 0, float: 0.0, str: ""}  # a value of each scalar type, for check_value


def from_dict(cls: Type[C], d: dict, where: Optional[str] = None) -> C:
    """Build a config from a dict (YAML); unknown keys raise ConfigError naming them.
    Optimiser fields (lr, batch_size...) may appear at top level. A field whose type is a config
    dataclass (or ``Dict[str, <config>]``) is built from its mapping the same way, and every
    error names the field by its path from ``where`` (``param_space.fraction[2]: ...``)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    optim_names = {f.name for f in fields(OptimConfig)} if "optim" in names else set()
    unknown = sorted(set(d) - names - optim_names)
    if unknown:
        head = f"{where}: unknown key(s)" if where else f"{cls.__name__}: unknown field(s)"
        raise ConfigError(f"{head} {unknown}; known: {sorted(names | optim_names)}")
    kw = {k: _build(_path(where, k, names), v, hints[k]) for k, v in d.items() if k in names and k != "optim"}
    if optim_names:
        kw["optim"] = OptimConfig(**{k: v for k, v in d.items() if k in optim_names})
    cfg = cls(**kw)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(_path(where, str(e), names | optim_names)) from None
    return cfg


def _path(where: Optional[str], rest: str, names: Any = ()) -> str:
    """``rest`` (a field name, or a message) under ``where``: ``where.field ...`` when it starts
    with one of ``names``, else ``where: message``."""
    if not where:
        return rest
    head = re.match(r"[A-Za-z_][A-Za-z0-9_]*", rest)
    return f"{where}.{rest}" if head and head.group() in names else f"{where}: {rest}"


def _build(name: str, v: Any, tp: Any) -> Any:
    """A YAML value for a field of type ``tp``: nested configs built, lists as tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin is typing.Union and type(None) in args
    inner = next((a for a in args if a is not type(None)), tp) if optional else tp
    if dataclasses.is_dataclass(inner):
        if optional and v in (None, False):
            return None
        if not isinstance(v, dict):
            keys = ", ".join(f.name for f in fields(inner))
            raise ConfigError(f"{name} must be {'null or ' if optional else ''}a mapping with {keys}, got {v!r}")
        return from_dict(inner, v, where=name)
    if typing.get_origin(inner) is dict and len(typing.get_args(inner)) == 2 \
            and dataclasses.is_dataclass(typing.get_args(inner)[1]):
        if not isinstance(v, dict):
            raise ConfigError(f"{name} must be a mapping, got {v!r}")
        sub = typing.get_args(inner)[1]
        return {str(k): from_dict(sub, x if x is not None else {}, where=f"{name}.{k}") for k, x in v.items()}
    if typing.get_origin(inner) is tuple and v is not None and not isinstance(v, (list, tuple)):
        return (v,)  # one value for a list field
    return _tuple(v)


def to_dict(cfg: Any) -> dict:
    """Flat, JSON-friendly dict of a config (recorded as provenance)."""
    d = dataclasses.asdict(cfg)
    d.update(d.pop("optim", {}))
    return d


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{n} must be positive, got {v!r}")


def _in_range(cfg: Any, name: str, lo: float, hi: float) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {v!r}")
