"""Device mistakes are caught on a CPU: the real code paths run on a stand-in for an accelerator.

PyTorch's ``meta`` device holds shapes and dtypes but no data, and refuses to mix with CPU
tensors ("Tensor on device cpu is not on the expected device meta!"): a tensor this package
makes on the CPU by mistake fails these tests as it would fail on a GPU, and a host
read-back (``.item()``, ``.tolist()``, ``.numpy()``) fails too, so the places that read a
value back are explicit. What cannot run on the stand-in, and how it is guarded instead:

* reading results back to the host — by design once per step (the step's losses, the fp16
  gradient scaler's overflow check) and once per answered batch: the tests run everything
  up to those points; ``scripts/gpu_check.sh`` counts the syncs per step on a real GPU;
* random generators — ``meta`` has none: SMART's noise comes from the global stream there
  (``device.generator``); every tensor factory in the package names its device or derives
  it from an input (an AST test below, with the CPU-by-design exceptions listed);
* bitsandbytes quantization needs real weights: the test checks what ``--quantize`` asks
  transformers for (device map, attention) instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from peft_mtl.data.loading import collate, encode_texts
from peft_mtl.data.tasks import get_task
from peft_mtl.model.backbone import load_encoder, load_tokenizer
from peft_mtl.model.heads import TaskHead
from peft_mtl.model.multitask import build_model
from peft_mtl.training.config import TrainConfig
from peft_mtl.training.optimization import TrainingStep, build_optimizer, build_scheduler
from peft_mtl.training.pcgrad import PCGrad
from peft_mtl.training.regularizers import Objective

META = torch.device("meta")
PACKAGE = Path(__file__).resolve().parents[1] / "peft_mtl"


@pytest.fixture(autouse=True)
def mask_check_without_host_read(monkeypatch):
    """transformers decides whether an all-ones padding mask can be skipped by reading it back
    (``padding_mask.all()``, its own host sync on a GPU too); on the stand-in it is told "no"."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *args, **kwargs: False)


def _batch(tiny_backbone, task: str, n: int = 4):
    spec = get_task(task)
    inputs = [("a fine film", "a good movie")] * n if spec.is_pair else ["a fine film", "dull", "ok", "wow"][:n]
    enc = encode_texts(spec, inputs, load_tokenizer(tiny_backbone))
    enc.labels[:] = 1
    return collate(enc, list(range(n)))  # built on the CPU, as every batch is


def _model_on_standin(tiny_backbone, cfg: TrainConfig, frozen_dtype: torch.dtype = torch.float32):
    encoder = load_encoder(tiny_backbone, device=META)  # the accelerator's choices: SDPA, PyTorch dropout
    model = build_model(cfg, encoder, encoder.config.hidden_size).to(META)
    for p in model.encoder.parameters():
        if not p.requires_grad:  # the frozen backbone as autocast would compute it
            p.data = p.data.to(frozen_dtype)
    model.train()
    return model


def _step(model, cfg, surgery=None, scaler=None) -> TrainingStep:
    optimizer = build_optimizer(cfg, model)
    return TrainingStep(model, Objective(model, cfg, "fp32"), optimizer, build_scheduler(optimizer, 10, 0.1),
                        cfg.max_grad_norm, surgery, scaler=scaler)


def test_a_head_trains_on_a_non_cpu_device():
    """Finding 1: the heads' dropout made its mask on the CPU, so no GPU step could finish."""
    head = TaskHead(32, 5, dropout=0.1).to(META).train()
    out = head([torch.randn(4, 32, device=META)])
    assert out.device == META and out.shape == (4, 5)


@pytest.mark.parametrize("frozen_dtype", [torch.float32, torch.bfloat16])
def test_a_lora_training_step_runs_on_a_non_cpu_device(tiny_backbone, frozen_dtype):
    cfg = TrainConfig(tasks=["sst"], precision="fp32")
    model = _model_on_standin(tiny_backbone, cfg, frozen_dtype)
    step = _step(model, cfg)
    losses = step.gradients({"sst": _batch(tiny_backbone, "sst")})  # forward and backward, on the device
    assert losses.device == META and losses.shape == (1,)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device == META for p in trained)
    step.update()  # clip, optimiser step, schedule, Bregman: no host read
    assert all(p.device == META for p in trained)


def test_the_fp16_gradient_scaler_path_runs_up_to_its_overflow_check(tiny_backbone):
    cfg = TrainConfig(tasks=["sst"], precision="fp32")
    model = _model_on_standin(tiny_backbone, cfg, torch.float16)
    scaler = torch.amp.GradScaler("meta", init_scale=1024.0)
    step = _step(model, cfg, scaler=scaler)
    step.gradients({"sst": _batch(tiny_backbone, "sst")})  # the scaled backward
    assert all(p.grad.device == META for p in model.parameters() if p.requires_grad)
    with pytest.raises(RuntimeError, match="meta"):  # unscaled, then the overflow flag is read: the sync by design
        step.update()


def test_a_smart_and_bregman_step_runs_on_a_non_cpu_device(tiny_backbone):
    cfg = TrainConfig(tasks=["sts"], precision="fp32")
    cfg.smart.weight, cfg.smart.steps, cfg.smart.bregman_mu = 1.0, 1, 0.5
    model = _model_on_standin(tiny_backbone, cfg)
    step = _step(model, cfg)
    terms = step.objective.terms(model, _batch(tiny_backbone, "sts"))
    assert set(terms) == {"task", "smart", "bregman"} and all(t.device == META for t in terms.values())
    step.gradients({"sts": _batch(tiny_backbone, "sts")})
    step.update()  # Bregman's θ̃ moves on the device


def test_a_pcgrad_summed_step_runs_on_a_non_cpu_device(tiny_backbone):
    cfg = TrainConfig(tasks=["sst", "sts"], precision="fp32", sampling="sum", pcgrad=True)
    model = _model_on_standin(tiny_backbone, cfg)
    step = _step(model, cfg, surgery=PCGrad(0))
    losses = step.gradients({t: _batch(tiny_backbone, t) for t in ("sst", "sts")})
    assert losses.shape == (2,) and step.shared and all(p.grad.device == META for p in step.shared)


def test_quantize_asks_for_the_accelerators_placement_and_attention(tiny_backbone, monkeypatch):
    """bitsandbytes needs real weights, so the load path is checked by what it asks transformers for."""
    pytest.importorskip("bitsandbytes")
    import transformers

    from peft_mtl.model.backbone import load_quantized_encoder

    asked = {}

    def capture(path, **kwargs):
        asked.update(kwargs)
        return transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", capture)
    monkeypatch.setattr("peft_mtl.device.gpu_supports_bf16", lambda device: True)  # no GPU to ask here
    encoder = load_quantized_encoder(tiny_backbone, "nf4", device=torch.device("cuda", 1))
    assert asked["device_map"] == "cuda:1" and asked["attn_implementation"] == "sdpa"
    assert not any(type(m).__name__ == "FastDropout" for m in encoder.modules()), "the CPU dropout kernel stays off"
    load_quantized_encoder(tiny_backbone, "nf4", device=torch.device("cpu"))
    assert asked["device_map"] == "cpu" and asked["attn_implementation"] == "peft_mtl"


@pytest.fixture
def host_on_standin(tiny_backbone, small_data, tmp_path):
    """An adapter host whose backbone and two sets live on the stand-in device."""
    from peft_mtl import load_base
    from peft_mtl.training.train import train

    from .helpers import tiny_config

    for name, tasks in (("a", ["sst", "sts"]), ("b", ["sst"])):
        train(tiny_config(tiny_backbone, small_data, tmp_path / name, tasks=tasks, epochs=1, steps_per_epoch=2),
              progress=False)
    host = load_base(str(tiny_backbone), precision="fp32", device="cpu")
    host.load(tmp_path / "a", name="a")
    host.load(tmp_path / "b", name="b")
    host.model.to(META)
    assert host.device == META
    return host


def test_stacked_ensemble_pass_runs_on_a_non_cpu_device(host_on_standin, tiny_backbone):
    from peft_mtl.model.lora_runtime import stacked_lora

    host, members = host_on_standin, ["a", "b"]
    inputs = _batch(tiny_backbone, "sst").inputs[0]
    with torch.inference_mode(), stacked_lora(host.stacked_factors(members, "sst")):
        hidden, mask = host.hidden_states({k: v.repeat(len(members), 1) for k, v in inputs.items()})
        outs = [host.head_output(m, "sst", [(hidden[i * 4:(i + 1) * 4], mask[i * 4:(i + 1) * 4])])
                for i, m in enumerate(members)]
    assert all(o.device == META and o.shape == (4, 5) for o in outs)


def test_the_serving_workers_pass_runs_on_a_non_cpu_device(host_on_standin):
    from peft_mtl.serving.worker import group_outputs

    host = host_on_standin
    blocks = []
    for name, task, texts in (("a", "sts", [("a man plays", "a man sings")]), ("b", "sst", ["fine", "dull"])):
        blocks.append((name, task, [len(blocks)], [host.encode(task, texts, name).segments[0]]))
    with torch.inference_mode():
        groups, outputs = group_outputs(host, blocks)
    assert [o.shape for o in outputs] == [(1,), (2, 5)] and all(o.device == META for o in outputs)


# -- tensor factories: a device named, or derived from an input --------------------------------

FACTORIES = {"empty", "zeros", "ones", "randn", "rand", "randint", "arange", "full", "tensor", "eye", "linspace",
             "as_tensor", "randperm", "normal", "empty_strided", "from_numpy"}
# Made on the CPU by design: batches are built there and moved by MultiTaskModel.hidden_states;
# a teacher's targets stay there and are indexed there before each batch's rows move.
# The multi-adapter graph is traced from a CPU copy of the backbone with dummy inputs made there.
CPU_BY_DESIGN = {("data/loading.py", "pad_sequences"), ("data/loading.py", "collate"),
                 ("training/distill.py", "load_teacher"), ("training/distill.py", "batch_targets"),
                 ("inference/adapter_graph.py", "build_graph")}


def factories_without_device(source: str) -> list[tuple[str, int]]:
    """(function, line) of each ``torch.<factory>(...)`` call that names no ``device=``."""
    tree = ast.parse(source)
    owner = {}
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                owner.setdefault(id(node), func.name)
    return [(owner.get(id(n), "<module>"), n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in FACTORIES
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
            and "device" not in {k.arg for k in n.keywords}]


def test_every_tensor_factory_names_its_device_or_makes_a_batch_on_the_cpu():
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for func, line in factories_without_device(path.read_text(encoding="utf-8")):
            if (rel, func) not in CPU_BY_DESIGN:
                found.setdefault(rel, []).append(f"{func}:{line}")
    assert found == {}, "pass device= (or use *_like / new_*), or list it above with the reason"


def test_the_factory_rule_catches_a_cpu_mask():
    """The shape of finding 1: a dropout mask made without a device."""
    planted = "def keep_mask(shape, p):\n    return torch.empty(shape, dtype=torch.int64).random_()\n"
    assert factories_without_device(planted) == [("keep_mask", 2)]
