"""Batched generation with the model's chat template, on any backend, each chat optionally steered on its own."""

from __future__ import annotations

import math

from .backends import as_backend
from .backends.base import Steering
from .errors import PersonavecError, arg


def check_generation(max_new_tokens: int, temperature: float, batch_size: int) -> None:
    """Refuse settings that cannot generate: no tokens, no batch, a negative or non-finite temperature."""
    if max_new_tokens < 1:
        raise PersonavecError(f"{arg('max_new_tokens', max_new_tokens)}: give at least 1 token")
    if batch_size < 1:
        raise PersonavecError(f"{arg('batch_size', batch_size)}: give at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise PersonavecError(f"{arg('temperature', temperature)}: give a finite number >= 0 (0 = greedy)")


def prompt_lengths(tokenizer, chats: list[list[dict]]) -> list[int]:
    """Tokens of each chat's prompt as `generate` feeds it (the chat template with the generation prompt)."""
    from .chat import prompt_text

    return [len(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]) for messages in chats]


def over_context(model, tokenizer, chats: list[list[dict]], max_length: int | None = None) -> list[int]:
    """Indices of the chats whose prompt is longer than `max_length` tokens (default: the model's context).

    Generating from such a prompt runs the model far past what it was trained on (slowly, and to no use), so
    callers skip these chats and list them.
    """
    backend = as_backend(model, tokenizer)
    limit = max_length or backend.context_length
    if not limit:
        return []
    return [i for i, n in enumerate(prompt_lengths(backend.tokenizer, chats)) if n > limit]


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
    check_generation(max_new_tokens, temperature, batch_size)
    return as_backend(model, tokenizer).generate(
        chats, steerings, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        batch_size=batch_size, seed=seed, show_progress=show_progress, on_batch=on_batch)


def generate_each(model, tokenizer, chats: list[list[dict]], deltas: list[dict | None], positions: str = "all",
                  **kwargs) -> list[str]:
    """Answer chat i steered by `deltas[i]` ({layer: tensor} or None): `generate` with per-chat steerings."""
    return generate(model, tokenizer, chats, steerings=[Steering(d, positions) if d else None for d in deltas],
                    **kwargs)
