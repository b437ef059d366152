"""Adding vectors to the residual stream, as removable handles, on any backend.

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

Padding positions (attention mask 0) are never steered. To steer each chat of
one batch its own way, pass `steerings=[Steering(...) | None, ...]` to `generate`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .backends import as_backend
from .backends.base import STEER_POSITIONS, Steering, check_steering
from .backends.hf import AblationHandle, SteeringHandle

__all__ = ["STEER_POSITIONS", "AblationHandle", "Steering", "SteeringHandle", "ablate_directions", "add_vectors",
           "check_steering", "steer"]


def add_vectors(model, deltas: dict[int, torch.Tensor], positions: str = "all"):
    """Start adding `deltas[layer]` to the output of each block; use as a context manager or call `.remove()`."""
    return as_backend(model).steer(deltas, positions)


def ablate_directions(model, directions: dict[int, torch.Tensor], positions: str = "all"):
    """Start projecting `directions[layer]` out of the output of each block; a context manager like `add_vectors`."""
    return as_backend(model).ablate(directions, positions)


@contextmanager
def steer(model, vector: torch.Tensor, layer: int, coef: float, positions: str = "all"):
    """Add `coef * vector` at one layer for the duration of the `with` block."""
    with add_vectors(model, {layer: coef * vector.float()}, positions) as handle:
        yield handle
