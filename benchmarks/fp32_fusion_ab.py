"""Interleaved A/B of the fp32 LoRA path: peft's forward vs the fused one (kernels._LoraLinear), one process.

    python benchmarks/fp32_fusion_ab.py [shared]            # training steps, SST, batch 32, fp32
    python benchmarks/fp32_fusion_ab.py inference           # SST dev through adapters/sst, batch 128

Both variants run in the same process in alternating blocks (4 steps, or one dev pass), so
drifts of a shared machine hit both alike; the first block of each is a warm-up.
"""
import os
import sys
import time
from pathlib import Path

import torch

import peft_mtl.model.kernels as K
from peft_mtl.model.backbone import load_encoder, load_tokenizer, resolve_backbone
from peft_mtl.training.config import TrainConfig
from peft_mtl.data.loading import BatchStream, default_data_dir, encode_split, load_split, task_file
from peft_mtl.training.optimization import TrainingStep, build_optimizer, build_scheduler
from peft_mtl.training.regularizers import Objective
from peft_mtl.device import configure_threads
from peft_mtl.data.tasks import get_task
from peft_mtl.training.train import build_model, load_task_data

configure_threads()
FUSED = K._fused_fp32
IMPL = {"peft": lambda layer, x: type(layer).forward(layer, x), "fused": FUSED}


def training(shared: bool, rounds: int = 6, block: int = 4) -> None:
    cfg = TrainConfig(tasks=["sst"], max_train_examples=3000, max_eval_examples=10, precision="fp32",
                      shared_adapter=shared)
    _, path = resolve_backbone(None)
    train, _, _ = load_task_data(cfg, load_tokenizer(path), default_data_dir())

    def make():
        torch.manual_seed(0)
        model = build_model(cfg, load_encoder(path), 384)
        model.train()
        opt = build_optimizer(cfg, model)
        step = TrainingStep(model, Objective(model, cfg, "fp32"), opt, build_scheduler(opt, 1000, 0.06),
                            cfg.max_grad_norm)
        stream = BatchStream(train["sst"], 32, 0, 0, 0)
        return lambda: step({"sst": stream.next()})

    steps = {k: make() for k in IMPL}
    total = dict.fromkeys(IMPL, 0.0)
    for r in range(rounds + 1):
        for k in IMPL:
            K._fused_fp32 = IMPL[k]
            t = time.perf_counter()
            for _ in range(block):
                steps[k]()
            if r:
                total[k] += time.perf_counter() - t
    for k in IMPL:
        print(f"{'shared+task' if shared else 'one adapter'} {k}: {rounds * block * 32 / total[k]:.1f} examples/s")
    print(f"fused / peft: {total['peft'] / total['fused']:.3f}×")


def inference(rounds: int = 3) -> None:
    from peft_mtl.inference.adapter_host import load_base

    base = load_base(precision="fp32", device="cpu")
    base.load("adapters/sst", name="s")
    sst = get_task("sst")
    dev = encode_split(load_split(task_file(default_data_dir(), sst, "dev"), sst), base.tokenizer)
    total = dict.fromkeys(IMPL, 0.0)
    for r in range(rounds + 1):
        for k in IMPL:
            K._fused_fp32 = IMPL[k]
            t = time.perf_counter()
            base.outputs("sst", dev, "s", batch_size=128)
            if r:
                total[k] += time.perf_counter() - t
    for k in IMPL:
        print(f"inference {k}: {rounds * len(dev) / total[k]:.1f} sentences/s")
    print(f"merged / peft: {total['peft'] / total['fused']:.3f}×")


if __name__ == "__main__":
    if "inference" in sys.argv:
        inference()
    else:
        training("shared" in sys.argv)
