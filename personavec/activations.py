"""Per-chat activations, reduced as soon as they are computed: the library call over any backend.

One forward pass per batch captures, at the chosen layers, the response-token
mean, the prompt-token mean and the last prompt token of every chat. Layer L
follows DESIGN.md: L = 0 is the embedding output, L = i is the output of block i,
exactly `hidden_states[L]` of a transformers forward pass. That includes the
last layer, where transformers reports the output *after* the final norm; we
apply the same norm there.

Speed comes from three things (see `backends/hf.py`): the LM head is never run,
the forward stops after the deepest layer asked for (early exit), and chats are
batched by length with right padding so that no padding token shifts the
positions of real ones.
"""

from __future__ import annotations

from .backends import as_backend
from .backends.base import POSITIONS, Activations

__all__ = ["POSITIONS", "Activations", "capture"]


def capture(
    model,
    tokenizer,
    chats: list[list[dict]],
    layers: list[int] | None = None,
    positions: tuple[str, ...] = POSITIONS,
    batch_size: int = 16,
    max_batch_tokens: int | None = 8192,
    max_length: int | None = None,
    show_progress: bool = True,
) -> Activations:
    """Capture per-chat activations at `layers` (default: all, 0..n_layers) with a transformers model or a backend.

    Chats with a final assistant message get response spans; `response_avg`
    needs one in every chat. Chats longer than `max_length` tokens (default:
    the model's context) are skipped and listed in `Activations.skipped`.
    """
    return as_backend(model, tokenizer).capture(chats, layers, positions, batch_size=batch_size,
                                                max_batch_tokens=max_batch_tokens, max_length=max_length,
                                                show_progress=show_progress)
