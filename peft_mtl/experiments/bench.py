"""``peft-mtl bench``: speed and memory of peft_mtl against the plain Hugging Face pipeline.

Everything is measured in one process, on the same data (SST train/dev, batch 32), as
medians over repeats; the ratios of one run are what count on a noisy machine. Writes
``reports/bench.json`` and ``reports/bench.md``.

The plain pipeline is what a user writes first: ``AutoModelForSequenceClassification``
([CLS] head) + PEFT LoRA r=8 on query/value, fp32, ``DataCollatorWithPadding`` over
randomly ordered examples (the Trainer's default), AdamW.
"""

from __future__ import annotations

import gc
import json
import os
import logging
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    DataCollatorWithPadding,
)

from ..artifacts import write_json_atomic
from ..data.loading import (
    BatchStream,
    EncodedSplit,
    collate,
    default_data_dir,
    encode_split,
    load_split,
    task_file,
)
from ..data.tasks import get_task
from ..device import (
    autocast,
    configure_threads,
    cpu_supports_bf16,
    enter,
    gpu_supports_bf16,
    grad_scaler,
    resolve_device,
    resolve_precision,
)
from ..device import name as device_name
from ..inference.adapter_host import load_base
from ..inference.ensemble import member_outputs
from ..inference.evaluate import raw_outputs
from ..inference.int8 import Int8Error
from ..model import lora_runtime
from ..model.adapters import add_adapters
from ..model.backbone import (
    backbone_identity,
    load_encoder,
    load_tokenizer,
    resolve_backbone,
    set_dropout,
)
from ..model.heads import make_head
from ..model.multitask import MultiTaskModel, build_model
from ..model.saved_sets import build_head, load_head_weights, read_manifest, save_run
from ..training.config import TrainConfig
from ..training.optimization import TrainingStep, build_optimizer, build_scheduler
from ..training.regularizers import Objective

_T0 = time.perf_counter()


logger = logging.getLogger(__name__)


def log(msg: str) -> None:
    logger.info(f"[{time.perf_counter() - _T0:6.0f} s] {msg}")


def _synchronize() -> None:
    """Wait for queued GPU work, so a timing covers it (a GPU runs asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU model, the flags that decide which kernels are fast, and a short name for its kind."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [f for f in CPU_FLAGS if f in flags]
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    isa = "amx" if "amx_bf16" in flags else "avx512-bf16" if native_bf16 else "avx512" if "avx512f" in flags else "avx2"
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]
    return {"model": model, "flags": present, "native_bf16": native_bf16, "kind": f"{slug}-{isa}"}


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10,
              where: torch.device = torch.device("cpu")) -> float:
    """GFLOP/s of the fastest of ``repeats`` n×n GEMMs on ``where``: a peak is the best the device
    does, and on a shared machine the median of a few GEMMs moved by ±30% between runs."""
    a, b = torch.randn(n, n, dtype=dtype, device=where), torch.randn(n, n, dtype=dtype, device=where)
    for _ in range(2):
        a @ b
    _synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def step_flops(step: Callable[[], None]) -> float:

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- peft_mtl side


def _our_training_step(cfg, splits, batch_size: int, steps: int, where: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    _, path = resolve_backbone(cfg.backbone)
    encoder = load_encoder(path, device=where)
    if cfg.backbone_dropout is not None:
        set_dropout(encoder, cfg.backbone_dropout)

    model = build_model(cfg, encoder, encoder.config.hidden_size).to(where)
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(optimizer, 10_000, 0.0)
    precision = resolve_precision(cfg.precision, where)
    objective = Objective(model, cfg, precision)
    training_step = TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm,
                                 scaler=grad_scaler(precision, where))
    streams = {t: BatchStream(splits[t], batch_size, seed, i, 0) for i, t in enumerate(cfg.task_names)}
    # The same `steps` batches in every timed repeat and in the FLOP count: batches differ in
    # length, so FLOPs of one batch over the time of others would misstate the rate.
    batches = [(t, streams[t].next()) for t in (cfg.task_names[i % len(cfg.task_names)] for i in range(steps))]
    counter = {"i": 0}

    def step():
        t, b = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        training_step({t: b})

    return model, step


def run(out_dir: Path, steps: int = 12, repeats: int = 5, ensemble_members: int = 5, quick: bool = False) -> dict:
    """Every measurement of ``peft-mtl bench``, against the plain pipeline on the same machine; the result dict.

    Long on purpose: the benchmark protocol read top to bottom (environment, peaks, training rows,
    inference rows), each step one call.
    """
    started = time.perf_counter()
    threads = configure_threads()
    where = resolve_device("auto")  # a GPU when there is one: both pipelines are timed on it
    enter(where)
    precision = resolve_precision("auto", where)
    name, path = resolve_backbone(None)
    tokenizer = load_tokenizer(path)
    data_dir = default_data_dir()
    sst = get_task("sst")
    train_split = load_split(task_file(data_dir, sst, "train"), sst)
    dev_split = load_split(task_file(data_dir, sst, "dev"), sst)
    train_enc = encode_split(train_split, tokenizer)
    dev_enc = encode_split(dev_split, tokenizer)
    batch = 32

    result: dict = {"machine": {"threads": threads, "precision": precision, "backbone": name,
                                "torch": torch.__version__, "device": device_name(where),
                                "native_bf16": cpu_supports_bf16(), "cpu": cpu_info()},
                    "batch_size": batch, "quick": quick, "steps": steps, "repeats": repeats}

    log("bench: GEMM peaks")
    # Emulated bf16 (CPUs without AVX512-BF16/AMX) runs at well under 1 GFLOP/s: timing it costs
    # minutes and means nothing, so the bf16 peak is measured only where bf16 is native.
    fp32_peak = gemm_peak(torch.float32, where=where)
    native_bf16 = gpu_supports_bf16(where) if where.type == "cuda" else cpu_supports_bf16()
    bf16_peak = gemm_peak(torch.bfloat16, where=where) if native_bf16 else None
    used_peak = bf16_peak if precision == "bf16" and bf16_peak else fp32_peak
    result["gemm_gflops"] = {"fp32": round(fp32_peak, 1), "bf16": round(bf16_peak, 1) if bf16_peak else None,
                             "bf16_over_fp32": round(bf16_peak / fp32_peak, 2) if bf16_peak else None,
                             "peak_of_precision_used": round(used_peak, 1), "method": "fastest of 10"}

    # -- training throughput --------------------------------------------------------------
    def train_rate(cfg, label: str) -> dict:
        log(f"bench: training {label}")
        gc.collect()
        model, step = _our_training_step(cfg, {t: train_enc for t in cfg.task_names}, batch, steps, where)
        seconds = median_time(lambda: [step() for _ in range(steps)], repeats, 1) / steps
        flops = step_flops(lambda: [step() for _ in range(steps)]) / steps
        del model
        return {"examples_per_second": round(batch / seconds, 1), "seconds_per_step": round(seconds, 4),
                "gflop_per_step": round(flops / 1e9, 2), "achieved_gflops": round(flops / seconds / 1e9, 1)}

    training = {}
    base_cfg = TrainConfig(tasks=["sst"])
    training["lora"] = train_rate(base_cfg, "LoRA (default recipe)")
    smart_cfg = TrainConfig(tasks=["sst"])
    smart_cfg.smart.weight = 1.0
    training["lora_smart"] = train_rate(smart_cfg, "LoRA + SMART")
    if not quick:
        smart_t0_cfg = TrainConfig(tasks=["sst"])
        smart_t0_cfg.smart.weight, smart_t0_cfg.smart.steps = 1.0, 0
        training["lora_smart_t0"] = train_rate(smart_t0_cfg, "LoRA + SMART without ascent (T=0)")
    shared_cfg = TrainConfig(tasks=["sst"], shared_adapter=True)
    training["shared_plus_task"] = train_rate(shared_cfg, "shared + task adapters")
    if not quick:
        training["full_finetune"] = train_rate(TrainConfig(tasks=["sst"], mode="full", lr=5e-5), "full fine-tune")
    result["training"] = training

    # -- plain Hugging Face pipeline -----------------------------------------------------
    log("bench: plain HF Trainer + PEFT pipeline")
    result["plain_hf"] = _plain_hf(path, tokenizer, train_split, dev_split, steps, repeats, where)

    # -- inference ------------------------------------------------------------------------
    result["inference"], result["adapters"] = _inference(out_dir, name, path, train_enc, dev_enc, ensemble_members,
                                                         repeats, quick, where)

    # -- bert-base-sized random model --------------------------------------------------------
    if not quick:
        result["bert_base_sized"] = _bert_base_sized(train_enc, repeats, where)

    lora, plain = training["lora"], result["plain_hf"]
    result["ratios"] = {
        "train_lora_vs_plain": round(lora["examples_per_second"] / plain["train_examples_per_second"], 2),
        "inference_vs_plain": round(result["inference"]["one_adapter"]["sentences_per_second"]
                                    / plain["inference_sentences_per_second"], 2),
        "smart_step_vs_lora_step": round(training["lora_smart"]["seconds_per_step"] / lora["seconds_per_step"], 2),
        "lora_step_gflops_vs_peak_of_precision_used": round(lora["achieved_gflops"] / used_peak, 3),
    }
    if "lora_smart_t0" in training:
        result["ratios"]["smart_t0_step_vs_lora_step"] = round(
            training["lora_smart_t0"]["seconds_per_step"] / lora["seconds_per_step"], 2)
    if "one_adapter_int8" in result["inference"]:
        result["ratios"]["inference_int8_vs_plain"] = round(
            result["inference"]["one_adapter_int8"]["sentences_per_second"] / plain["inference_sentences_per_second"], 2)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def _plain_hf(path: Path, tokenizer, train_split, dev_split, steps: int, repeats: int, where: torch.device) -> dict:

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=5)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"])).to(where)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    collator = DataCollatorWithPadding(tokenizer)
    texts = [e.texts[0] for e in train_split.examples]
    labels = [int(e.label) for e in train_split.examples]
    features = [dict(tokenizer(t, truncation=True, max_length=128), labels=y) for t, y in zip(texts, labels)]
    rng = np.random.default_rng(0)
    state = {"order": rng.permutation(len(features)), "pos": 0}

    def next_batch():
        if state["pos"] + 32 > len(features):
            state["order"], state["pos"] = rng.permutation(len(features)), 0
        idx = state["order"][state["pos"]:state["pos"] + 32]
        state["pos"] += 32
        return {k: v.to(where) for k, v in collator([features[i] for i in idx]).items()}

    batches = [next_batch() for _ in range(steps)]  # the same batches in every repeat and in the FLOP count
    counter = {"i": 0}

    def step():
        b = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    seconds = median_time(lambda: [step() for _ in range(steps)], repeats, 1) / steps
    flops = step_flops(lambda: [step() for _ in range(steps)]) / steps
    model.eval()
    dev_features = [dict(tokenizer(e.texts[0], truncation=True, max_length=128)) for e in dev_split.examples]

    def infer():
        with torch.no_grad():
            for i in range(0, len(dev_features), 8):  # the Trainer's default eval batch size
                model(**{k: v.to(where) for k, v in collator(dev_features[i:i + 8]).items()})

    infer_seconds = median_time(infer, max(1, repeats // 2), 1)
    return {"train_examples_per_second": round(32 / seconds, 1), "seconds_per_step": round(seconds, 4),
            "achieved_gflops": round(flops / seconds / 1e9, 1),
            "inference_sentences_per_second": round(len(dev_features) / infer_seconds, 1),
            "pipeline": "AutoModelForSequenceClassification + PEFT LoRA r=8 query,value, fp32, dynamic padding, "
                        "random order, eval batch 8"}


def _inference(out_dir: Path, name: str, path: Path, train_enc, dev_enc, members: int, repeats: int, quick: bool,
               where: torch.device):
    """Long on purpose: every inference measurement shares the loaded sets and timing set-up; split,
    each part would rebuild them.
    """
    log("bench: inference, swap, load, memory")
    tmp = Path(tempfile.mkdtemp(prefix="peft_mtl_bench_"))
    folders = []
    for m in range(members):  # random-but-nonzero adapter sets, saved exactly as training saves them
        torch.manual_seed(100 + m)
        cfg = TrainConfig(tasks=["sst"])
        model = build_model(cfg, load_encoder(path), 384)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if lora_runtime.is_lora_b(n):
                    p.normal_(0, 0.01)

        manifest = {"mode": "lora", "tasks": ["sst"], "backbone": backbone_identity(name, model.encoder).to_dict(),
                    "backbone_source": None, "pair_encoding": "cross", "max_length": 128, "config": cfg.to_dict(),
                    "metrics": {}, "parameters": {"trainable": 0, "total": 0}}
        folders.append(save_run(model, tmp / f"set{m}", manifest))
        del model
    gc.collect()
    rss_before_base = rss_mb()
    base = load_base(device=str(where))
    rss_base = rss_mb()
    load_times = []
    for m, folder in enumerate(folders):
        t = time.perf_counter()
        base.load(folder, name=f"s{m}")
        load_times.append(time.perf_counter() - t)
        if m == 0:
            rss_one = rss_mb()
    rss_all = rss_mb()
    names = [f"s{m}" for m in range(members)]

    def one():
        base.outputs("sst", dev_enc, "s0", batch_size=128)

    one_s = median_time(one, repeats, 1)
    # Whole dev split (batch 128 inputs per pass either way) and single online requests.
    seq_s = bat_s = None
    if not quick:  # whole-split ensembles: minutes on a small CPU
        # One timed pass each (5 × 1,101 sentences: a minute or more on 2 cores).
        seq_s = median_time(lambda: member_outputs(base, "sst", dev_enc, names, batched=False), 1, 0)
        bat_s = median_time(lambda: member_outputs(base, "sst", dev_enc, names, batched=True), 1, 0)
    latency = {}
    for n_inputs in (1, 4):
        request = EncodedSplit(dev_enc.task, [seg[:n_inputs] for seg in dev_enc.segments], dev_enc.labels[:n_inputs], 0)
        latency[n_inputs] = {
            mode: median_time(lambda b=b: member_outputs(base, "sst", request, names, batched=b), 20, 2) * 1e3
            for mode, b in (("sequential", False), ("batched", True))}

    swaps = []
    for i in range(200):
        t = time.perf_counter()
        base.activate(names[i % members], "sst")
        swaps.append(time.perf_counter() - t)

    # Merged adapter: the LoRA delta folded into the weights of a separate copy.
    merged_s = None
    if not quick:
        merged = _merged_copy(path, folders[0]).to(where)
        merged_s = median_time(lambda: _run_plain(merged, dev_enc), repeats, 1)
    # --int8: the set as an int8 ONNX Runtime graph (built once, before timing), CPU only.
    int8_s = None

    if where.type == "cpu":
        try:
            os.environ.setdefault("PEFT_MTL_CACHE", str(tmp / "cache"))
            int8_base = load_base(int8=True)
            int8_base.load(folders[0], name="s0")
            int8_s = median_time(lambda: int8_base.outputs("sst", dev_enc, "s0", batch_size=128), repeats, 1)
        except (ImportError, Int8Error) as err:  # the export extra is optional: measure the rest, say what was skipped
            log(f"bench: no int8 row ({err}); pip install 'peft_mtl[export]' to measure it")

    # A full fine-tuned model on disk: what swapping costs without adapters.
    full_dir = tmp / "full"
    load_encoder(path).save_pretrained(full_dir)
    full_load = median_time(lambda: load_encoder(full_dir), 3, 1)
    n = len(dev_enc)
    inference = {"one_adapter": {"sentences_per_second": round(n / one_s, 1)}}
    if seq_s is not None:
        inference[f"ensemble_{members}_sequential"] = {"sentences_per_second": round(n / seq_s, 1)}
        inference[f"ensemble_{members}_batched"] = {"sentences_per_second": round(n / bat_s, 1),
                                                    "speedup_vs_sequential": round(seq_s / bat_s, 2)}
    if merged_s is not None:
        inference["merged_adapter"] = {"sentences_per_second": round(n / merged_s, 1)}
    if int8_s is not None:
        inference["one_adapter_int8"] = {"sentences_per_second": round(n / int8_s, 1)}
    for n_inputs, ms in latency.items():
        inference[f"ensemble_{members}_request_of_{n_inputs}_ms"] = {
            "sequential_ms": round(ms["sequential"], 2), "batched_ms": round(ms["batched"], 2),
            "speedup_vs_sequential": round(ms["sequential"] / ms["batched"], 2)}
    param_mb = sum(p.numel() * p.element_size() for p in base.model.encoder.parameters()) / 2 ** 20
    adapters = {
        "swap_ms_median": round(statistics.median(swaps) * 1e3, 4),
        "swap_ms_p99": round(float(np.percentile(swaps, 99)) * 1e3, 4),
        "load_adapter_folder_ms_median": round(statistics.median(load_times) * 1e3, 1),
        "load_full_model_ms_median": round(full_load * 1e3, 1),
        "rss_mb_process_before_backbone": round(rss_before_base, 1),
        "rss_mb_backbone_loaded": round(rss_base, 1),
        "rss_mb_one_set": round(rss_one, 1),
        f"rss_mb_{members}_sets": round(rss_all, 1),
        "extra_mb_per_loaded_set": round((rss_all - rss_one) / max(1, members - 1), 2),
        f"ensemble_{members}_ram_vs_one_model": round(rss_all / rss_one, 3),
        "model_weights_mb_with_all_adapters": round(param_mb, 1),
        "k_full_copies_ram_estimate_mb": round(rss_one + (members - 1) * (rss_base - rss_before_base), 1),
    }
    return inference, adapters


def _merged_copy(path: Path, folder: Path):
    encoder = PeftModel.from_pretrained(load_encoder(path), str(folder)).merge_and_unload()

    manifest = read_manifest(folder)
    head = build_head(manifest["head_specs"]["sst"], 384)
    head.load_state_dict(load_head_weights(folder, manifest["heads"]["sst"]))
    model = MultiTaskModel(encoder, {"sst": head}, manifest["pooling"])
    model.eval()
    return model


def _run_plain(model, enc) -> None:
    raw_outputs(model, enc, 128, resolve_precision("auto", model.device), False)


def _bert_base_sized(train_enc, repeats: int, where: torch.device) -> dict:

    log("bench: bert-base-sized random model")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        attn_implementation="eager")
    encoder = BertModel(config)
    for p in encoder.parameters():
        p.requires_grad_(False)
    cfg = TrainConfig(tasks=["sst"])
    peft_model = add_adapters(encoder, ["sst"], cfg.lora)
    model = MultiTaskModel(peft_model, {"sst": make_head(get_task("sst"), 768)}, "mean", {"sst": ["sst"]}).to(where)
    precision = resolve_precision("auto", where)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = collate(train_enc, np.arange(32))

    def step():
        model.train()
        with autocast(precision, where):
            loss = torch.nn.functional.cross_entropy(model("sst", batch.inputs), batch.labels.to(where))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def infer():
        model.eval()
        with torch.inference_mode(), autocast(precision, where):
            model("sst", batch.inputs)

    train_s = median_time(step, repeats, 1)
    infer_s = median_time(infer, repeats, 1)
    return {"config": "12 layers, 768 wide, random init, LoRA r=16 on all linear layers",
            "tokens_per_example": round(float(train_enc.lengths[:32].mean()), 1),
            "padded_tokens_per_example": int(batch.inputs[0]["attention_mask"].shape[1]),
            "train_step_seconds_batch32": round(train_s, 3), "train_examples_per_second": round(32 / train_s, 1),
            "inference_sentences_per_second": round(32 / infer_s, 1)}


# Targets per CPU kind: issue 6 set them on a CPU with native bf16, issue 15 on an AVX2-only one.
TARGETS = {
    True: {"train_lora_vs_plain": ("≥", 4.0), "inference_vs_plain": ("≥", 5.0), "smart_step_vs_lora_step": ("≤", 2.0),
           "smart_t0_step_vs_lora_step": ("≤", 2.0), "lora_step_gflops_vs_peak_of_precision_used": ("≥", 0.40)},
    False: {"train_lora_vs_plain": ("≥", 2.5), "inference_vs_plain": ("≥", 4.0), "inference_int8_vs_plain": ("≥", 4.0),
            "smart_step_vs_lora_step": ("≤", 2.5), "lora_step_gflops_vs_peak_of_precision_used": ("≥", 0.50)},
}
RATIO_NAMES = {
    "train_lora_vs_plain": "LoRA training examples/s vs plain pipeline",
    "inference_vs_plain": "inference sentences/s vs plain pipeline (PyTorch path)",
    "inference_int8_vs_plain": "inference sentences/s vs plain pipeline (`--int8`)",
    "smart_step_vs_lora_step": "SMART step time / LoRA step time (T=1 ascent step, the seeds' setting)",
    "smart_t0_step_vs_lora_step": "SMART step time / LoRA step time (T=0, random perturbation only)",
    "lora_step_gflops_vs_peak_of_precision_used": "LoRA training step GFLOP/s / GEMM peak of the precision used",
}


def cpu_label(result: dict) -> str:
    cpu = result["machine"].get("cpu")
    if cpu is None:  # runs from before the CPU was recorded
        return "a CPU with native bf16 (model and flags not recorded)" if result["machine"].get("native_bf16") \
            or result["machine"].get("precision") == "bf16" else "a CPU (model not recorded)"
    return (f"{cpu['model']} ({'native bf16' if cpu['native_bf16'] else 'no native bf16'}; flags: "
            f"{', '.join(cpu['flags']) or 'none recorded'})")


def _met(value: float, target: tuple[str, float]) -> str:
    op, bound = target
    return "met" if (value >= bound if op == "≥" else value <= bound) else "missed"


def markdown_section(result: dict) -> str:
    """One CPU kind's tables."""
    r, t, inf, ad = result["ratios"], result["training"], result["inference"], result["adapters"]
    plain, machine = result["plain_hf"], result["machine"]
    native = bool(machine.get("native_bf16") or machine.get("precision") == "bf16")
    targets = TARGETS[native]
    lines = [f"## {cpu_label(result)}", "",
             f"Command: `{result.get('command', 'peft-mtl bench')}` — one run, one process, {machine['threads']} threads, "
             f"torch {machine['torch']}, backbone {machine['backbone']}, precision {machine['precision']}, SST, batch 32, "
             f"medians of {result.get('repeats', 5)} repeats of {result.get('steps', 12)} steps"
             + (f", {result['wall_seconds'] / 60:.1f} min of wall time" if "wall_seconds" in result else "")
             + (" (`--quick`)" if result.get("quick") else "") + ".", "",
             f"Targets: {'issue 6 (CPU with native bf16)' if native else 'issue 15 (CPU without native bf16)'}.", "",
             "| measure | value | target | status |", "|---|---:|---:|---|"]
    for key, label in RATIO_NAMES.items():
        if key not in r:
            continue
        value = r[key]
        shown = f"{100 * value:.1f}%" if key.startswith("lora_step") else f"{value}×"
        target = targets.get(key)
        target_text = (f"{target[0]} {100 * target[1]:.0f}%" if key.startswith("lora_step") else
                       f"{target[0]} {target[1]}×") if target else "—"
        lines.append(f"| {label} | {shown} | {target_text} | {_met(value, target) if target else ''} |")
    lines += ["", "| training pipeline | examples/s | s/step | GFLOP/step | achieved GFLOP/s |",
              "|---|---:|---:|---:|---:|",
              f"| plain HF + PEFT LoRA (fp32) | {plain['train_examples_per_second']} | {plain['seconds_per_step']} | — | "
              f"{plain['achieved_gflops']} |"]
    for k, v in t.items():
        lines.append(f"| peft_mtl {k} | {v['examples_per_second']} | {v['seconds_per_step']} | {v['gflop_per_step']} | "
                     f"{v['achieved_gflops']} |")
    g = result["gemm_gflops"]
    bf16_text = (f"bf16 {g['bf16']} GFLOP/s ({g['bf16_over_fp32']}× fp32)" if g.get("bf16")
                 else "bf16 not measured (not native on this CPU)")
    lines += ["", f"GEMM peak (2048², {g.get('method', 'median of 5')}): fp32 {g['fp32']} GFLOP/s, {bf16_text}.", "",
              "| inference (SST dev, 1,101 sentences) | sentences/s |", "|---|---:|",
              f"| plain HF + PEFT (fp32, eval batch 8) | {plain['inference_sentences_per_second']} |"]
    for k, v in inf.items():
        extra = f" ({v['speedup_vs_sequential']}× sequential)" if "speedup_vs_sequential" in v else ""
        if "sentences_per_second" in v:
            lines.append(f"| peft_mtl {k} | {v['sentences_per_second']}{extra} |")
    requests = {k: v for k, v in inf.items() if "batched_ms" in v}
    if requests:
        lines += ["", "| ensemble request (median of 20) | k sequential passes | one batched pass | speedup |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['sequential_ms']} ms | {v['batched_ms']} ms | {v['speedup_vs_sequential']}× |"
                  for k, v in requests.items()]
    lines += ["", "| adapters: swap, load, memory | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in ad.items()]
    if "bert_base_sized" in result:
        b = result["bert_base_sized"]
        lines += ["", f"At bert-base size (random weights, for extrapolation): {b['config']}, batch 32 of "
                      f"~{b['tokens_per_example']} tokens (padded to {b.get('padded_tokens_per_example', '?')}): "
                  f"training step {b['train_step_seconds_batch32']} s "
                      f"({b['train_examples_per_second']} examples/s), inference "
                      f"{b['inference_sentences_per_second']} sentences/s."]
    lines += ["", f"Peak RSS of the benchmark process: {result['peak_rss_mb']} MB.", ""]
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    lines = ["# Benchmark: peft_mtl vs the plain Hugging Face pipeline", "",
             "`peft-mtl bench` measures peft_mtl and the plain pipeline (AutoModelForSequenceClassification + PEFT "
             "LoRA r=8 on query/value, fp32, dynamic padding, random order, AdamW) in one process on the same data; the "
             "ratios of one run are what count on a noisy machine. One section per CPU kind it has been run on "
             "(newest first); raw numbers in [bench/](bench/) (one JSON per CPU kind) and [bench.json](bench.json) "
             "(the latest run).", ""]
    for result in results:
        lines.append(markdown_section(result))
    return "\n".join(lines)


def write(result: dict, out_dir: Path, command: str) -> None:
    """Write ``bench.json`` (this run), ``bench/<cpu kind>.json`` and ``bench.md`` (every kind on record)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(result, command=command)
    result.setdefault("date", time.strftime("%Y-%m-%d"))
    write_json_atomic(out_dir / "bench.json", result)
    kind = result["machine"].get("cpu", {}).get("kind") or result["machine"].get("device", "unknown")
    if str(result["machine"].get("device", "")).lower().startswith("nvidia"):
        kind = "cuda-" + str(result["machine"]["device"]).lower().replace(" ", "-")
    (out_dir / "bench").mkdir(exist_ok=True)
    write_json_atomic(out_dir / "bench" / f"{kind}.json", result)
    runs = [json.loads(p.read_text()) for p in sorted((out_dir / "bench").glob("*.json"))]
    runs.sort(key=lambda r: r.get("date", ""), reverse=True)
    tmp = out_dir / ".bench.md.tmp"
    tmp.write_text(markdown(runs), encoding="utf-8")
    tmp.replace(out_dir / "bench.md")
