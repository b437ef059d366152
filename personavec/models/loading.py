"""Loading a transformers model and its tokenizer, and choosing its dtype."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import PersonavecError, arg
from .registry import resolve


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is several times faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise PersonavecError(f"{arg('dtype', repr(dtype))}: use auto, bf16, fp16 or fp32")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str | None = None, trust_remote_code: bool = False):
    """Load `(model, tokenizer)` by packaged short name, local folder or hub id.

    The model is in eval mode; the tokenizer pads on the left (for generation)
    and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars are enough; theirs floods logs
    device = device or default_device()
    path = resolve(spec)
    torch_dtype = resolve_dtype(dtype, device)
    def load(**kwargs):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
        return model, tokenizer

    try:
        if os.path.exists(path):
            model, tokenizer = load()
        else:
            model, tokenizer = _load_hub_id(spec, load)
    except OSError as exc:
        raise PersonavecError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    model.name_or_path = spec  # the spec the user gave, recorded in vector metadata
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise PersonavecError(f"model {spec!r} has no chat template; personavec needs an instruct/chat model")
    return model, tokenizer


def _load_hub_id(spec: str, load):
    """A hub id: from the local Hugging Face cache when it is there (no network), else from the hub, but only
    when the hub answers. Unreachable, transformers would retry for about a minute before giving up."""
    try:
        return load(local_files_only=True)
    except OSError:
        pass  # not (completely) in the local cache
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise PersonavecError(f"cannot load model {spec!r}: it is not in the local Hugging Face cache and "
                              "HF_HUB_OFFLINE is set; unset it to download, or pass a local folder")
    endpoint = hub_endpoint()
    problem = hub_unreachable(endpoint)
    if problem:
        raise PersonavecError(f"cannot load model {spec!r}: it is not in the local Hugging Face cache and the hub at "
                              f"{endpoint} cannot be reached ({problem}); connect to the network, or pass a local "
                              "folder or a packaged name")
    return load()


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None when the hub answers an HTTP request within `timeout` seconds (any status), else why not.
    Proxy variables are honoured, as the download itself honours them."""
    import httpx

    try:
        httpx.head(endpoint, timeout=timeout, follow_redirects=False, trust_env=True)
    except httpx.HTTPError as exc:
        return type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc) else "")
    return None
