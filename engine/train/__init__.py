"""Plain-PyTorch training and evaluation loops; no Ray here (``engine.distributed`` wraps them)."""
from engine.train.loops import (
    ProxyRun,
    batch_to_input,
    epoch_plan,
    evaluate,
    fit_proxy,
    make_optimizer,
    pick_device,
    seed_everything,
    shuffled_batches,
    train_epoch,
    train_step,
    train_stream_epoch,
    weighted_batches,
)

__all__ = [
    "ProxyRun", "batch_to_input", "epoch_plan", "evaluate", "fit_proxy", "make_optimizer",
    "pick_device", "seed_everything", "shuffled_batches", "train_epoch", "train_step",
    "train_stream_epoch", "weighted_batches"
]
