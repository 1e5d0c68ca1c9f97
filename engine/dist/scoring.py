"""Proxy training as Ray tasks and scoring through a Ray Data actor pool."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
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
    if cfg.epochs == 0:  # scores at initialisation only: no need to load the data here
        from engine.models import build_model
        from engine.train import ProxyRun, seed_everything

        seed_everything(seed)
        info = source.info()
        model = build_model(cfg.model, info.image_shape[2], info.num_classes, info.image_shape[0])
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        empty = np.zeros(0, dtype=np.int64)
        return ProxyRun(seed, {0: state}, np.zeros((0, 0), dtype=bool), empty, [], empty)
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
    requested score for every checkpoint computed per batch. Each output row also carries
    the actor's id (``_actor``) and its share of the batch's compute time (``_busy``) for the
    per-actor rates. ``chaos_file``: if that file exists when a batch arrives, the actor
    deletes it and exits abruptly (a drill for fault tolerance: Ray restarts the actor and
    retries its batch)."""

    def __init__(self, model_name: str, info, states_ref: list, plan: List[tuple], params: dict, gpus: float,
                 embed: tuple | None = None, precision: str = "float32", chaos_file: str | None = None,
                 threads: int = 0):
        import warnings

        import torch

        if threads:
            torch.set_num_threads(threads)

        from engine.models import build_model
        from engine.train import pick_device

        # Ray Data hands over read-only numpy views; the scorers never write to their inputs
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = pick_device(gpus)
        self.info, self.plan, self.params, self.precision = info, list(plan), params, precision
        self.embed = embed  # (checkpoint key, dim) for gradient embeddings, or None
        self.chaos_file = chaos_file
        self.actor_id = ray.get_runtime_context().get_actor_id() or f"pid{os.getpid()}"
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

        t0 = time.perf_counter()
        if self.chaos_file and os.path.exists(self.chaos_file):
            try:
                os.remove(self.chaos_file)
            except FileNotFoundError:
                pass  # another actor took it
            else:
                os._exit(17)
        x = batch_to_input(batch["image"], self.info, self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        out = {"sample_id": batch["sample_id"], "label": batch["label"], "part": batch["part"]}
        out.update(score_batch(self.models, x, y, self.plan, self.params, self.precision))
        if self.embed:
            from engine.scores.embeddings import grad_embedding

            key, dim = self.embed
            out["grad_embedding"] = grad_embedding(self.models[key], x, y, dim).cpu().numpy()
        n = len(batch["sample_id"])
        out["_actor"] = np.full(n, self.actor_id)
        out["_busy"] = np.full(n, (time.perf_counter() - t0) / max(n, 1), dtype=np.float32)
        return out


def fingerprint(cfg: ScoreConfig, states: Dict[str, dict], plan, params, embed, target_rows: int) -> str:
    """What the scores of a shard depend on: data, partitioning, checkpoints, scores, params."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps({"data": cfg.data, "model": cfg.model, "target_rows": target_rows, "plan": plan,
                         "params": params, "embed": embed, "precision": cfg.precision},
                        sort_keys=True, default=str).encode())
    for key in sorted(states):
        for name, t in sorted(states[key].items()):
            h.update(f"{key}/{name}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


META_COLUMNS = ("part", "_actor", "_busy")
CHAOS_FILE = "chaos-kill-actor"  # touch WORK_DIR/chaos-kill-actor: one scoring actor exits (fault drill)


def score_on_ray(cfg: ScoreConfig, states: Dict[str, dict], plan: List[tuple], params: Dict[str, dict],
                 embed: tuple | None = None, work_dir: Path | None = None) -> Dict[str, np.ndarray]:
    """Score every training sample by the ``(score, checkpoint key)`` pairs of ``plan`` with
    the checkpoints in ``states`` ({key: state_dict}) through a Ray Data actor pool.

    Streaming: rows come back to the driver batch by batch (images never do), and each source
    partition is written as a Parquet shard under ``work_dir/shards`` once all its rows are
    in. A rerun with the same configuration reuses the finished shards and scores only the
    rest. Returns numpy columns sorted by sample_id, after checking that each training id
    came back exactly once and no score is NaN."""
    import tempfile

    from engine.dist.shards import ShardStore

    source = load_source(cfg.data)
    target_rows = max(cfg.score_batch_size * 4, 2048)
    sizes = [p.num_rows for p in source.partitions("train", target_rows)]
    own_tmp = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="winnow-shards-")) if own_tmp else Path(work_dir)
    store = ShardStore(work_dir / "shards", fingerprint(cfg, states, plan, params, embed, target_rows), sizes)
    done = set(store.done())
    todo = [p for p in range(len(sizes)) if p not in done]
    if done:
        print(f"resuming: reusing {len(done)} finished shard(s), {sum(sizes[p] for p in done)} rows; "
              f"scoring {len(todo)} partition(s), {sum(sizes[p] for p in todo)} rows", flush=True)
    if todo:
        _score_parts(cfg, source, states, plan, params, embed, target_rows, todo, sizes, store)
    cols = store.read_all()
    if own_tmp:
        store.remove()
    return _check_complete(cols, source.num_rows("train"))


def _score_parts(cfg, source, states, plan, params, embed, target_rows, todo, sizes, store) -> None:
    from engine.dist.datasource import read_source

    ds = read_source(source, "train", target_rows=target_rows, only=todo)
    ds = ds.map_batches(
        ScoringActor,
        fn_constructor_kwargs=dict(model_name=cfg.model, info=source.info(), states_ref=[ray.put(states)],
                                   plan=plan, params=params, gpus=cfg.gpus_per_actor, embed=embed,
                                   precision=cfg.precision, chaos_file=str(store.dir.parent / CHAOS_FILE),
                                   threads=0 if cfg.gpus_per_actor else max(1, int(cfg.cpus_per_actor))),
        batch_size=cfg.score_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.actors),
        num_gpus=cfg.gpus_per_actor or None,
        num_cpus=cfg.cpus_per_actor,
    )
    total = sum(sizes[p] for p in todo)
    progress = Progress(total)
    buffers: Dict[int, list] = {}
    counts: Dict[int, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        progress.update(batch["_actor"], batch["_busy"])
        part = batch["part"]
        rows = {k: v for k, v in batch.items() if k not in META_COLUMNS}
        for p in np.unique(part):
            p = int(p)
            sel = part == p
            buffers.setdefault(p, []).append({k: v[sel] for k, v in rows.items()})
            counts[p] = counts.get(p, 0) + int(sel.sum())
            if counts[p] >= sizes[p]:
                merged = _dedupe(_concat(buffers.pop(p)))
                if len(merged["sample_id"]) == sizes[p]:
                    store.write(p, merged)
                    counts.pop(p)
                else:  # a retried batch came back twice: keep one copy and wait for the rest
                    buffers[p], counts[p] = [merged], len(merged["sample_id"])
    progress.close()
    if buffers:
        missing = {p: sizes[p] - counts[p] for p in buffers}
        raise RuntimeError(f"scoring ended with {len(missing)} partition(s) incomplete (missing rows: {missing})")


def _concat(pieces: list) -> Dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in pieces]) for k in pieces[0]}


def _dedupe(cols: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    _, first = np.unique(cols["sample_id"], return_index=True)
    if len(first) == len(cols["sample_id"]):
        return cols
    first = np.sort(first)
    return {k: v[first] for k, v in cols.items()}


class Progress:
    """Rows scored so far (a line every ``every`` seconds) and, at the end, rows/s overall
    and per actor (rows over the seconds that actor spent computing)."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every = total, every
        self.done = 0
        self.t0 = self.last = time.time()
        self.rows: Dict[str, int] = {}
        self.busy: Dict[str, float] = {}

    def update(self, actors: np.ndarray, busy: np.ndarray) -> None:
        self.done += len(actors)
        ids, inv = np.unique(actors, return_inverse=True)
        for i, a in enumerate(ids):
            a = str(a)
            self.rows[a] = self.rows.get(a, 0) + int((inv == i).sum())
            self.busy[a] = self.busy.get(a, 0.0) + float(busy[inv == i].sum())
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"scoring: {self.done}/{self.total} rows ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.0f} rows/s, about {eta:.0f} s left", flush=True)

    def close(self) -> None:
        wall = max(time.time() - self.t0, 1e-9)
        per = ", ".join(f"{a[:8]}: {self.rows[a]} rows at {self.rows[a] / max(self.busy[a], 1e-9):.0f}/s"
                        for a in sorted(self.rows))
        print(f"scored {self.done} rows in {wall:.1f}s: {self.done / wall:.0f} rows/s overall; "
              f"{len(self.rows)} actor(s), rows/s while computing: {per}", flush=True)


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
