"""Batched generation with transformers (left padding, the model's chat template)."""

from __future__ import annotations

import torch

from .chat import prompt_text
from .models import is_engine
from .progress import progress_bar


@torch.no_grad()
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
    steerings: list | None = None,
) -> list[str]:
    """Answer each chat (its messages form the prompt). Greedy when temperature is 0.

    Chats are batched by prompt length; answers come back in input order.
    `on_batch(indices, answers)` is called after each batch (for appending to a
    run's JSONL as answers are produced). `steerings[i]` (a `vllm_engine.Steering`
    or None) steers chat i on its own; only the vLLM engine takes it (see `generate_each`).
    """
    if is_engine(model):
        return _engine_generate(model, chats, max_new_tokens, temperature, top_p, batch_size, seed, show_progress,
                                on_batch, steerings)
    if steerings is not None:
        raise ValueError("per-chat steerings need the vLLM engine; with transformers use generate_each")
    texts = [prompt_text(tokenizer, messages) for messages in chats]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    answers: list[str | None] = [None] * len(texts)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    if seed is not None:
        torch.manual_seed(seed)
    with progress_bar("generating", total=len(texts), enabled=show_progress) as advance:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                top_k=None, **({} if temperature > 0 else dict(temperature=None, top_p=None)), **sampling,
            )
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(indices, decoded):
                answers[i] = text.strip()
            if on_batch:
                on_batch(indices, [answers[i] for i in indices])
            advance(len(indices))
    return answers  # type: ignore[return-value]


def _engine_generate(engine, chats, max_new_tokens, temperature, top_p, batch_size, seed, show_progress, on_batch,
                     steerings=None) -> list[str]:
    """vLLM schedules its own batches; we hand it large chunks so `on_batch` still saves progress as it goes."""
    chunk = max(64, 4 * batch_size)
    answers: list[str] = []
    with progress_bar("generating (vllm)", total=len(chats), enabled=show_progress) as advance:
        for start in range(0, len(chats), chunk):
            indices = list(range(start, min(start + chunk, len(chats))))
            new = engine.generate([chats[i] for i in indices], max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=None if seed is None else seed + start,
                                  steering=None if steerings is None else [steerings[i] for i in indices],
                                  show_progress=False)
            answers += new
            if on_batch:
                on_batch(indices, new)
            advance(len(indices))
    return answers


def generate_each(model, tokenizer, chats: list[list[dict]], deltas: list[dict | None], positions: str = "all",
                  **kwargs) -> list[str]:
    """Answer chat i steered by `deltas[i]` ({layer: tensor} or None). The vLLM engine mixes them in one batch;
    with transformers, chats that share their steering are generated together."""
    from .steering import add_vectors

    if is_engine(model):
        from .vllm_engine import Steering

        return generate(model, tokenizer, chats, steerings=[Steering(d, positions) if d else None for d in deltas],
                        **kwargs)
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(deltas):
        groups.setdefault(id(d) if d else 0, []).append(i)
    answers: list[str | None] = [None] * len(chats)
    on_batch = kwargs.pop("on_batch", None)
    for indices in groups.values():
        d = deltas[indices[0]]

        def local_batch(local, new, indices=indices):
            if on_batch:
                on_batch([indices[j] for j in local], new)

        if d:
            with add_vectors(model, d, positions):
                new = generate(model, tokenizer, [chats[i] for i in indices], on_batch=local_batch, **kwargs)
        else:
            new = generate(model, tokenizer, [chats[i] for i in indices], on_batch=local_batch, **kwargs)
        for i, a in zip(indices, new):
            answers[i] = a
    return answers  # type: ignore[return-value]
