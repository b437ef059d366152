"""Batched generation with transformers (left padding, the model's chat template)."""

from __future__ import annotations

import torch

from .chat import prompt_text
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
) -> list[str]:
    """Answer each chat (its messages form the prompt). Greedy when temperature is 0.

    Chats are batched by prompt length; answers come back in input order.
    `on_batch(indices, answers)` is called after each batch (for appending to a
    run's JSONL as answers are produced).
    """
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
