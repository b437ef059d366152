"""A short hash that names one checkpoint: the same weights give the same value in any dtype or engine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import PersonavecError
from .layout import hidden_size, n_layers, unwrap


def _fingerprint(arch: str, layers: int, hidden: int, vocab, named_tensors) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"arch": arch, "layers": layers, "hidden": hidden, "vocab": vocab}, sort_keys=True).encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        # Rounded through bf16 so the same checkpoint loaded in fp32 or bf16 gives the same fingerprint.
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short hash of the architecture and a strided sample of every weight tensor.

    Two checkpoints of one architecture differ here, fine-tunes (and models with
    a LoRA adapter attached) included, so a vector, a judge score or a cached
    base answer made on one is never silently taken for the other's.
    """
    base = unwrap(model)
    with torch.no_grad():
        return _fingerprint(type(base).__name__, n_layers(base), hidden_size(base),
                            getattr(base.config, "vocab_size", None),
                            [(name, p.detach()) for name, p in base.named_parameters()])


def folder_fingerprint(path: str, config, layers: int) -> str:
    """`model_fingerprint` of the transformers model saved in `path`, read from its safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise PersonavecError(f"{path}: no safetensors files to fingerprint")
    text = getattr(config, "text_config", None) or config
    tensors = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            tensors += [(name, handle.get_tensor(name)) for name in handle.keys()]
    return _fingerprint((config.architectures or ["?"])[0], layers, int(text.hidden_size),
                        getattr(text, "vocab_size", None), tensors)
