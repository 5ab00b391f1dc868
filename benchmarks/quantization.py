"""Quantized backbones on this CPU: memory footprint, LoRA step time and a short-run dev score.

For each of fp32, bf16 (autocast), int8 and nf4 (bitsandbytes): the backbone's memory
footprint, the mean time of a LoRA training step (SST, batch 32), and the dev accuracy
after the same training run (same rows, seed, epochs and recipe) on every setting.

    python benchmarks/quantization.py --train-examples 0 --epochs 2 --keep adapters/quantized \
        --json reports/quantization.json

--train-examples 0 trains on the whole SST training split; --keep saves each trained set
(so `peft-mtl report` lists them) instead of deleting it.
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
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--settings", default="fp32,bf16,int8,nf4")
    p.add_argument("--keep", default=None, help="save each trained set under KEEP/sst_SETTING")
    p.add_argument("--json", default=None)
    p.add_argument("--eval-only", action="store_true",
                   help="do not train: score the sets already under --keep on the full dev split and "
                        "add the scores to --json")
    args = p.parse_args()
    if args.eval_only:
        return eval_only(args)

    from peft_mtl.model.backbone import load_encoder, load_quantized_encoder, resolve_backbone
    from peft_mtl.training.config import TrainConfig
    from peft_mtl.training.train import train

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
        out = Path(args.keep) / f"sst_{setting}" if args.keep else Path(tempfile.mkdtemp()) / setting
        cfg = TrainConfig(tasks=["sst"], out=str(out), epochs=args.epochs,
                          max_train_examples=args.train_examples or None,
                          max_eval_examples=args.dev_examples, precision="fp32" if setting == "fp32" else "bf16",
                          quantize=quantize, checkpoint_every=0)
        t = time.time()
        summary = train(cfg, progress=False)
        seconds = time.time() - t
        manifest = json.loads((out / "peft_mtl.json").read_text())
        train_rows = manifest["train_examples"]
        train_rows = train_rows["sst"] if isinstance(train_rows, dict) else train_rows
        steps = args.epochs * -(-train_rows // cfg.batch_size)
        rows.append({"setting": setting, "backbone_memory_mb": round(footprint / 2 ** 20, 1),
                     "train_seconds": manifest["train_seconds"],
                     "seconds_per_step": round(manifest["train_seconds"] / steps, 2),
                     "dev_accuracy": summary["dev"]["sst"]["accuracy"],
                     "best_epoch": summary["best_epoch"], "total_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(out.parent, ignore_errors=True)
    result = {"command": "python " + " ".join(sys.argv), "train_examples": args.train_examples,
              "dev_examples": args.dev_examples, "epochs": args.epochs, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def full_dev_accuracy(folder: Path, setting: str) -> float:
    """SST dev accuracy (all 1,101 rows) of a kept set, on the backbone setting it was trained with."""
    from peft_mtl.model.backbone import (backbone_identity, load_encoder, load_quantized_encoder, load_tokenizer,
                                         resolve_backbone)
    from peft_mtl.data.loading import default_data_dir, encode_split, load_split, task_file
    from peft_mtl.inference.evaluate import predictions_from_outputs, score
    from peft_mtl.inference.adapter_host import AdapterHost
    from peft_mtl.data.tasks import get_task

    name, path = resolve_backbone(None)
    quantize = setting if setting in ("int8", "nf4") else None
    encoder = load_quantized_encoder(path, quantize, for_training=False) if quantize else load_encoder(path)
    # Sets record the full-precision backbone's identity; the quantized encoder stands in for it.
    identity = backbone_identity(name, load_encoder(path))
    base = AdapterHost(encoder, load_tokenizer(path), identity, None, "fp32" if setting == "fp32" else "bf16")
    base.load(folder, name="quantized")
    sst = get_task("sst")
    dev = encode_split(load_split(task_file(default_data_dir(), sst, "dev"), sst), base.tokenizer)
    outputs = base.outputs("sst", dev, "quantized")
    return score(dev, predictions_from_outputs(sst.kind, outputs))["accuracy"]


def eval_only(args) -> None:
    result = json.loads(Path(args.json).read_text())
    for row in result["rows"]:
        folder = Path(args.keep) / f"sst_{row['setting']}"
        row["full_dev_accuracy"] = full_dev_accuracy(folder, row["setting"])
        print(json.dumps(row), flush=True)
    result["full_dev_command"] = "python " + " ".join(sys.argv)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
