"""Rank compression of a trained adapter set: every LoRA adapter replaced by its best low-rank fit.

A LoRA adapter adds ``scale · B A`` to each target weight. Its truncated SVD at rank ``k`` is the
closest rank-``k`` update in the Frobenius norm (Eckart–Young), so a rank-16 set can be cut to a
set that stores a quarter of the parameters — or fewer — without retraining. Adapters that
several tasks share (``shared``) and task-private ones may get different ranks: a shared
adapter's updates concentrate in fewer directions than the per-task corrections
(reports/multitask.md measures both). The result is an ordinary set: it loads, serves, ensembles
and exports like any other, and ``peft-mtl train --init-from`` fine-tunes it further.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..artifacts import atomic_folder, save_tensors_atomic
from . import lora_runtime
from .model_card import write_card
from .saved_sets import MANIFEST, AdapterError, read_manifest

__all__ = ["CompressionResult", "compress_set", "lora_scale"]


@dataclass
class CompressionResult:
    """What ``compress_set`` wrote: the folder, the adapters' new ranks and the share of each
    adapter's update (squared singular values) the kept directions hold, averaged over its layers."""

    out: Path
    ranks: dict[str, int]
    energy_kept: dict[str, float]
    trainable: int
    total: int


def lora_scale(config: dict) -> float:
    """The factor peft multiplies ``B A`` by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _low_rank(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B) with ``scale · B A`` the best rank-``rank`` fit of ``delta``, and the energy it keeps."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scale).sqrt()
    total = float((s ** 2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    a, b = root[:, None] * vh[:k], u[:, :k] * root
    if k < rank:  # a rank above the matrix's own: pad with zero directions so every layer has rank r
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a.contiguous(), b.contiguous(), kept


def _shared_adapters(manifest: dict) -> set[str]:
    """Adapters that more than one task is routed through."""
    users: dict[str, int] = {}
    for route in manifest.get("routing", {}).values():
        for adapter in route:
            users[adapter] = users.get(adapter, 0) + 1
    return {a for a, n in users.items() if n > 1}


def compress_set(src: str | Path, out: str | Path, rank: int, task_rank: int | None = None,
                 alpha_per_rank: float = 2.0, overwrite: bool = False) -> CompressionResult:
    """Write ``out``: the set in ``src`` with each adapter cut to its best rank-``rank`` fit.

    ``task_rank``: the rank of adapters only one task uses (default: ``rank``; shared adapters
    get ``rank``). The new adapters' alpha is ``alpha_per_rank`` × their rank (the training
    default's ratio, 32 / 16), so a fine-tune with ``--init-from`` continues at the usual step
    size. Heads, task specs and the rest of the manifest are copied; the dev metrics are not
    (they belong to the uncompressed set) — re-evaluate the new set (``peft-mtl compress`` does).

    Long on purpose: one atomic folder write, adapter by adapter; the steps share the temporary
    folder and the counts.
    """
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    if manifest.get("mode") != "lora" or not manifest.get("adapters"):
        raise AdapterError(f"{src}: a {manifest.get('mode')} set has no LoRA adapters to compress; "
                           f"pass a set trained with --mode lora.")
    if rank < 1 or (task_rank is not None and task_rank < 1):
        raise AdapterError(f"ranks must be at least 1 (got --rank {rank}, --task-rank {task_rank})")
    if out.resolve() == src.resolve():
        raise AdapterError(f"{out}: the compressed set cannot replace its source; choose another --out")
    shared = _shared_adapters(manifest)
    ranks = {name: rank if name in shared or task_rank is None else task_rank for name in manifest["adapters"]}
    energy: dict[str, float] = {}
    new_params = 0
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for name, rel in manifest["adapters"].items():
            folder = src / rel
            config_path = folder / "adapter_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
                raise AdapterError(f"{config_path}: DoRA or per-layer rank/alpha patterns cannot be compressed; "
                                   f"pass a set of plain LoRA adapters.")
            weights = load_file(str(folder / "adapter_model.safetensors"))
            scale = lora_scale(config)
            new_config = dict(config, r=ranks[name], lora_alpha=alpha_per_rank * ranks[name], use_rslora=False)
            new_scale = lora_scale(new_config)
            tensors, kept = {}, []
            factors = lora_runtime.saved_factors(weights) or {}
            for module in sorted(factors):
                ab = factors[module]
                if set(ab) != {"A", "B"}:
                    continue  # counted as foreign below
                delta = scale * (ab["B"].double() @ ab["A"].double())
                a, b, share = _low_rank(delta, ranks[name], new_scale)
                dtype = ab["A"].dtype
                tensors[lora_runtime.saved_factor_key(module, "A")] = a.to(dtype)
                tensors[lora_runtime.saved_factor_key(module, "B")] = b.to(dtype)
                kept.append(share)
            if len(tensors) != len(weights):
                raise AdapterError(f"{folder}: holds tensors other than LoRA factors; only plain LoRA adapters "
                                   f"can be compressed.")
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            save_tensors_atomic(tensors, tmp / rel / "adapter_model.safetensors")
            (tmp / rel / "adapter_config.json").write_text(json.dumps(new_config, indent=2), encoding="utf-8")
            energy[name] = sum(kept) / len(kept)
            new_params += sum(t.numel() for t in tensors.values())
        old_params = sum(t.numel() for rel in manifest["adapters"].values()
                         for t in load_file(str(src / rel / "adapter_model.safetensors")).values())
        for rel in manifest.get("heads", {}).values():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        trainable = manifest["parameters"]["trainable"] - old_params + new_params
        total = manifest["parameters"]["total"] - old_params + new_params
        new_manifest = dict(manifest)
        new_manifest["parameters"] = {"trainable": trainable, "total": total}
        config = dict(new_manifest.get("config") or {})
        if "lora" in config:
            config["lora"] = dict(config["lora"], rank=rank, alpha=alpha_per_rank * rank, use_rslora=False)
        new_manifest["config"] = config
        new_manifest["compressed_from"] = {"folder": str(src), "rank": rank, "task_rank": task_rank,
                                           "ranks": ranks, "energy_kept": {k: round(v, 4) for k, v in energy.items()},
                                           "metrics": manifest.get("metrics")}
        new_manifest["compressed_from"]["train_seconds"] = manifest.get("train_seconds")
        new_manifest["metrics"] = {}
        new_manifest["train_seconds"] = new_manifest["total_seconds"] = None  # not trained itself
        new_manifest["history"] = []
        new_manifest["bytes_on_disk"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / MANIFEST).write_text(json.dumps(new_manifest, indent=2), encoding="utf-8")
        write_card(tmp, new_manifest, out.name)
    return CompressionResult(out, ranks, energy, trainable, total)
