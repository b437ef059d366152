"""The engines that run a model, behind one protocol (`base.Backend`).

- `hf.HFBackend`: transformers (peft-wrapped models included), on CPU or GPU;
- `vllm.VllmBackend`: vLLM, optional (`personavec[vllm]`), with per-request steering inside its workers.

`load_backend(spec, engine=...)` is the one place that picks an implementation; `as_backend(model, tokenizer)`
lets every library function take either a backend or a plain transformers model.
"""

from __future__ import annotations

import torch

from ..errors import PersonavecError, arg
from ..models import load_model
from .base import ENGINE_MODES, POSITIONS, STEER_POSITIONS, Activations, Backend, Steering, check_steering
from .hf import AblationHandle, HFBackend, SteeringHandle

ENGINES = ("hf", "vllm")
# vLLM settings the CLI sets once for every engine it loads (`--engine-mode`, `--max-steering-slots`); Ray tasks
# carry a copy to their actors
ENGINE_OPTIONS: dict = {}


def set_engine_options(**options) -> None:
    """Defaults for every later vLLM engine: `engine_mode`, `max_steering_slots` (None values are ignored)."""
    ENGINE_OPTIONS.update({k: v for k, v in options.items() if v is not None})

__all__ = ["ENGINES", "ENGINE_MODES", "POSITIONS", "STEER_POSITIONS", "AblationHandle", "Activations", "Backend", "HFBackend",
           "Steering", "SteeringHandle", "as_backend", "check_steering", "load_backend", "one_op_layers", "set_engine_options", "transformers_model"]


OPS = ("steer", "read", "capture")  # what a compiled vLLM graph can carry per layer (`VllmBackend(<op>_layers=)`)


def one_op_layers(op: str, layer: int | None) -> dict:
    """`load_backend` options for a job that does nothing but `op` ("steer", "read" or "capture") at `layer`: a
    compiled vLLM graph runs every declared op every step, so it then carries that one op. `{}` when `layer` is
    None (nothing declared: every op at every layer). Other engines ignore these options."""
    if op not in OPS:
        raise ValueError(f"op {op!r}: use one of {OPS}")
    return {} if layer is None else {f"{kind}_layers": [int(layer)] if kind == op else [] for kind in OPS}


def load_backend(spec: str, engine: str = "hf", dtype: str | torch.dtype = "auto", tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, **engine_kwargs) -> Backend:
    """A backend for a packaged short name, local folder or hub id on the chosen engine (`hf` or `vllm`)."""
    if engine not in ENGINES:
        raise PersonavecError(f"{arg('engine', repr(engine))}: use {' or '.join(ENGINES)}")
    if engine == "hf":
        if tensor_parallel_size != 1:
            raise PersonavecError(f"{arg('tensor_parallel_size')} needs {arg('engine', 'vllm')}")
        model, tokenizer = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        return HFBackend(model, tokenizer)
    from .vllm import VllmBackend  # optional: imports vLLM only when asked for

    return VllmBackend(spec, dtype=dtype if isinstance(dtype, str) else "auto", tensor_parallel_size=tensor_parallel_size,
                       trust_remote_code=trust_remote_code, **{**ENGINE_OPTIONS, **engine_kwargs})


def as_backend(model, tokenizer=None) -> Backend:
    """`model` itself when it is a backend, else a transformers backend around it (and `tokenizer`)."""
    if isinstance(model, Backend):
        return model
    if isinstance(model, torch.nn.Module):
        return HFBackend(model, tokenizer)
    raise PersonavecError(f"expected a transformers model or a personavec backend, got {type(model).__name__}")


def transformers_model(model, what: str = "this step") -> torch.nn.Module:
    """The transformers model behind `model`, for steps that only transformers runs (training, logit scoring)."""
    return as_backend(model).transformers_model(what)
