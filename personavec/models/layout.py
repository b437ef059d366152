"""Where a transformers (or vLLM) model keeps its decoder blocks and final norm.

This is the only module that knows a model's layout. Everything else asks it:
block i (1-based) produces `hidden_states[i]`, and the final norm is what
transformers applies to `hidden_states[-1]`. peft-wrapped models are unwrapped
to their base model first.
"""

from __future__ import annotations

import torch

from ..errors import PersonavecError, arg

# Where decoder blocks live, as attribute paths from the top-level causal LM.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers
    "language_model.model.layers",  # vLLM's multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


def _get_path(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def unwrap(model) -> torch.nn.Module:
    """The transformers model itself: peft wraps it, and its base model keeps the usual layout."""
    if not isinstance(model, torch.nn.Module):  # e.g. a vLLM backend: its layers live in its own workers
        raise PersonavecError(f"this step needs the transformers model, not {type(model).__name__}; use {arg('engine', 'hf')} for it")
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's decoder blocks in order: block i (1-based) produces hidden_states[i]."""
    model = unwrap(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise PersonavecError(f"cannot find the decoder blocks of {type(model).__name__}; known layouts: {', '.join(_BLOCK_PATHS)}")


def decoder_stack(model) -> torch.nn.Module:
    """The module that runs the blocks (embeddings -> blocks -> final norm), i.e. the model without its LM head."""
    model = unwrap(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            parent = path.rsplit(".", 1)[0]
            return _get_path(model, parent)
    raise PersonavecError(f"cannot find the decoder stack of {type(model).__name__}")


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied after the last block; transformers applies it to hidden_states[-1]."""
    stack = decoder_stack(model)
    for name in ("norm", "ln_f", "final_layer_norm", "norm_f"):
        module = getattr(stack, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def n_layers(model) -> int:
    """Number of decoder blocks; layers run 0 (embeddings) .. n_layers."""
    return len(decoder_blocks(model))


def hidden_size(model) -> int:
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size)
