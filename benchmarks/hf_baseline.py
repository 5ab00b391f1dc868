"""The plain Hugging Face baseline peft_mtl is measured against.

Trainer + PEFT LoRA (r=8 on query/value), AutoModelForSequenceClassification's [CLS]
head, fp32, the Trainer's default dynamic padding — the script a user would write first.
Writes one JSON object with dev metrics, timings and the command to stdout / --json.

    python benchmarks/hf_baseline.py --task sst --epochs 3 --json reports/hf_baseline_sst.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sst", choices=["sst", "qqp", "sts"])
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--backbone", default=None, help="a local encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from peft_mtl.model.backbone import resolve_backbone
    from peft_mtl.data.loading import default_data_dir, load_split, task_file
    from peft_mtl.data.metrics import accuracy, pearson
    from peft_mtl.data.tasks import get_task
    from peft_mtl.artifacts import write_json_atomic
    from peft_mtl.device import name as device_name

    task = get_task(args.task)
    metric = task.metrics[0]
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    backbone_name, path = resolve_backbone(args.backbone)
    tok = AutoTokenizer.from_pretrained(str(path))

    def dataset(split: str, limit=None) -> Dataset:
        ex = load_split(task_file(data_dir, task, split), task).examples[:limit]
        cols = {f"t{i}": [e.texts[i] for e in ex] for i in range(len(task.text_columns))}
        cols["labels"] = [int(e.label) if task.kind == "classification" else float(e.label) for e in ex]
        ds = Dataset.from_dict(cols)
        keys = [f"t{i}" for i in range(len(task.text_columns))]
        return ds.map(lambda b: tok(*[b[k] for k in keys], truncation=True, max_length=128), batched=True,
                      remove_columns=keys)

    train_ds, dev_ds = dataset("train", args.max_train_examples), dataset("dev")
    num_labels = task.num_labels if task.kind == "classification" else 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
    if args.mode == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["query", "value"]))
    lr = args.lr or (5e-4 if args.mode == "lora" else 5e-5)

    def metrics(pred):
        logits, labels = pred
        if task.kind == "classification":
            return {metric: accuracy(logits.argmax(-1), labels)}
        return {metric: pearson(np.clip(logits.squeeze(-1), 0, 5), labels)}

    targs = TrainingArguments(output_dir="/tmp/hf_baseline", num_train_epochs=args.epochs, learning_rate=lr,
                              per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
                              eval_strategy="no", save_strategy="no", report_to=[], logging_steps=50,
                              use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=dev_ds, processing_class=tok,
                      compute_metrics=metrics)
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    t0 = time.time()
    result = trainer.evaluate()
    eval_seconds = time.time() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    out = {"pipeline": f"HF Trainer + {'PEFT LoRA r=8 query,value' if args.mode == 'lora' else 'full fine-tune'}, "
                       f"[CLS] head, fp32", "task": task.name, "epochs": args.epochs, "lr": lr,
           "dev": {metric: result[f"eval_{metric}"]},
           "train_examples": len(train_ds), "batch_size": args.batch_size, "train_steps": trainer.state.global_step,
           "train_seconds": round(train_seconds, 1),
           "train_examples_per_second": round(len(train_ds) * args.epochs / train_seconds, 1),
           "eval_seconds": round(eval_seconds, 1), "trainable_parameters": trainable,
           "total_parameters": total, "backbone": backbone_name, "device": device_name(targs.device), "torch_threads": torch.get_num_threads(), "command": "python " + " ".join(sys.argv)}
    print(json.dumps(out))
    if args.json:
        write_json_atomic(Path(args.json), out)


if __name__ == "__main__":
    main()
