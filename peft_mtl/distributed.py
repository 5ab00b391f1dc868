"""Data-parallel training across processes through accelerate (gloo on CPU, NCCL on GPUs).

``accelerate launch --num_processes N -m peft_mtl train ...`` starts N copies of the same
command. They agree on everything that is random at the run level — the task schedule
and every global batch depend only on (seed, epoch, pass) — and each rank trains on its
own rows of each global batch (``rows[rank::N]``), so shards are disjoint and the
effective batch is ``N × --batch-size``.

Gradients are averaged with one all-reduce per step instead of wrapping the model in
``DistributedDataParallel``: a step may run several forward passes (SMART, Bregman,
PCGrad, summed tasks) and most adapters are unused in any one step, two things DDP's
reducer handles badly. The result is the same synchronous data parallelism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    accelerator: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, indices: np.ndarray) -> np.ndarray:
        return indices[self.rank::self.world] if self.enabled else indices

    @torch.no_grad()
    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over ranks; a parameter without a gradient contributes zeros."""
        if not self.enabled or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            chunk = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is not None or chunk.abs().sum() > 0:
                p.grad = chunk.clone()
            offset += n

    def gather(self, obj):
        """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup() -> Dist:
    """One Dist per process: plain single-process unless launched by accelerate/torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator)
