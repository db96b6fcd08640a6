"""Data-parallel fine-tuning under ``torchrun`` / ``accelerate launch``: one process per device.

Every process loads the same data and builds the same model (same seed); each optimizer step's
batch is split between the processes, each computes the gradient of its share, and the gradients
are summed across processes before the step, so all processes take identical steps and stay
identical. The steps are the single-process run's (same batches, same mean loss); only dropout
draws differ, so the weights are not bit-identical to one process's. Only process 0 (rank 0) saves, evaluates, gates and promotes; the others exit after the
fine-tune. Backend: NCCL on CUDA, gloo on CPU.

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op. torch is imported
inside the functions that use it: the CLI reads ``world_size`` for every command, and ``list`` and
``promote`` need no torch (importing it costs them about a second).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from mailtriage.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start mailtriage-train "
                          "directly, or with torchrun / accelerate launch, which set it") from exc


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0) if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """True inside a process group of more than one process (set up by ``start``)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def start(device: str) -> None:
    """Join the launcher's process group when there is more than one process (idempotent)."""
    if world_size() == 1 or active():
        return
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    log.info("distributed_started", backend=backend, rank=dist.get_rank(), world_size=dist.get_world_size())


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sync_parameters(params: Sequence[torch.Tensor]) -> None:
    """Make every process start from rank 0's trainable weights (the same seed gives the same ones;
    this makes it a guarantee rather than an assumption)."""
    import torch.distributed as dist

    if active():
        for p in params:
            dist.broadcast(p.data, src=0)


def my_share(chunk: list[int]) -> tuple[list[int], float]:
    """This process's part of one batch (every world_size-th row) and its weight in the batch's
    mean loss. A process with no rows this time (a last, short batch) computes one row at weight 0,
    so every process still joins the gradient sum."""
    import torch.distributed as dist

    if not active():
        return chunk, 1.0
    mine = chunk[dist.get_rank() :: dist.get_world_size()]
    return (mine, len(mine) / len(chunk)) if mine else (chunk[:1], 0.0)


def rank0_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every process. Early stopping must stop all processes at the same epoch
    (one left waiting in a gradient sum would hang): validation scores computed on each process may
    differ in the last bits on a GPU, so the decision is rank 0's, not each process's own."""
    import torch
    import torch.distributed as dist

    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients across processes: each process weighted its loss by its share of the batch,
    so the sum is the gradient of the whole batch's mean loss, as in one process."""
    import torch
    import torch.distributed as dist

    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step, not one per tensor
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n
