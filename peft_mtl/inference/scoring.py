"""Scoring saved sets on labelled splits: what ``peft-mtl eval`` prints and ``compress`` records."""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.loading import EncodedSplit, default_data_dir, encode_split, load_split, task_file
from ..data.metrics import overall_score
from .adapter_host import AdapterHost, load_adapters
from .evaluate import predictions_from_outputs, score

logger = logging.getLogger(__name__)


def load_eval_splits(host: AdapterHost, set_name: str, tasks: list[str], data_dir: str | Path | None = None,
                     split: str = "dev", strict: bool = False) -> dict[str, EncodedSplit]:
    """Encoded labelled splits, tokenised the way ``set_name`` was trained (length, pair encoding)."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    aset = host.get(set_name)
    encoded = {}
    for t in tasks:
        spec = host.spec(t, set_name)  # as saved with the set: file tasks load without their task file
        loaded = load_split(task_file(folder, spec, split), spec, strict=strict)
        if loaded.skip_report():
            logger.info(loaded.skip_report())
        encoded[t] = encode_split(loaded, host.tokenizer, aset.max_length, aset.pair_encoding)
    return encoded


def evaluate_folder(folder: str | Path, data_dir: str | Path | None = None, split: str = "dev", strict: bool = False,
                    backbone: str | None = None, precision: str = "auto", device: str = "auto", int8: bool = False,
                    progress: bool = False) -> dict:
    """Every task of the set in ``folder`` scored on ``split``, plus the overall score."""
    host = load_adapters(folder, backbone=backbone, precision=precision, device=device, int8=int8)
    name = host.active
    splits = load_eval_splits(host, name, host.get(name).tasks, data_dir, split, strict)
    result: dict = {}
    for t, enc in splits.items():
        outputs = host.outputs(t, enc, name, progress=progress)
        result[t] = score(enc, predictions_from_outputs(enc.task, outputs))
    overall = overall_score(result, {t: host.spec(t, name).primary_metric for t in result})
    if overall is not None:
        result["overall"] = overall
    return result
