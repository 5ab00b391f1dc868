"""The on-disk format of a trained run (an "adapter set") and loading it back.

A folder written by ``peft-mtl train`` holds:

* ``peft_mtl.json`` — the manifest: format version, mode, tasks, adapters and routing,
  heads, backbone identity, full training config, dev metrics, timings. Written last,
  so a folder without it is not a finished run.
* LoRA adapters in peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``).
  A run with a single adapter keeps it at the top level, so
  ``PeftModel.from_pretrained(base, folder)`` opens it directly; runs with several
  (``shared`` + one per task) keep one sub-folder per adapter.
* ``head.safetensors`` beside each task's adapter (``heads/<task>/`` without adapters).
* ``encoder/`` — the whole fine-tuned encoder in Hugging Face format (``--mode full`` only).

Loading reads JSON and safetensors only: nothing is unpickled, no code is executed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UserError
from .model_card import write_card
from ..artifacts import atomic_folder, save_tensors_atomic, write_json_atomic
from .heads import TaskHead
from .multitask import MultiTaskModel

FORMAT_VERSION = 1
MANIFEST = "peft_mtl.json"
HEAD_FILE = "head.safetensors"


class AdapterError(UserError):
    """A saved run cannot be loaded; the message names the folder and the reason."""


def head_spec(head: TaskHead) -> dict:
    linear = head.linear
    return {"pair_encoding": head.pair_encoding, "cosine": head.cosine,
            "in_features": linear.in_features if linear is not None else None,
            "outputs": linear.out_features if linear is not None else 1,
            "dropout": head.dropout.p, "cosine_scale": head.cosine_scale}


def build_head(spec: dict, hidden_size: int) -> TaskHead:
    return TaskHead(hidden_size, spec["outputs"], pair_encoding=spec["pair_encoding"], dropout=spec["dropout"],
                    cosine=spec["cosine"], cosine_scale=spec.get("cosine_scale", 5.0))


def save_run(model: MultiTaskModel, folder: str | Path, manifest: dict, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the trained adapters, heads and manifest into ``folder`` atomically."""
    folder = Path(folder)
    manifest = dict(manifest)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        adapters: dict[str, str] = {}
        if model.has_adapters:
            names = list(model.encoder.peft_config)
            staging = tmp / ".peft-staging"
            for name in names:
                model.encoder.save_pretrained(str(staging), selected_adapters=[name])
                written = staging / name if (staging / name).is_dir() else staging
                rel = "." if len(names) == 1 else name
                (tmp / rel).mkdir(exist_ok=True)
                for f in written.iterdir():
                    if f.is_file():
                        shutil.move(str(f), str(tmp / rel / f.name))
                shutil.rmtree(staging)
                adapters[name] = rel
        elif manifest.get("mode") == "full":
            model.encoder.save_pretrained(str(tmp / "encoder"))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "encoder"))
        heads: dict[str, str] = {}
        head_specs: dict[str, dict] = {}
        for key, head in model.heads.items():
            if key in adapters:
                rel_dir = adapters[key]
            elif len(adapters) == 1:
                rel_dir = "."
            else:
                rel_dir = f"heads/{key}"
            (tmp / rel_dir).mkdir(parents=True, exist_ok=True)
            rel = str(Path(rel_dir) / HEAD_FILE)
            save_tensors_atomic(head.state_dict(), tmp / rel, metadata={"task": key, "format_version": str(FORMAT_VERSION)})
            heads[key] = rel
            head_specs[key] = head_spec(head)
        manifest.update({
            "format_version": FORMAT_VERSION,
            # What a user downloads to use the set; kept when the weights are not (manifest-only archives).
            "bytes_on_disk": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
            "adapters": adapters,
            "routing": {k: list(v) for k, v in model.routing.items()},
            "heads": heads,
            "head_specs": head_specs,
            "pooling": model.pooling,
        })
        write_json_atomic(tmp / MANIFEST, manifest)
        write_card(tmp, manifest, folder.name)
    return folder


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a saved run, checked for the fields and version this code understands."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such folder. Pass a folder written by `peft-mtl train`.")
    path = folder / MANIFEST
    if not path.is_file():
        hint = " (it looks like a bare peft adapter: it has no task head)" if (folder / "adapter_config.json").is_file() else ""
        raise AdapterError(f"{folder}: not a peft_mtl adapter folder, {MANIFEST} is missing{hint}. "
                           f"Pass a folder written by `peft-mtl train`; an interrupted run is resumed with --resume.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: corrupted manifest ({err}). Retrain or restore the folder from a copy.") from None
    if not isinstance(manifest, dict):
        raise AdapterError(f"{path}: corrupted manifest (not a JSON object).")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise AdapterError(f"{path}: no format_version; this is not a peft_mtl manifest.")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{folder}: written by a newer peft_mtl (format {version}, this one reads up to "
                           f"{FORMAT_VERSION}). Upgrade peft_mtl: pip install -U peft_mtl.")
    for key in ("mode", "tasks", "adapters", "routing", "heads", "head_specs", "backbone", "pooling"):
        if key not in manifest:
            raise AdapterError(f"{path}: manifest lacks {key!r}; the folder is incomplete or corrupted.")
    return manifest


def check_backbone(folder: Path, manifest: dict, identity) -> None:
    saved = manifest["backbone"]
    if not identity.same_model(saved):
        raise AdapterError(
            f"{folder}: trained on backbone {saved.get('name')!r} ({saved.get('model_type')}, "
            f"{saved.get('num_layers')} layers, {saved.get('hidden_size')} wide) but the loaded backbone is "
            f"{identity.name!r} ({identity.model_type}, {identity.num_layers} layers, {identity.hidden_size} wide, "
            f"different weights). Load it with --backbone pointing at the model it was trained on.")


def load_head_weights(folder: Path, rel: str) -> dict[str, torch.Tensor]:
    path = folder / rel
    if not path.is_file():
        raise AdapterError(f"{path}: head weights missing; the folder is incomplete. Retrain or restore it.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{path}: corrupted safetensors file ({err}). Retrain or restore the folder.") from None


def check_adapter_files(folder: Path, rel: str) -> Path:
    path = folder / rel
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise AdapterError(f"{path / name}: missing; the adapter folder is incomplete. Retrain or restore it.")
    try:
        from safetensors import safe_open

        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as err:  # safetensors raises several types for truncation/corruption
        raise AdapterError(f"{path / 'adapter_model.safetensors'}: corrupted safetensors file ({err}). "
                           f"Retrain or restore the folder.") from None
    try:
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path / 'adapter_config.json'}: corrupted JSON ({err}).") from None
    return path
