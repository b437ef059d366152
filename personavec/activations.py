"""Batched capture of hidden states, reduced per chat as soon as they are computed.

One forward pass per batch captures, at the chosen layers, the response-token
mean, the prompt-token mean and the last prompt token of every chat. Layer L
follows DESIGN.md: L = 0 is the embedding output, L = i is the output of block i,
exactly `hidden_states[L]` of a transformers forward pass. That includes the
last layer, where transformers reports the output *after* the final norm; we
apply the same norm there.

Speed comes from three things: the LM head is never run (we call the decoder
stack, not the causal LM), the forward stops after the deepest layer asked for
(early exit), and chats are batched by length with right padding so that no
padding token shifts the positions of real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .chat import EncodedChat, encode_chat
from .errors import PersonavecError
from .models import decoder_blocks, decoder_stack, final_norm, is_engine, n_layers
from .progress import progress_bar

POSITIONS = ("response_avg", "prompt_avg", "prompt_last")


@dataclass
class Activations:
    """Per-chat activations at `layers`: each tensor is float32 `[n_chats, len(layers), hidden]`."""

    layers: list[int]
    response_avg: torch.Tensor | None = None
    prompt_avg: torch.Tensor | None = None
    prompt_last: torch.Tensor | None = None
    # mean L2 norm of a response token (or of a prompt token, when no response) per chat and layer: [n_chats, len(layers)]
    token_norm: torch.Tensor | None = None
    skipped: list[int] = field(default_factory=list)  # chat indices dropped because they were too long

    @property
    def n_chats(self) -> int:
        return next(t.shape[0] for t in (self.response_avg, self.prompt_avg, self.prompt_last) if t is not None)

    def at(self, position: str) -> torch.Tensor:
        value = getattr(self, position, None)
        if value is None:
            raise PersonavecError(f"position {position!r} was not captured; choose from {', '.join(POSITIONS)}")
        return value

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: nothing later is needed."""


def check_layers(model, layers) -> list[int]:
    total = n_layers(model)
    if layers is None:
        return list(range(total + 1))
    layers = sorted(set(int(layer) for layer in layers))
    for layer in layers:
        if not 0 <= layer <= total:
            raise PersonavecError(f"--layer {layer} is out of range: this model has layers 0..{total}")
    return layers


def _batches(lengths: list[int], batch_size: int, max_tokens: int | None):
    """Indices grouped by similar length (long first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (max_tokens and longest * (len(batch) + 1) > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _pad_right(encoded: list[EncodedChat], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    prompt = torch.zeros((len(encoded), width), dtype=torch.float32)
    response = torch.zeros((len(encoded), width), dtype=torch.float32)
    last = torch.zeros(len(encoded), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        prompt[row, : e.prompt_len] = 1
        response[row, e.prompt_len : n] = 1
        last[row] = e.prompt_len - 1
    return {k: v.to(device) for k, v in
            dict(input_ids=ids, attention_mask=attention, prompt=prompt, response=response, last=last).items()}


@torch.no_grad()
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
    """Capture per-chat activations at `layers` (default: all, 0..n_layers).

    Chats with a final assistant message get response spans; `response_avg`
    needs one in every chat. Chats longer than `max_length` tokens (default:
    the model's context) are skipped and listed in `Activations.skipped`.
    """
    unknown = set(positions) - set(POSITIONS)
    if unknown:
        raise PersonavecError(f"unknown position(s) {sorted(unknown)}; choose from {', '.join(POSITIONS)}")
    layers = check_layers(model, layers)
    with_response = "response_avg" in positions
    encoded = [encode_chat(tokenizer, messages, with_response=with_response) for messages in chats]
    limit = max_length or getattr(model.config, "max_position_embeddings", None)
    skipped = [i for i, e in enumerate(encoded) if limit and len(e.input_ids) > limit]
    if with_response:
        empty = [i for i, e in enumerate(encoded) if e.response_len == 0]
        if empty:
            raise PersonavecError(f"chat {empty[0] + 1} has an empty response; response_avg needs at least one token")

    if is_engine(model):
        return _engine_capture(model, chats, encoded, layers, positions, skipped, batch_size, show_progress)
    device = next(model.parameters()).device
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
    results = {p: torch.zeros(len(chats), len(layers), hidden) for p in positions}
    token_norm = torch.zeros(len(chats), len(layers))
    skipped_set = set(skipped)
    keep = [i for i in range(len(chats)) if i not in skipped_set]

    blocks = decoder_blocks(model)
    norm = final_norm(model)
    total = len(blocks)
    deepest = max(layers)
    state: dict = {}

    mean_positions = [p for p in ("response_avg", "prompt_avg") if p in results]

    def record(layer: int, h: torch.Tensor) -> None:
        if layer == total and norm is not None:
            h = norm(h)  # hidden_states[-1] in transformers is after the final norm
        column = layers.index(layer)
        rows = state["rows"]
        if mean_positions:  # all span means of the batch in one fp32 matmul
            means = torch.bmm(state["mean_weights"], h.float()).cpu()
            for k, position in enumerate(mean_positions):
                results[position][rows, column] = means[:, k]
        if "prompt_last" in results:
            results["prompt_last"][rows, column] = h[torch.arange(h.shape[0]), state["last"]].float().cpu()
        # Norms only scale norm-relative coefficients, so the model's dtype is precise enough (0.3% in bf16)
        # and several times cheaper than an fp32 pass; the means above stay fp32.
        token_norms = torch.linalg.vector_norm(h, dim=-1).float()
        token_norm[rows, column] = (token_norms * state["norm_weights"]).sum(1).cpu()
        if layer == deepest:
            raise _StopForward

    def output_hook(layer):
        def hook(module, args, output):
            record(layer, output[0] if isinstance(output, tuple) else output)
        return hook

    def input_hook(module, args, kwargs):
        record(0, args[0] if args else kwargs["hidden_states"])

    handles = []
    try:
        for layer in layers:
            if layer == 0:
                handles.append(blocks[0].register_forward_pre_hook(input_hook, with_kwargs=True))
            else:
                handles.append(blocks[layer - 1].register_forward_hook(output_hook(layer)))
        stack = decoder_stack(model)
        lengths = [len(encoded[i].input_ids) for i in keep]
        with progress_bar("activations", total=len(keep), enabled=show_progress) as advance:
            for batch in _batches(lengths, batch_size, max_batch_tokens):
                rows = [keep[j] for j in batch]
                tensors = _pad_right([encoded[i] for i in rows], tokenizer.pad_token_id or 0, device)
                spans = {"response_avg": tensors["response"], "prompt_avg": tensors["prompt"]}
                weights = {k: m / m.sum(1, keepdim=True).clamp(min=1) for k, m in spans.items()}
                state.update(
                    rows=torch.tensor(rows), last=tensors["last"],
                    mean_weights=torch.stack([weights[p] for p in mean_positions], 1) if mean_positions else None,
                    norm_weights=weights["response_avg" if with_response else "prompt_avg"],
                )
                try:
                    stack(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], use_cache=False)
                except _StopForward:
                    pass
                advance(len(rows))
    finally:
        for handle in handles:
            handle.remove()

    return Activations(layers=layers, token_norm=token_norm, skipped=skipped, **results)


def _engine_capture(engine, chats, encoded, layers, positions, skipped, batch_size, show_progress) -> Activations:
    """The same readings through the vLLM engine's hooks (each chat is sent whole, one token is sampled and dropped)."""
    with_response = "response_avg" in positions
    results = {p: torch.zeros(len(chats), len(layers), engine.hidden_size) for p in positions}
    token_norm = torch.zeros(len(chats), len(layers))
    skipped_set = set(skipped)
    keep = [i for i in range(len(chats)) if i not in skipped_set]
    chunk = max(64, 4 * batch_size)
    with progress_bar("activations (vllm)", total=len(keep), enabled=show_progress) as advance:
        for start in range(0, len(keep), chunk):
            rows = keep[start : start + chunk]
            out, norms, _ = engine.capture_chats([chats[i] for i in rows], layers, with_response)
            for position, name in (("response_avg", "response"), ("prompt_avg", "prompt"), ("prompt_last", "last")):
                if position in results:
                    results[position][rows] = out[name]
            token_norm[rows] = norms
            advance(len(rows))
    return Activations(layers=layers, token_norm=token_norm, skipped=skipped, **results)
