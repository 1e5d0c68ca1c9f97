"""Proxy training as Ray tasks and scoring through a Ray Data actor pool."""
from __future__ import annotations

import time
from typing import Dict, List

import numpy as np
import ray

from engine.config import ScoreConfig
from engine.data import load_source
from engine.errors import DataError


@ray.remote
def _train_proxy(cfg: ScoreConfig, seed: int, checkpoint_epochs: tuple):
    """One proxy run inside a Ray task (pure ``fit_proxy``; data loaded where it runs)."""
    import torch

    from engine.train import fit_proxy, pick_device

    torch.set_num_threads(1 if not cfg.gpus_per_actor else torch.get_num_threads())
    source = load_source(cfg.data)
    split = source.arrays("train")
    device = pick_device(cfg.gpus_per_actor)
    return fit_proxy(split, source.info(), cfg.model, cfg.optim, cfg.epochs, seed,
                     checkpoint_epochs, device)


def train_proxies(cfg: ScoreConfig, checkpoint_epochs: tuple) -> list:
    """Train seeds 0..S-1 concurrently as Ray tasks (1 CPU each, or a GPU share), keeping
    weights at ``checkpoint_epochs`` (0 = init); returns ``ProxyRun``s in seed order."""
    opts = {"num_cpus": 1, "num_gpus": cfg.gpus_per_actor or 0}
    refs = [_train_proxy.options(**opts).remote(cfg, seed, tuple(checkpoint_epochs)) for seed in range(cfg.seeds)]
    return ray.get(refs)


class ScoringActor:
    """Callable class for ``map_batches``: models built and loaded once in ``__init__``, every
    requested score for every checkpoint computed per batch."""

    def __init__(self, model_name: str, info, states_ref: list, plan: List[tuple], params: dict, gpus: float,
                 embed: tuple | None = None):
        import torch

        from engine.models import build_model
        from engine.train import pick_device

        self.device = pick_device(gpus)
        self.info, self.plan, self.params = info, list(plan), params
        self.embed = embed  # (checkpoint key, dim) for gradient embeddings, or None
        states = ray.get(states_ref[0])
        self.models = {}
        for key, state in states.items():
            model = build_model(model_name, info.image_shape[2], info.num_classes, info.image_shape[0])
            model.load_state_dict(state)
            self.models[key] = model.to(self.device).eval()
        torch.set_grad_enabled(True)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        from engine.scores import score_batch
        from engine.train import batch_to_input

        x = batch_to_input(batch["image"], self.info, self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        out = {"sample_id": batch["sample_id"], "label": batch["label"]}
        out.update(score_batch(self.models, x, y, self.plan, self.params))
        if self.embed:
            from engine.scores.embeddings import grad_embedding

            key, dim = self.embed
            out["grad_embedding"] = grad_embedding(self.models[key], x, y, dim).cpu().numpy()
        return out


def score_on_ray(cfg: ScoreConfig, states: Dict[str, dict], plan: List[tuple],
                 params: Dict[str, dict], embed: tuple | None = None) -> Dict[str, np.ndarray]:
    """Score every training sample by the ``(score, checkpoint key)`` pairs of ``plan`` with
    the checkpoints in ``states`` ({key: state_dict}) through a Ray Data actor pool. Returns numpy columns sorted by sample_id, after checking
    that each training id came back exactly once and no score is NaN."""
    from engine.dist.datasource import read_source

    source = load_source(cfg.data)
    ds = read_source(source, "train", target_rows=max(cfg.score_batch_size * 4, 2048))
    ds = ds.map_batches(
        ScoringActor,
        fn_constructor_kwargs=dict(model_name=cfg.model, info=source.info(), states_ref=[ray.put(states)],
                                   plan=plan, params=params, gpus=cfg.gpus_per_actor, embed=embed),
        batch_size=cfg.score_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_gpus=cfg.gpus_per_actor or None,
        num_cpus=1,
    )
    t0 = time.time()
    parts: Dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    n = len(cols["sample_id"])
    print(f"scored {n} rows in {time.time() - t0:.1f}s ({n / max(time.time() - t0, 1e-9):.0f} rows/s)")
    return _check_complete(cols, source.num_rows("train"))


def _check_complete(cols: Dict[str, np.ndarray], expected: int) -> Dict[str, np.ndarray]:
    ids = cols["sample_id"]
    if len(np.unique(ids)) != len(ids) or len(ids) != expected:
        raise DataError(f"scoring returned {len(ids)} rows ({len(np.unique(ids))} unique ids) for {expected} samples")
    order = np.argsort(ids, kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    for k, v in cols.items():
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise DataError(f"score {k!r} is NaN or infinite for {int((~np.isfinite(v)).sum())} sample(s)")
    return cols
