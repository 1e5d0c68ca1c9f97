"""Proxy training as Ray tasks and scoring through a Ray Data actor pool."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import ray

from engine import hooks
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
    info = source.info()
    transform = cfg.train_transform or info.train_transform
    augment = None if transform == "none" else \
        (lambda idx, epoch: source.augment(split.image[idx], split.sample_id[idx], transform, seed, epoch))
    return fit_proxy(split, info, cfg.model, cfg.optim, cfg.epochs, seed, checkpoint_epochs, device,
                     augment=augment)


def train_proxies(cfg: ScoreConfig, checkpoint_epochs: tuple) -> list:
    """Train seeds 0..S-1 concurrently as Ray tasks (1 CPU each, or a GPU share), keeping
    weights at ``checkpoint_epochs`` (0 = init); returns ``ProxyRun``s in seed order."""
    opts = {"num_cpus": 1, "num_gpus": cfg.gpus_per_actor or 0}
    refs = [_train_proxy.options(**opts).remote(cfg, seed, tuple(checkpoint_epochs)) for seed in range(cfg.seeds)]
    return ray.get(refs)


class ScoringActor:
    """Callable class for ``map_batches``: models built and loaded once in ``__init__``, every
    requested score for every checkpoint computed per call.

    A call gets a whole block (thousands of rows) and scores it in mini-batches of
    ``batch_rows`` (the job's score batch size): each mini-batch's uint8 images go through a
    pinned staging buffer with a non-blocking copy, are normalised on the device, and the
    scores stay on the device until the call's end, so there is one device sync per call, not
    several per mini-batch, and the host prepares mini-batch i+1 while the device computes i.
    The scores equal ``score_batch`` on the same mini-batches (same scorers, same autocast,
    same normalisation arithmetic; tested).

    ``work_dir`` is the run's work directory (``engine.hooks`` points ``scoring.actor_ready``,
    ``scoring.call`` and ``scoring.called`` hand the actor to fault drills and benchmark
    telemetry, which may add ``_``-prefixed columns). On CUDA the constructor also runs the plan once
    on a dummy mini-batch (cuDNN/cuBLAS initialisation and lazy kernel loading), so that cost is
    start-up, paid while the read tasks fill the queue, not the first block's."""

    def __init__(self, model_name: str, info, states_ref: list, plan: List[tuple], params: dict, gpus: float,
                 embed: tuple | None = None, precision: str = "float32", work_dir: str | None = None,
                 threads: int = 0, batch_rows: int = 0, warmup: bool = True):
        init0 = time.time()
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
        self.batch_rows = int(batch_rows)
        self.work_dir = work_dir
        self.pin = self.device.type == "cuda"
        # normalize()'s constants, made once on the device (it builds them per call: a sync each)
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        states = ray.get(states_ref[0])
        self.models = {}
        for key, state in states.items():
            with self.device:  # parameters created where they will live (no CPU init + copy)
                model = build_model(model_name, info.image_shape[2], info.num_classes, info.image_shape[0])
            model.load_state_dict(state)
            self.models[key] = model.to(self.device).eval()
        torch.set_grad_enabled(True)
        if warmup and self.device.type == "cuda":
            n = self.batch_rows or 64
            self._score(np.zeros((n, *info.image_shape), np.uint8), np.zeros(n, np.int64))
            torch.cuda.synchronize(self.device)
        hooks.fire("scoring.actor_ready", actor=self, started=init0)

    def _input(self, images: np.ndarray):
        """uint8 [B, H, W, C] -> normalised float32 [B, C, H, W] on the device: the arithmetic
        of ``engine.data.transforms.normalize`` (bit for bit), with the uint8 bytes copied
        through a pinned buffer (torch's caching host allocator reuses it once its copy is
        done) so the host-to-device copy does not block the host."""
        import torch

        t = torch.from_numpy(images)
        if self.pin:
            staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            staged.copy_(t)
            t = staged
        t = t.to(self.device, non_blocking=True)
        x = t.permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous()

    def _score(self, images: np.ndarray, labels: np.ndarray) -> Dict[str, np.ndarray]:
        """Scores of ``images``/``labels`` in mini-batches of ``batch_rows`` (all at once if 0);
        what ``score_batch`` computes per mini-batch, with one device-to-host copy at the end."""
        import torch

        from engine.scores import score_plan

        n = len(labels)
        step = self.batch_rows or max(n, 1)
        y_all = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(self.device, non_blocking=self.pin)
        parts: Dict[str, list] = {}
        for i in range(0, n, step):
            x = self._input(np.ascontiguousarray(images[i:i + step]))
            y = y_all[i:i + step]
            for k, v in score_plan(self.models, x, y, self.plan, self.params, self.precision).items():
                parts.setdefault(k, []).append(v)
            if self.embed:
                from engine.scores.embeddings import grad_embedding

                key, dim = self.embed
                parts.setdefault("grad_embedding", []).append(grad_embedding(self.models[key], x, y, dim).float())
        return {k: torch.cat(v).cpu().numpy() for k, v in parts.items()}

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        hooks.fire("scoring.call", actor=self, batch=batch)
        t0 = time.perf_counter()
        out = {"sample_id": batch["sample_id"], "label": batch["label"], "part": batch["part"]}
        out.update(self._score(batch["image"], batch["label"]))
        hooks.fire("scoring.called", actor=self, batch=batch, out=out, seconds=time.perf_counter() - t0)
        return out


def fingerprint(cfg: ScoreConfig, states: Dict[str, dict], plan, params, embed, target_rows: int,
                data_key: str | None = None) -> str:
    """What the scores of a shard depend on: data (``data_key``, the source's
    ``content_key()``: files' sizes and times, the synthetic generator; the spec if not
    given), partitioning, checkpoints, scores, params."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps({"data": data_key or cfg.data, "model": cfg.model, "target_rows": target_rows, "plan": plan,
                         "params": params, "embed": embed, "precision": cfg.precision},
                        sort_keys=True, default=str).encode())
    for key in sorted(states):
        for name, t in sorted(states[key].items()):
            h.update(f"{key}/{name}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


CALL_BYTES = 1 << 30       # uint8 image bytes per read block (= per actor call) at most


def score_on_ray(cfg: ScoreConfig, states: Dict[str, dict], plan: List[tuple], params: Dict[str, dict],
                 embed: tuple | None = None, work_dir: Path | None = None) -> Dict[str, np.ndarray]:
    """Score every training sample by the ``(score, checkpoint key)`` pairs of ``plan`` with
    the checkpoints in ``states`` ({key: state_dict}) through a Ray Data actor pool.

    Streaming: rows come back to the driver block by block (images never do), and each source
    partition is written as a Parquet shard under ``work_dir/shards`` once all its rows are
    in. A rerun with the same configuration reuses the finished shards and scores only the
    rest. Returns numpy columns sorted by sample_id, after checking that each training id
    came back exactly once and no score is NaN."""
    import tempfile

    from engine.distributed.shards import ShardStore

    source = load_source(cfg.data)
    target_rows = max(cfg.score_batch_size * 4, 2048)
    sizes = [p.num_rows for p in source.partitions("train", target_rows)]
    own_tmp = work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="winnow-shards-")) if own_tmp else Path(work_dir)
    store = ShardStore(work_dir / "shards", fingerprint(cfg, states, plan, params, embed, target_rows,
                                                         source.content_key()), sizes)
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


def read_plan(sizes: List[int], row_bytes: int, batch_rows: int, actors: int) -> tuple:
    """(number of read blocks, rows in the largest block) for partitions of ``sizes`` rows.

    One read task per partition, and no further splitting when there are enough of them:
    blocks are then the source's own (Synthetic: 4096-row chunks; in-memory sources: one per
    partition), whole multiples of the score batch size. (Ray Data's default asks for 200+
    blocks and cut each partition into blocks of a few hundred rows that were no multiples of
    the score batch size, so that every block ended in a short mini-batch and every call paid
    Ray's per-call cost for a few hundred rows.) Split further only to keep a block under
    ``CALL_BYTES``, or, for small inputs, so that each actor gets about four blocks."""
    rows = sum(sizes)
    want = max(len(sizes), -(-rows * row_bytes // CALL_BYTES),
               min(4 * actors, -(-rows // max(batch_rows, 1))))
    per = -(-want // len(sizes))          # Ray Data cuts each read task's output in ``per``
    return want, -(-max(sizes) // per)


def _score_parts(cfg, source, states, plan, params, embed, target_rows, todo, sizes, store) -> None:
    from engine.distributed.datasource import SourceDatasource

    h, w, c = source.info().image_shape
    blocks, block_rows = read_plan([sizes[p] for p in todo], h * w * c, cfg.score_batch_size, cfg.actors)
    block_bytes = block_rows * h * w * c
    ds = ray.data.read_datasource(SourceDatasource(source, "train", target_rows, only=todo),
                                  override_num_blocks=blocks)
    # a block is the unit of an actor call: let Ray Data keep the source's blocks whole
    ctx = ds.context
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, min(block_bytes, CALL_BYTES) + (1 << 20))
    ds = ds.map_batches(
        ScoringActor,
        fn_constructor_kwargs=dict(model_name=cfg.model, info=source.info(), states_ref=[ray.put(states)],
                                   plan=plan, params=params, gpus=cfg.gpus_per_actor, embed=embed,
                                   precision=cfg.precision, work_dir=str(store.dir.parent),
                                   threads=0 if cfg.gpus_per_actor else max(1, int(cfg.cpus_per_actor)),
                                   batch_rows=cfg.score_batch_size),
        batch_size=block_rows,    # whole blocks; the actor cuts them into score mini-batches
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.actors),
        num_gpus=cfg.gpus_per_actor or None,
        num_cpus=cfg.cpus_per_actor,
        # two tasks per actor at once: the next block is fetched and formatted while the current
        # one is scored (Ray Data still runs the UDF itself one call at a time per actor)
        max_concurrency=2,
    )
    total = sum(sizes[p] for p in todo)
    progress = Progress(total)
    hooks.fire("scoring.start", rows=total)
    buffers: Dict[int, list] = {}
    counts: Dict[int, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        progress.update(batch)
        hooks.fire("scoring.block", batch=batch)
        part = batch["part"]
        rows = {k: v for k, v in batch.items() if k != "part" and not k.startswith("_")}
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
    hooks.fire("scoring.done", stats={"rows": progress.done, "wall_s": time.time() - progress.t0, "blocks": blocks})
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
    """Rows scored so far: a line every ``every`` seconds with the rate and the time left, and
    one at the end."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every = total, every
        self.done = 0
        self.t0 = self.last = time.time()

    def update(self, batch: Dict[str, np.ndarray]) -> None:
        now = time.time()
        self.done += len(batch["sample_id"])
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"scoring: {self.done}/{self.total} rows ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.0f} rows/s, about {eta:.0f} s left", flush=True)

    def close(self) -> None:
        wall = max(time.time() - self.t0, 1e-9)
        print(f"scored {self.done} rows in {wall:.1f}s ({self.done / wall:.0f} rows/s)", flush=True)


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
