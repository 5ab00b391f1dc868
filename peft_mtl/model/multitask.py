"""The multi-task model: one encoder (plain, or wrapped by peft with adapters) plus task heads.

For a batch of task t the model activates t's adapters (the shared one and t's own), encodes
each input segment, pools, and applies t's head. An optional additive perturbation of the
embedding-layer output is how SMART probes smoothness without running the embeddings twice.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..data.tasks import get_task
from . import lora_runtime
from .adapters import SHARED_ADAPTER, activate, add_adapters
from .backbone import freeze
from .heads import apply_head, make_head, pool


class MultiTaskModel(nn.Module):
    """Encoder + heads + adapter routing.

    Args:
        encoder: a ``BertModel``-like module, or a ``PeftModel`` wrapping one.
        heads: head key -> head. In training the key is the task name; an inference
            model holding several adapter sets uses ``"{set}__{task}"``.
        pooling: ``mean`` or ``cls``.
        routing: head key -> adapter names active for it (empty when the encoder carries
            no adapters, as in full fine-tuning or heads-only mode).
        head_tasks: head key -> task name (default: the key itself).
        head_pooling: head key -> pooling, where it differs from ``pooling``.
    """

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], pooling: str = "mean",
                 routing: dict[str, list[str]] | None = None, head_tasks: dict[str, str] | None = None,
                 head_pooling: dict[str, str] | None = None):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.pooling = pooling
        self.routing = dict(routing or {})
        self.head_tasks = {k: (head_tasks or {}).get(k, k) for k in heads}
        self.head_pooling = dict(head_pooling or {})
        # head key -> TaskSpec, where a loaded set brought its own (tasks from task files)
        self.head_specs: dict = {}
        self._noise: list[torch.Tensor] | None = None
        self._captured: list[torch.Tensor] | None = None
        self._active: tuple[str, ...] | None = None
        self._tuner_layers: list[nn.Module] = []
        self._active_trainable: bool | None = None
        self.embeddings.register_forward_hook(self._embedding_hook)

    @property
    def embeddings(self) -> nn.Module:
        base = self.encoder.get_base_model() if hasattr(self.encoder, "get_base_model") else self.encoder
        return base.embeddings

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.head_tasks.values()))

    @property
    def has_adapters(self) -> bool:
        return bool(self.routing)

    def _embedding_hook(self, module, args, output):
        if self._captured is not None:
            self._captured.append(output)
        if self._noise:
            return output + self._noise.pop(0).to(device=output.device, dtype=output.dtype)
        return output

    @contextmanager
    def perturbed_embeddings(self, noise: list[torch.Tensor]) -> Iterator[None]:
        """Add ``noise[i]`` to the embedding-layer output of the i-th encoded segment."""
        self._noise = list(noise)
        try:
            yield
        finally:
            self._noise = None

    @contextmanager
    def capture_embeddings(self) -> Iterator[list[torch.Tensor]]:
        """Record the embedding-layer output of each encoded segment (SMART needs its shape)."""
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def reset_routing(self) -> None:
        """Forget the cached routing after adapters were added, removed or activated directly."""
        self._active, self._active_trainable = None, None

    def use_task(self, key: str, trainable: bool | None = None) -> None:
        """Route to the adapters of head ``key``; a no-op when they are already active."""
        if not self.routing:
            return
        names = tuple(self.routing[key])
        if not names and not hasattr(self.encoder, "peft_config"):
            return  # a heads-only set on a bare backbone: nothing to route
        trainable = self.training if trainable is None else trainable
        if names == self._active and trainable == self._active_trainable:
            return
        if not trainable and self._active_trainable is False and self._tuner_layers:
            # Inference-to-inference switch: only which LoRA deltas run changes. peft's
            # set_adapter walks every module and re-flags requires_grad on every adapter
            # (milliseconds with many sets loaded); setting the active list on the cached
            # LoRA layers is what it does for the forward pass, in microseconds.
            lora_runtime.switch_active_fast(self.encoder, self._tuner_layers, list(names))
        else:
            activate(self.encoder, list(names), trainable=trainable)
            self._tuner_layers = lora_runtime.tuner_layers(self.encoder)
        self._active, self._active_trainable = names, trainable

    @property
    def uses_token_types(self) -> bool:
        """Whether the encoder takes segment ids: not DistilBERT (no such input), not RoBERTa or
        DeBERTa-v2 (one or no segment embedding), where a second segment's 1s would be out of range."""
        if "_uses_token_types" not in self.__dict__:
            base = self.encoder.get_base_model() if hasattr(self.encoder, "get_base_model") else self.encoder

            takes = "token_type_ids" in inspect.signature(base.forward).parameters
            self.__dict__["_uses_token_types"] = takes and getattr(base.config, "type_vocab_size", 2) >= 2
        return self.__dict__["_uses_token_types"]

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def hidden_states(self, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states, attention mask) of a padded batch, on the model's device.

        Batches are built on the CPU; segment ids are passed only to encoders that have them.
        """
        device = self.device
        if inputs["input_ids"].device != device:
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        extra = {"token_type_ids": inputs["token_type_ids"]} if self.uses_token_types else {}
        out = self.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **extra, **kwargs)
        return out.last_hidden_state, inputs["attention_mask"]

    def encode(self, inputs: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        hidden, mask = self.hidden_states(inputs)
        return pool(hidden, mask, pooling or self.pooling)

    def forward(self, key: str, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Outputs of head ``key``: logits ``(B, C)``, or scores ``(B,)`` for regression."""
        self.use_task(key)
        return self.head_output(key, [self.hidden_states(segment) for segment in inputs])

    def head_output(self, key: str, segments: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Head ``key`` on already encoded ``(hidden, mask)`` segments (see :func:`heads.apply_head`)."""
        spec = self.head_specs.get(key) or get_task(self.head_tasks[key])
        return apply_head(self.heads[key], segments, self.head_pooling.get(key, self.pooling), spec.kind)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable tensors that every task's loss reaches (what PCGrad operates on).

        The shared adapter when adapters are routed; the encoder itself when it is trained
        (full fine-tuning); none with independent adapters or heads only.
        """
        if self.routing:
            return [p for n, p in self.named_parameters() if f".{SHARED_ADAPTER}." in n]
        return [p for p in self.encoder.parameters() if p.requires_grad]


def build_model(cfg, encoder: nn.Module, hidden_size: int) -> MultiTaskModel:
    """The training model for ``cfg``: frozen encoder + adapters (lora), bare frozen encoder
    (heads) or trainable encoder (full), with one head per task."""
    heads = {t: make_head(get_task(t), hidden_size, cfg.pair_encoding, cfg.head_dropout) for t in cfg.task_names}
    if cfg.mode == "full":
        return MultiTaskModel(encoder, heads, cfg.pooling)
    freeze(encoder)
    if cfg.mode == "heads":
        return MultiTaskModel(encoder, heads, cfg.pooling)
    shared = [SHARED_ADAPTER] if cfg.uses_shared_adapter else []
    peft_model = add_adapters(encoder, shared + list(cfg.task_names), cfg.lora)
    return MultiTaskModel(peft_model, heads, cfg.pooling, {t: shared + [t] for t in cfg.task_names})
