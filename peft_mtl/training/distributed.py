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
from accelerate import Accelerator



@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    accelerator: object | None = None
    device: torch.device = torch.device("cpu")  # this rank's (accelerate's choice when launched)

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
        """Average the gradients of ``params`` over ranks, in one all-reduce.

        ``params`` must be the same list on every rank (the optimiser's). A tensor without
        a gradient contributes zeros; it gets the average if any rank had a gradient for it,
        and stays without one otherwise (so AdamW skips it everywhere alike).
        """
        if not self.enabled or not params:
            return
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        parts.append(torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=params[0].device))
        flat = torch.cat(parts)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        had_grad = flat[-len(params):].tolist()  # one device-to-host copy, not one per parameter
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            if had_grad[i] > 0:
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def gather(self, obj):
        """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (one tiny all-reduce; local when alone)."""
        if not self.enabled:
            return flag

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup() -> Dist:
    """One Dist per process: plain single-process unless launched by accelerate/torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # Each rank its own GPU (NCCL), or the CPU (gloo); the run carries it from here.
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator,
                device=accelerator.device)
