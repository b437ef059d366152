"""Adding vectors to the residual stream, as removable hooks.

`add_vectors(model, {layer: delta})` returns a handle that is also a context
manager. Steering "at layer L" changes the output of block L, so
`hidden_states[L]` (and everything after it) sees the change; L = 0 changes the
embedding output (the input of block 1). Handles compose: two active handles
both add.

Positions, and what they mean during cached generation:
- `all`: every token of every forward pass (prompt and generated tokens).
- `prompt`: only tokens of the prompt. In `generate` that is the prefill pass;
  generated tokens are not steered, but they attend to the steered prompt.
- `response`: only generated tokens. In `generate` that is every decode step
  (a forward pass that extends a non-empty KV cache); the prefill is untouched.
In a plain forward without a cache (training, scoring a full chat), a pass
counts as prompt unless a `token_mask` [batch, seq] (1 = response token) is
set with `handle.set_token_mask`, which splits it.

Padding positions (attention mask 0) are never steered.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import PersonavecError
from .models import decoder_blocks, decoder_stack, is_engine, n_layers

STEER_POSITIONS = ("all", "prompt", "response")


def check_steering(model, deltas: dict[int, torch.Tensor], positions: str) -> None:
    if positions not in STEER_POSITIONS:
        raise PersonavecError(f"--position {positions!r}: use one of {', '.join(STEER_POSITIONS)}")
    total = n_layers(model)
    for layer, delta in deltas.items():
        if not 0 <= layer <= total:
            raise PersonavecError(f"--layer {layer} is out of range: this model has layers 0..{total}")
        if not torch.isfinite(delta).all():
            raise PersonavecError(f"the steering vector at layer {layer} contains NaN or inf")


class SteeringHandle:
    """Live hooks that add vectors; `remove()` (or leaving the `with` block) takes them off."""

    def __init__(self, model, deltas: dict[int, torch.Tensor], positions: str = "all"):
        check_steering(model, deltas, positions)
        self.positions = positions
        self.deltas = {layer: delta.detach().float() for layer, delta in deltas.items()}
        self.token_mask: torch.Tensor | None = None
        self._attention: torch.Tensor | None = None
        self._decoding = False
        self._cast: dict[tuple, torch.Tensor] = {}
        self._handles = []
        try:
            blocks = decoder_blocks(model)
            self._handles.append(decoder_stack(model).register_forward_pre_hook(self._see_inputs, with_kwargs=True))
            for layer in self.deltas:
                if layer == 0:
                    self._handles.append(blocks[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True))
                else:
                    # prepend: transformers records hidden_states with its own forward hooks, which must see our change
                    self._handles.append(blocks[layer - 1].register_forward_hook(self._post_hook(layer), prepend=True))
        except BaseException:
            self.remove()
            raise

    # -- hooks -------------------------------------------------------------
    def _see_inputs(self, module, args, kwargs):
        self._attention = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        self._decoding = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0

    def _delta(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        key = (layer, like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self.deltas[layer].to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    def _weights(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Per-token 0/1 weights [batch, seq, 1], or None for 'every token'."""
        seq = hidden.shape[1]
        if self.positions == "all" or (self.positions == "response" and self._decoding):
            weights = None
        elif self.positions == "prompt" and self._decoding:
            return torch.zeros(hidden.shape[:2] + (1,), dtype=hidden.dtype, device=hidden.device)
        elif self.token_mask is not None:
            mask = self.token_mask.to(hidden.device, hidden.dtype)[:, -seq:]
            weights = (mask if self.positions == "response" else 1 - mask).unsqueeze(-1)
        else:  # a plain pass with no token mask counts as prompt
            weights = None if self.positions == "prompt" else torch.zeros(hidden.shape[:2] + (1,), dtype=hidden.dtype, device=hidden.device)
        attention = self._attention
        # Decode steps add real tokens only (padding is on the left), so only full passes need the padding check.
        if self._decoding or not isinstance(attention, torch.Tensor):
            return weights
        if attention.dim() == 2 and attention.shape[1] >= seq and not bool(attention[:, -seq:].all()):
            pad = attention[:, -seq:].to(hidden.dtype).unsqueeze(-1)
            weights = pad if weights is None else weights * pad
        return weights

    def _steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        delta = self._delta(layer, hidden)
        weights = self._weights(hidden)
        return hidden + delta if weights is None else hidden + weights * delta

    def _post_hook(self, layer: int):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self._steer(layer, output[0]),) + tuple(output[1:])
            return self._steer(layer, output)
        return hook

    def _pre_hook(self, module, args, kwargs):
        if args:
            return (self._steer(0, args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._steer(0, kwargs["hidden_states"])}

    # -- lifecycle ---------------------------------------------------------
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        self.token_mask = mask

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class AblationHandle(SteeringHandle):
    """Live hooks that project a direction out of the residual stream: `h <- h - (h . u) u` for the unit `u` of each
    layer (CAFT, concept-ablation fine-tuning). Same positions, padding rule and lifecycle as steering."""

    def __init__(self, model, directions: dict[int, torch.Tensor], positions: str = "all"):
        units = {layer: d.float() / d.float().norm().clamp(min=1e-12) for layer, d in directions.items()}
        super().__init__(model, units, positions)

    def _steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        unit = self._delta(layer, hidden)
        weights = self._weights(hidden)
        removed = (hidden @ unit).unsqueeze(-1) * unit
        return hidden - removed if weights is None else hidden - weights * removed


def ablate_directions(model, directions: dict[int, torch.Tensor], positions: str = "all") -> AblationHandle:
    """Start projecting `directions[layer]` out of the output of each block; a context manager like `add_vectors`."""
    return AblationHandle(model, directions, positions)


class EngineSteeringHandle:
    """Steering on a vLLM engine: every request sent while the handle is active carries these deltas."""

    def __init__(self, engine, deltas: dict[int, torch.Tensor], positions: str = "all"):
        from .vllm_engine import Steering

        check_steering(engine, deltas, positions)
        self.engine = engine
        self.deltas = {layer: delta.detach().float() for layer, delta in deltas.items()}
        self.steering = Steering(self.deltas, positions)
        engine.active.append(self.steering)

    def set_token_mask(self, mask) -> None:
        raise PersonavecError("token masks (training) need the transformers model; use --engine hf")

    def remove(self) -> None:
        if self.steering in self.engine.active:
            self.engine.active.remove(self.steering)

    def __enter__(self) -> "EngineSteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def add_vectors(model, deltas: dict[int, torch.Tensor], positions: str = "all") -> SteeringHandle:
    """Start adding `deltas[layer]` to the output of each block; use as a context manager or call `.remove()`."""
    if is_engine(model):
        return EngineSteeringHandle(model, deltas, positions)
    return SteeringHandle(model, deltas, positions)


@contextmanager
def steer(model, vector: torch.Tensor, layer: int, coef: float, positions: str = "all"):
    """Add `coef * vector` at one layer for the duration of the `with` block."""
    with add_vectors(model, {layer: coef * vector.float()}, positions) as handle:
        yield handle
