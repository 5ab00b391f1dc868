"""A Hugging Face model card (``README.md``) beside every saved set, made from its manifest.

The front matter is ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` (``library_name:
peft``, ``base_model``, ``tags``, ``pipeline_tag``, a ``model-index`` with each task's dev
metrics); the body says what the set does (tasks and labels), what it costs (trainable
parameters and their share), how it was trained (command, budget, hardware), how well it does
(dev, and test when evaluated), how to load it three ways, and its limits. ``save_run`` and
``compress`` write it; ``peft-mtl card SET`` regenerates it from the manifest alone.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..artifacts import write_text_atomic

CARD = "README.md"
# Backbones known by a Hub id (a local path's name is kept as it is).
HUB_IDS = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
KNOWN_DATA = {"sst": "SST-5 (Stanford Sentiment Treebank, movie-review sentences, 5 sentiment classes)",
              "qqp": "Quora Question Pairs (duplicate or not)", "sts": "STS-B (sentence pairs scored 0-5 for similarity)"}
MODES = {"lora": "LoRA adapters on a frozen backbone", "heads": "task heads on a frozen backbone (no adapters)",
         "full": "a fully fine-tuned encoder"}


def _base_model(manifest: dict) -> str:
    name = (manifest.get("backbone") or {}).get("name") or manifest.get("backbone_source") or "unknown"
    return HUB_IDS.get(name, name)


def _command(manifest: dict) -> str | None:
    """How the set was made: ``command`` (recorded by ``train``) or the compression's."""
    return manifest.get("command") or (manifest.get("compressed_from") or {}).get("command")


def card_data(manifest: dict, name: str):
    """The front matter: ``ModelCardData`` with a ``model-index`` of every recorded metric."""
    results = []
    metrics = manifest.get("metrics") or {}
    for split in ("dev", "test"):
        for task, values in (metrics.get(split) or {}).items():
            for metric, value in values.items():
                results.append(EvalResult(task_type="text-classification", dataset_type=task,
                                          dataset_name=f"{task} ({split})", dataset_split=split, metric_type=metric,
                                          metric_value=round(float(value), 4)))
    tasks = list(manifest.get("tasks") or [])
    tags = ["peft_mtl", "peft", "lora" if manifest.get("mode") == "lora" else manifest.get("mode", "lora"),
            "multi-task" if len(tasks) > 1 else "single-task", *tasks]
    return ModelCardData(library_name="peft" if manifest.get("mode") != "full" else "transformers",
                         base_model=_base_model(manifest), tags=tags, pipeline_tag="text-classification",
                         language="en", model_name=name, eval_results=results or None)


def card_text(manifest: dict, name: str, command: str | None = None) -> str:
    """The whole card: front matter and body (``command``: how it was trained, if the manifest does not say).

    Long on purpose: the card's sections in the order a reader meets them, each a few lines."""
    tasks = list(manifest.get("tasks") or [])
    specs = manifest.get("task_specs") or {}
    params = manifest.get("parameters") or {}
    trainable, total = params.get("trainable"), params.get("total")
    share = f" ({100 * trainable / total:.2f} % of {total:,})" if trainable and total else ""
    config = manifest.get("config") or {}
    lora = config.get("lora") or {}
    metrics = manifest.get("metrics") or {}
    lines = [f"# {name}", "",
             f"A [peft_mtl](https://github.com/peft-mtl/peft_mtl) adapter set: {MODES.get(manifest.get('mode'), '?')} "
             f"on `{_base_model(manifest)}`, for {len(tasks)} task{'s' if len(tasks) != 1 else ''}: "
             + ", ".join(f"`{t}`" for t in tasks) + ".", "", "## Tasks", "",
             "| task | kind | inputs | labels | description |", "|---|---|---|---|---|"]
    for t in tasks:
        spec = specs.get(t, {})
        labels = spec.get("labels")
        shown = ", ".join(map(str, labels)) if labels else (f"score {spec.get('output_range')}" if spec.get(
            "output_range") else "score")
        lines.append(f"| {t} | {spec.get('kind', '?')} | {' + '.join(spec.get('text_columns') or []) or '?'} | "
                     f"{shown} | {spec.get('description') or ''} |")
    lines += ["", "## Size", "",
              f"- trainable parameters: {trainable:,}{share}" if trainable else "- trainable parameters: unknown",
              f"- on disk: {manifest['bytes_on_disk'] / 2**20:.1f} MB" if manifest.get("bytes_on_disk") else "- on disk: ?"]
    if manifest.get("mode") == "lora":
        lines.append(f"- LoRA rank {lora.get('rank')}, alpha {lora.get('alpha')}, targets {lora.get('targets')}; "
                     f"adapters: " + ", ".join(f"`{a}`" for a in manifest.get("adapters", {})))
    lines += ["", "## Training", ""]
    command = _command(manifest) or command
    if command:
        lines += ["```bash", command, "```", ""]
    budget = [f"{config['epochs']} epoch(s)" if "epochs" in config else None,
              f"{config['steps_per_epoch']} steps per epoch" if config.get("steps_per_epoch") else None,
              f"batch {config['batch_size']}" if "batch_size" in config else None,
              f"lr {config['lr']}" if "lr" in config else None,
              f"sampling {config['sampling']}" if "sampling" in config else None]
    lines.append("- budget: " + ", ".join(b for b in budget if b))
    if manifest.get("train_examples"):
        lines.append("- training rows: " + ", ".join(f"{t} {n:,}" for t, n in manifest["train_examples"].items()))
    if manifest.get("train_seconds"):
        lines.append(f"- {manifest['train_seconds']:.0f} s of training on {manifest.get('device', '?')} "
                     f"({manifest.get('threads', '?')} threads, {manifest.get('processes', 1)} process(es), "
                     f"precision {manifest.get('precision', '?')})")
    if manifest.get("compressed_from"):
        c = manifest["compressed_from"]
        lines.append(f"- compressed from `{c.get('folder')}` to rank {c.get('rank')} (`peft-mtl compress`)")
    if config.get("teacher"):
        lines.append(f"- distilled from `{config['teacher']}` (weight {config.get('distill_weight')})")
    lines += ["", "## Scores", ""]
    scored = [(split, metrics.get(split)) for split in ("dev", "test") if metrics.get(split)]
    if scored:
        lines += ["| split | task | metric | value |", "|---|---|---|---:|"]
        for split, values in scored:
            for t, m in values.items():
                for k, v in m.items():
                    lines.append(f"| {split} | {t} | {k} | {v:.4f} |")
        if metrics.get("overall") is not None:
            lines += ["", f"Overall (the mean of each task's primary metric, STS r mapped to 0..1): "
                          f"**{metrics['overall']:.4f}**."]
    else:
        lines.append("Not evaluated yet: `peft-mtl eval` this folder, then `peft-mtl card` it.")
    load = ["", "## Use", "", "With peft_mtl:", "", "```python", "from peft_mtl import load_base", "",
            "base = load_base()  # the backbone it was trained on", f'base.load("{name}")',
            f'print(base.predict("{tasks[0] if tasks else "task"}", ["an example input"]))', "```", "",
            f"Served over HTTP with other sets on one backbone: `peft-mtl serve {name}`."]
    if manifest.get("mode") == "lora" and tasks:
        adapters = manifest.get("adapters", {})
        route = [a for a in (manifest.get("routing") or {}).get(tasks[0], []) if a in adapters] or list(adapters)[:1]

        def where(a: str) -> str:
            return name if adapters[a] == "." else f"{name}/{adapters[a]}"

        load += ["", "With plain peft and transformers (the encoder; each task's head is a linear layer on the "
                     f"{manifest.get('pooling', 'mean')}-pooled output, saved as `head.safetensors`):", "", "```python",
                 "from peft import PeftModel", "from transformers import AutoModel", "",
                 f'encoder = AutoModel.from_pretrained("{_base_model(manifest)}")',
                 f'encoder = PeftModel.from_pretrained(encoder, "{where(route[0])}", adapter_name="{route[0]}")']
        load += [f'encoder.load_adapter("{where(a)}", adapter_name="{a}")' for a in route[1:]]
        if len(route) > 1:
            load.append(f"encoder.base_model.set_adapter({route!r})  # {tasks[0]}: these deltas add up")
        load.append("```")
    data = [KNOWN_DATA.get(t, f"{t}: {specs.get(t, {}).get('description') or 'a user task file'}") for t in tasks]
    load += ["", "## Limits", "",
             "- Trained on " + "; ".join(data) + ". English only; scores on other domains will be lower.",
             f"- Inputs longer than {manifest.get('max_length', '?')} tokens are truncated; the backbone "
             f"(`{_base_model(manifest)}`) bounds what the adapters can learn.",
             "- Dev scores guided training choices (best epoch), so they are optimistic; a held-out test split is "
             "the fair estimate.", ""]
    body = "\n".join(lines + load)
    return str(ModelCard(f"---\n{card_data(manifest, name).to_yaml()}\n---\n\n{body}"))


def write_card(folder: str | Path, manifest: dict, name: str | None = None, command: str | None = None) -> Path:
    """Write ``folder/README.md`` from the set's ``manifest`` atomically."""
    folder = Path(folder)
    path = folder / CARD
    write_text_atomic(path, card_text(manifest, name or folder.name, command))
    return path
