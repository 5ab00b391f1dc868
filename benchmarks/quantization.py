"""Quantized backbones on this CPU: memory footprint, LoRA step time and a short-run dev score.

For each of fp32, bf16 (autocast), int8 and nf4 (bitsandbytes): the backbone's memory
footprint, the median time of a LoRA training step (SST, batch 32), and the dev accuracy
after one short training run on the same slice (the quantized kernels are too slow on
this CPU for full runs — that is itself the finding).

    python benchmarks/quantization.py --train-examples 512 --dev-examples 300 --json reports/quantization.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--dev-examples", type=int, default=300)
    p.add_argument("--settings", default="fp32,bf16,int8,nf4")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from peft_mtl.backbone import load_encoder, load_quantized_encoder, resolve_backbone
    from peft_mtl.config import TrainConfig
    from peft_mtl.train import train

    _, path = resolve_backbone(None)
    rows = []
    for setting in args.settings.split(","):
        quantize = setting if setting in ("int8", "nf4") else None
        encoder = load_quantized_encoder(path, quantize) if quantize else load_encoder(path)
        if setting == "bf16":
            footprint = sum(p.numel() * 2 for p in encoder.parameters())
        else:
            footprint = encoder.get_memory_footprint()
        del encoder
        out = Path(tempfile.mkdtemp()) / setting
        cfg = TrainConfig(tasks=["sst"], out=str(out), epochs=1, max_train_examples=args.train_examples,
                          max_eval_examples=args.dev_examples, precision="fp32" if setting == "fp32" else "bf16",
                          quantize=quantize, checkpoint_every=0)
        t = time.time()
        summary = train(cfg, progress=False)
        seconds = time.time() - t
        manifest = json.loads((out / "peft_mtl.json").read_text())
        steps = -(-args.train_examples // cfg.batch_size)
        rows.append({"setting": setting, "backbone_memory_mb": round(footprint / 2 ** 20, 1),
                     "train_seconds": manifest["train_seconds"],
                     "seconds_per_step": round(manifest["train_seconds"] / steps, 2),
                     "dev_accuracy": summary["dev"]["sst"]["accuracy"], "total_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out.parent, ignore_errors=True)
    result = {"command": "python " + " ".join(sys.argv), "train_examples": args.train_examples,
              "dev_examples": args.dev_examples, "epochs": 1, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
