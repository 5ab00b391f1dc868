"""LoRA adapters on a frozen backbone: routing, gradients, and the saved format."""

from __future__ import annotations

import torch

from peft_mtl.training.config import TrainConfig
from .helpers import batch


def test_fresh_adapter_leaves_encoder_output_unchanged(tiny_backbone):
    from peft_mtl.model.adapters import LoraSettings, add_adapters
    from peft_mtl.model.backbone import load_encoder

    b = batch(tiny_backbone)
    plain = load_encoder(tiny_backbone)
    ref = plain(**b.inputs[0]).last_hidden_state
    wrapped = add_adapters(load_encoder(tiny_backbone), ["shared", "sst"], LoraSettings(rank=4, dropout=0.0))
    wrapped.eval()
    assert torch.equal(wrapped(**b.inputs[0]).last_hidden_state, ref)


def test_backbone_is_frozen_in_adapter_and_heads_modes(tiny_model_factory):
    for mode in ("lora", "heads"):
        model = tiny_model_factory(TrainConfig(tasks=["sst", "qqp"], mode=mode))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable), mode
    full = tiny_model_factory(TrainConfig(tasks=["sst"], mode="full"))
    assert all(p.requires_grad for p in full.encoder.parameters())


def test_shared_and_task_adapter_get_gradients_other_tasks_do_not(tiny_model_factory, tiny_backbone):
    model = tiny_model_factory(TrainConfig(tasks=["sst", "qqp", "sts"]))
    model.train()
    b = batch(tiny_backbone, "sst")
    for p in model.parameters():
        p.grad = None
    loss = torch.nn.functional.cross_entropy(model("sst", b.inputs), b.labels)
    loss.backward()

    def grads(adapter):
        return [p.grad for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]

    # B starts at zero, so A's gradient is zero at step 0; B's must be non-zero for active adapters.
    active_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n and (".shared." in n or ".sst." in n)]
    assert active_b and all(g is not None and g.abs().sum() > 0 for g in active_b)
    for other in ("qqp", "sts"):
        assert all(g is None for g in grads(other)), other
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("heads.qqp") or n.startswith("heads.sts"))
    assert all(p.grad is None for n, p in model.encoder.named_parameters() if "lora_" not in n)


def test_active_adapter_deltas_add_up(tiny_model_factory, tiny_backbone):
    model = tiny_model_factory(TrainConfig(tasks=["sst", "qqp"]))
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    b = batch(tiny_backbone)
    enc = model.encoder
    with torch.no_grad():
        enc.base_model.set_adapter(["shared"], inference_mode=True)
        only_shared = enc(**b.inputs[0]).last_hidden_state
        enc.base_model.set_adapter(["shared", "sst"], inference_mode=True)
        both = enc(**b.inputs[0]).last_hidden_state
    model._active = None
    assert not torch.allclose(only_shared, both)
    model.use_task("sst", trainable=False)
    with torch.no_grad():
        assert torch.allclose(enc(**b.inputs[0]).last_hidden_state, both)
