"""Batched generation with the model's chat template, on any backend, each chat optionally steered on its own."""

from __future__ import annotations

from .backends import as_backend
from .backends.base import Steering


def generate(
    model,
    tokenizer,
    chats: list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int | None = 0,
    show_progress: bool = True,
    on_batch=None,
    steerings: list[Steering | None] | None = None,
) -> list[str]:
    """Answer each chat (its messages form the prompt). Greedy when temperature is 0.

    Chats are batched by prompt length; answers come back in input order.
    `on_batch(indices, answers)` is called after each batch (for appending to a
    run's JSONL as answers are produced). `steerings[i]` (a `Steering` or None)
    steers chat i on its own, on top of any active handle; one batch mixes them.
    """
    return as_backend(model, tokenizer).generate(
        chats, steerings, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        batch_size=batch_size, seed=seed, show_progress=show_progress, on_batch=on_batch)


def generate_each(model, tokenizer, chats: list[list[dict]], deltas: list[dict | None], positions: str = "all",
                  **kwargs) -> list[str]:
    """Answer chat i steered by `deltas[i]` ({layer: tensor} or None): `generate` with per-chat steerings."""
    return generate(model, tokenizer, chats, steerings=[Steering(d, positions) if d else None for d in deltas],
                    **kwargs)
