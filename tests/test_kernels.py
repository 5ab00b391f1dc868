"""The CPU kernels: fast dropout, the registered attention function and the fused LoRA forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_mtl.model.adapters import LoraSettings, add_adapters, activate
from peft_mtl.model.kernels import FastDropout, fast_dropout, keep_mask
from peft_mtl.model.lora_runtime import RuntimeLoraLinear, fused_lora_forward, peft_forward


def test_keep_mask_rate_and_reproducibility():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400, 1000]), 0.1)
    assert mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(0.9, abs=0.002)
    # Every one of the four 16-bit lanes of a word is unbiased (no lane stuck at "keep").
    lanes = mask.reshape(-1)[: 400 * 1000 // 4 * 4].view(-1, 4).float().mean(0)
    assert torch.allclose(lanes, torch.full((4,), 0.9), atol=0.004)
    torch.manual_seed(0)
    assert torch.equal(mask, keep_mask(torch.Size([400, 1000]), 0.1))


def test_fast_dropout_scales_kept_values_and_backpropagates_through_the_same_mask():
    x = torch.randn(64, 128, requires_grad=True)
    torch.manual_seed(3)
    y = fast_dropout(x, 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], x.detach()[kept] / 0.75)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.75))
    assert fast_dropout(x, 0.25, training=False) is x
    assert fast_dropout(x, 0.0) is x


def test_fast_dropout_module_respects_eval_mode():
    layer = FastDropout(0.5)
    x = torch.ones(10, 10)
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    assert (layer(x) == 0).any()


def test_loaded_encoder_uses_fast_dropout_and_registered_attention(tiny_backbone):
    from peft_mtl.model.backbone import load_encoder

    encoder = load_encoder(tiny_backbone)
    assert encoder.config._attn_implementation == "peft_mtl"
    assert not any(type(m) is nn.Dropout for m in encoder.modules())
    reference = load_encoder(tiny_backbone, attn_implementation="eager")
    ids = torch.randint(0, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs)


def _two_adapter_layer():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40))
    for p in base.parameters():
        p.requires_grad_(False)
    settings = LoraSettings(rank=4, targets="0")
    model = add_adapters(base, ["shared", "task"], settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    activate(model, ["shared", "task"], trainable=True)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    return model, layer


def test_fused_lora_equals_the_sum_of_both_adapters_under_bf16_autocast():
    model, layer = _two_adapter_layer()
    assert isinstance(layer, RuntimeLoraLinear), "add_adapters routes LoRA layers through the runtime forward"
    x = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x).float()
    x16 = x.bfloat16().float()
    expected = nn.functional.linear(x16, layer.base_layer.weight.bfloat16().float(), layer.base_layer.bias.bfloat16().float())
    for name in ("shared", "task"):
        expected = expected + (x16 @ layer.lora_A[name].weight.t()) @ layer.lora_B[name].weight.t() * layer.scaling[name]
    torch.testing.assert_close(fused, expected, atol=0.05, rtol=0.02)

    # Gradients reach both adapters and agree with peft's own (unfused) path.
    def grads(run):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(x).float().pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])

    ours = grads(layer)
    peft = grads(lambda inp: peft_forward(layer, inp))
    assert torch.nn.functional.cosine_similarity(ours, peft, dim=0) > 0.999
    for name in ("shared", "task"):
        assert layer.lora_A[name].weight.grad.abs().sum() > 0 and layer.lora_B[name].weight.grad.abs().sum() > 0


def test_fused_lora_in_fp32_gives_peft_outputs_and_gradients():
    model, layer = _two_adapter_layer()
    layer.base_layer.bias.requires_grad_(True)  # peft's bias="all": the fused backward covers it
    x = torch.randn(3, 5, 48, requires_grad=True)

    def run(forward):
        model.zero_grad()
        x.grad = None
        out = forward(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.detach(), grads, x.grad.clone()

    ours, our_grads, our_input_grad = run(layer)
    theirs, their_grads, their_input_grad = run(lambda inp: peft_forward(layer, inp))
    fn, names = layer(x).grad_fn, []
    while fn is not None:
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert "_LoraLinearBackward" in names, f"fp32 takes the fused path, got {names}"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_input_grad, their_input_grad, atol=1e-5, rtol=1e-5)
    assert set(our_grads) == set(their_grads) and len(our_grads) == 5  # A, B of both adapters + bias
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-5, rtol=1e-5)


def test_fused_lora_falls_back_to_peft_outside_its_cases():
    model, layer = _two_adapter_layer()
    x = torch.randn(5, 48)
    half = x.half()
    layer.half()  # fp16 compute: peft's path, bit for bit
    assert torch.equal(fused_lora_forward(layer, half), peft_forward(layer, half))
    layer.float()
    layer.base_layer.weight.requires_grad_(True)  # full fine-tuning: peft's path
    assert torch.equal(fused_lora_forward(layer, x), peft_forward(layer, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused_lora_forward(layer, x), peft_forward(layer, x))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_inference_uses_a_merged_weight_that_follows_adapter_changes(precision):
    model, layer = _two_adapter_layer()
    tol = dict(atol=0.05, rtol=0.02) if precision == "bf16" else dict(atol=1e-5, rtol=1e-5)
    x = torch.randn(40, 48)  # enough rows to repay a merge
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with torch.no_grad():
            merged = layer(x).float()
        training_path = layer(x).float().detach()
    assert layer.__dict__["_peft_mtl_merged"]["weight"].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    torch.testing.assert_close(merged, training_path, **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        layer.lora_B["task"].weight.mul_(3)  # an optimiser step: the cached merge must be redone
        after_update = layer(x).float()
        activate(model, ["shared"], trainable=False)  # a different adapter combination
        shared_only = layer(x).float()
    assert not torch.allclose(after_update, merged, atol=0.05)
    xr = x.bfloat16().float() if precision == "bf16" else x
    expected = (nn.functional.linear(xr, layer.base_layer.weight, layer.base_layer.bias)
                + (xr @ layer.lora_A["shared"].weight.t()) @ layer.lora_B["shared"].weight.t() * layer.scaling["shared"])
    torch.testing.assert_close(shared_only, expected, **tol)


def test_small_inference_batches_skip_the_merge():
    model, layer = _two_adapter_layer()
    with torch.no_grad():
        layer(torch.randn(2, 48))  # 2 rows < 48·40/88: the rank-r path is cheaper than a merge
    assert "weight" not in layer.__dict__.get("_peft_mtl_merged", {})
