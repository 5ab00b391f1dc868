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
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .artifacts import write_json_atomic


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
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


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, repeats, 2) / 1e9


def step_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- peft_mtl side


def _our_training_step(cfg, splits, batch_size: int, seed: int = 0):
    from .backbone import load_encoder, resolve_backbone
    from .data import BatchStream
    from .model import build_model
    from .optimization import TrainingStep, build_optimizer, build_scheduler
    from .regularizers import Objective
    from .runtime import resolve_precision

    torch.manual_seed(seed)
    _, path = resolve_backbone(cfg.backbone)
    encoder = load_encoder(path)
    if cfg.backbone_dropout is not None:
        from .backbone import set_dropout

        set_dropout(encoder, cfg.backbone_dropout)
    from .device import current

    model = build_model(cfg, encoder, encoder.config.hidden_size).to(current())
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(optimizer, 10_000, 0.0)
    objective = Objective(model, cfg, resolve_precision(cfg.precision))
    training_step = TrainingStep(model, objective, optimizer, scheduler, cfg.max_grad_norm)
    streams = {t: BatchStream(splits[t], batch_size, seed, i, 0) for i, t in enumerate(cfg.task_names)}
    task_cycle = list(cfg.task_names)
    counter = {"i": 0}

    def step():
        t = task_cycle[counter["i"] % len(task_cycle)]
        counter["i"] += 1
        training_step({t: streams[t].next()})

    return model, step


def run(out_dir: Path, steps: int = 12, repeats: int = 5, ensemble_members: int = 5, quick: bool = False) -> dict:
    from .backbone import load_tokenizer, resolve_backbone
    from .config import TrainConfig
    from .data import default_data_dir, encode_split, load_split, task_file
    from .runtime import configure_threads, resolve_precision
    from .tasks import get_task

    from .device import resolve_device, use_device

    threads = configure_threads()
    use_device(resolve_device("auto"))  # a GPU when there is one: both pipelines are timed on it
    precision = resolve_precision("auto")
    name, path = resolve_backbone(None)
    tokenizer = load_tokenizer(path)
    data_dir = default_data_dir()
    sst = get_task("sst")
    train_split = load_split(task_file(data_dir, sst, "train"), sst)
    dev_split = load_split(task_file(data_dir, sst, "dev"), sst)
    train_enc = encode_split(train_split, tokenizer)
    dev_enc = encode_split(dev_split, tokenizer)
    batch = 32
    from .device import cpu_supports_bf16, name as device_name

    result: dict = {"machine": {"threads": threads, "precision": precision, "backbone": name,
                                "torch": torch.__version__, "device": device_name(),
                                "native_bf16": cpu_supports_bf16()}, "batch_size": batch}

    log("bench: GEMM peaks")
    # Emulated bf16 (CPUs without AVX512-BF16/AMX) runs at well under 1 GFLOP/s: timing it costs
    # minutes and means nothing, so the bf16 peak is measured only where bf16 is native.
    fp32_peak = gemm_peak(torch.float32)
    bf16_peak = gemm_peak(torch.bfloat16) if cpu_supports_bf16() else None
    used_peak = bf16_peak if precision == "bf16" and bf16_peak else fp32_peak
    result["gemm_gflops"] = {"fp32": round(fp32_peak, 1), "bf16": round(bf16_peak, 1) if bf16_peak else None,
                             "bf16_over_fp32": round(bf16_peak / fp32_peak, 2) if bf16_peak else None,
                             "peak_of_precision_used": round(used_peak, 1)}

    # -- training throughput --------------------------------------------------------------
    def train_rate(cfg, label: str) -> dict:
        log(f"bench: training {label}")
        gc.collect()
        model, step = _our_training_step(cfg, {t: train_enc for t in cfg.task_names}, batch)
        seconds = median_time(lambda: [step() for _ in range(steps)], repeats, 1) / steps
        flops = step_flops(step)
        del model
        return {"examples_per_second": round(batch / seconds, 1), "seconds_per_step": round(seconds, 4),
                "gflop_per_step": round(flops / 1e9, 2), "achieved_gflops": round(flops / seconds / 1e9, 1)}

    training = {}
    base_cfg = TrainConfig(tasks=["sst"])
    training["lora"] = train_rate(base_cfg, "LoRA (default recipe)")
    smart_cfg = TrainConfig(tasks=["sst"])
    smart_cfg.smart.weight = 1.0
    training["lora_smart"] = train_rate(smart_cfg, "LoRA + SMART")
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
    result["plain_hf"] = _plain_hf(path, tokenizer, train_split, dev_split, steps, repeats)

    # -- inference ------------------------------------------------------------------------
    result["inference"], result["adapters"] = _inference(out_dir, name, path, train_enc, dev_enc, ensemble_members,
                                                         repeats, quick)

    # -- bert-base-sized random model --------------------------------------------------------
    if not quick:
        result["bert_base_sized"] = _bert_base_sized(train_enc, repeats)

    lora, plain = training["lora"], result["plain_hf"]
    result["ratios"] = {
        "train_lora_vs_plain": round(lora["examples_per_second"] / plain["train_examples_per_second"], 2),
        "inference_vs_plain": round(result["inference"]["one_adapter"]["sentences_per_second"]
                                    / plain["inference_sentences_per_second"], 2),
        "smart_step_vs_lora_step": round(training["lora_smart"]["seconds_per_step"] / lora["seconds_per_step"], 2),
        "smart_t0_step_vs_lora_step": round(training["lora_smart_t0"]["seconds_per_step"] / lora["seconds_per_step"],
                                            2),
        "lora_step_gflops_vs_peak_of_precision_used": round(lora["achieved_gflops"] / used_peak, 3),
    }
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def _plain_hf(path: Path, tokenizer, train_split, dev_split, steps: int, repeats: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=5)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
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
        return collator([features[i] for i in idx])

    def step():
        b = next_batch()
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    seconds = median_time(lambda: [step() for _ in range(steps)], repeats, 1) / steps
    flops = step_flops(step)
    model.eval()
    dev_features = [dict(tokenizer(e.texts[0], truncation=True, max_length=128)) for e in dev_split.examples]

    def infer():
        with torch.no_grad():
            for i in range(0, len(dev_features), 8):  # the Trainer's default eval batch size
                model(**collator(dev_features[i:i + 8]))

    infer_seconds = median_time(infer, max(1, repeats // 2), 1)
    return {"train_examples_per_second": round(32 / seconds, 1), "seconds_per_step": round(seconds, 4),
            "achieved_gflops": round(flops / seconds / 1e9, 1),
            "inference_sentences_per_second": round(len(dev_features) / infer_seconds, 1),
            "pipeline": "AutoModelForSequenceClassification + PEFT LoRA r=8 query,value, fp32, dynamic padding, "
                        "random order, eval batch 8"}


def _inference(out_dir: Path, name: str, path: Path, train_enc, dev_enc, members: int, repeats: int, quick: bool):
    from .backbone import load_encoder
    from .config import TrainConfig
    from .data import EncodedSplit
    from .ensemble import member_outputs
    from .inference import load_base
    from .runs import save_run
    from .model import build_model

    log("bench: inference, swap, load, memory")
    tmp = Path(tempfile.mkdtemp(prefix="peft_mtl_bench_"))
    folders = []
    for m in range(members):  # random-but-nonzero adapter sets, saved exactly as training saves them
        torch.manual_seed(100 + m)
        cfg = TrainConfig(tasks=["sst"])
        model = build_model(cfg, load_encoder(path), 384)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        from .backbone import backbone_identity

        manifest = {"mode": "lora", "tasks": ["sst"], "backbone": backbone_identity(name, model.encoder).to_dict(),
                    "backbone_source": None, "pair_encoding": "cross", "max_length": 128, "config": cfg.to_dict(),
                    "metrics": {}, "parameters": {"trainable": 0, "total": 0}}
        folders.append(save_run(model, tmp / f"set{m}", manifest))
        del model
    gc.collect()
    rss_before_base = rss_mb()
    base = load_base()
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
    seq_s = median_time(lambda: member_outputs(base, "sst", dev_enc, names, batched=False), max(1, repeats // 2), 1)
    bat_s = median_time(lambda: member_outputs(base, "sst", dev_enc, names, batched=True), max(1, repeats // 2), 1)
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
    merged = _merged_copy(path, folders[0])
    merged_s = median_time(lambda: _run_plain(merged, dev_enc), repeats, 1)

    # A full fine-tuned model on disk: what swapping costs without adapters.
    full_dir = tmp / "full"
    load_encoder(path).save_pretrained(full_dir)
    full_load = median_time(lambda: load_encoder(full_dir), 3, 1)
    n = len(dev_enc)
    inference = {
        "one_adapter": {"sentences_per_second": round(n / one_s, 1)},
        "merged_adapter": {"sentences_per_second": round(n / merged_s, 1)},
        f"ensemble_{members}_sequential": {"sentences_per_second": round(n / seq_s, 1)},
        f"ensemble_{members}_batched": {"sentences_per_second": round(n / bat_s, 1),
                                        "speedup_vs_sequential": round(seq_s / bat_s, 2)},
    }
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
        f"k_full_copies_ram_estimate_mb": round(rss_one + (members - 1) * (rss_base - rss_before_base), 1),
    }
    return inference, adapters


def _merged_copy(path: Path, folder: Path):
    from peft import PeftModel

    from .backbone import load_encoder

    encoder = PeftModel.from_pretrained(load_encoder(path), str(folder)).merge_and_unload()
    from .model import MultiTaskModel
    from .runs import build_head, load_head_weights, read_manifest

    manifest = read_manifest(folder)
    head = build_head(manifest["head_specs"]["sst"], 384)
    head.load_state_dict(load_head_weights(folder, manifest["heads"]["sst"]))
    model = MultiTaskModel(encoder, {"sst": head}, manifest["pooling"])
    model.eval()
    return model


def _run_plain(model, enc) -> None:
    from .evaluate import raw_outputs
    from .runtime import resolve_precision

    raw_outputs(model, enc, 128, resolve_precision("auto"), False)


def _bert_base_sized(train_enc, repeats: int) -> dict:
    from transformers import BertConfig, BertModel

    from .config import TrainConfig
    from .heads import make_head
    from .model import MultiTaskModel
    from .adapters import add_adapters
    from .tasks import get_task
    from .data import collate
    from .runtime import autocast, resolve_precision

    log("bench: bert-base-sized random model")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        attn_implementation="eager")
    encoder = BertModel(config)
    for p in encoder.parameters():
        p.requires_grad_(False)
    cfg = TrainConfig(tasks=["sst"])
    peft_model = add_adapters(encoder, ["sst"], cfg.lora)
    model = MultiTaskModel(peft_model, {"sst": make_head(get_task("sst"), 768)}, "mean", {"sst": ["sst"]})
    precision = resolve_precision("auto")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = collate(train_enc, np.arange(32))

    def step():
        model.train()
        with autocast(precision):
            loss = torch.nn.functional.cross_entropy(model("sst", batch.inputs), batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def infer():
        model.eval()
        with torch.inference_mode(), autocast(precision):
            model("sst", batch.inputs)

    train_s = median_time(step, repeats, 1)
    infer_s = median_time(infer, repeats, 1)
    return {"config": "12 layers, 768 wide, random init, LoRA r=16 on all linear layers",
            "tokens_per_example": round(float(train_enc.lengths[:32].mean()), 1),
            "train_step_seconds_batch32": round(train_s, 3), "train_examples_per_second": round(32 / train_s, 1),
            "inference_sentences_per_second": round(32 / infer_s, 1)}


def markdown(result: dict, command: str) -> str:
    r, t, inf, ad = result["ratios"], result["training"], result["inference"], result["adapters"]
    plain = result["plain_hf"]
    lines = [
        "# Benchmark: peft_mtl vs the plain Hugging Face pipeline", "",
        f"Device: {result['machine'].get('device', 'unknown')}.", "",
        f"Command: `{command}` — one run, one process, {result['machine']['threads']} threads, "
        f"torch {result['machine']['torch']}, backbone {result['machine']['backbone']}, SST, batch 32, "
        "medians of repeats. Raw numbers: [bench.json](bench.json).", "",
        "## Ratios (the numbers that count)", "",
        "| measure | value | target |", "|---|---:|---:|",
        f"| LoRA training examples/s vs plain pipeline | {r['train_lora_vs_plain']}× | ≥ 4× |",
        f"| inference sentences/s vs plain pipeline | {r['inference_vs_plain']}× | ≥ 5× |",
        f"| SMART step time / plain LoRA step time (T=1 ascent step, the seeds' setting) | "
        f"{r['smart_step_vs_lora_step']}× | ≤ 2× |",
        f"| SMART step time / plain LoRA step time (T=0, random perturbation only) | "
        f"{r.get('smart_t0_step_vs_lora_step', '—')}× | ≤ 2× |",
        f"| LoRA training step GFLOP/s / GEMM peak of the precision used ({result['machine']['precision']}) | "
        f"{100 * r['lora_step_gflops_vs_peak_of_precision_used']:.1f}% | ≥ 40% |",
        "", "## Training", "", "| pipeline | examples/s | s/step | GFLOP/step | achieved GFLOP/s |", "|---|---:|---:|---:|---:|",
        f"| plain HF + PEFT LoRA (fp32) | {plain['train_examples_per_second']} | {plain['seconds_per_step']} | — | "
        f"{plain['achieved_gflops']} |"]
    for k, v in t.items():
        lines.append(f"| peft_mtl {k} | {v['examples_per_second']} | {v['seconds_per_step']} | {v['gflop_per_step']} | "
                     f"{v['achieved_gflops']} |")
    g = result["gemm_gflops"]
    bf16_text = (f"bf16 {g['bf16']} GFLOP/s ({g['bf16_over_fp32']}× fp32)" if g.get("bf16")
                 else "bf16 not measured (not native on this CPU)")
    lines += ["", f"GEMM peak (2048², median): fp32 {g['fp32']} GFLOP/s, {bf16_text}.", "",
              "## Inference (SST dev, 1,101 sentences)", "",
              "| pipeline | sentences/s |", "|---|---:|",
              f"| plain HF + PEFT (fp32, eval batch 8) | {plain['inference_sentences_per_second']} |"]
    for k, v in inf.items():
        extra = f" ({v['speedup_vs_sequential']}× sequential)" if "speedup_vs_sequential" in v else ""
        if "sentences_per_second" in v:
            lines.append(f"| peft_mtl {k} | {v['sentences_per_second']}{extra} |")
    requests = {k: v for k, v in inf.items() if "batched_ms" in v}
    if requests:
        lines += ["", "Ensemble latency of one online request (median of 20):", "",
                  "| request | k sequential passes | one batched pass | speedup |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['sequential_ms']} ms | {v['batched_ms']} ms | {v['speedup_vs_sequential']}× |"
                  for k, v in requests.items()]
    lines += ["", "## Adapters: swap, load, memory", "", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in ad.items()]
    if "bert_base_sized" in result:
        b = result["bert_base_sized"]
        lines += ["", "## At bert-base size (random weights, for extrapolation)", "",
                  f"{b['config']}, batch 32 of ~{b['tokens_per_example']} tokens: training step "
                  f"{b['train_step_seconds_batch32']} s ({b['train_examples_per_second']} examples/s), inference "
                  f"{b['inference_sentences_per_second']} sentences/s."]
    lines += ["", f"Peak RSS of the benchmark process: {result['peak_rss_mb']} MB.", ""]
    return "\n".join(lines)


def write(result: dict, out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(result, command=command)
    write_json_atomic(out_dir / "bench.json", result)
    text = markdown(result, command)
    tmp = out_dir / ".bench.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out_dir / "bench.md")
