"""The one protocol every pipeline stage (and the server) talks to, and the values that cross it.

A backend runs one model on one engine and offers four things:

- `generate(chats, steerings=None, ...)`: answers in input order; `steerings[i]` steers chat i alone, so one
  batch can mix steerings (every row has its own delta);
- `capture(chats, layers, positions, ...)`: per-chat `Activations` (response mean, prompt mean, last prompt
  token) at layers in DESIGN.md's numbering;
- `steer(deltas, positions)`: steering for every later call until the returned handle is removed;
- `n_layers`, `hidden_size`, `fingerprint()`, `tokenizer`, `context_length`.

Layer L = 0 is the embedding output and L = i the output of decoder block i, exactly `hidden_states[L]` of a
transformers forward pass, the last layer after the final norm. Steering at L adds to block L's output.
Positions: `all` steers every token; `prompt` the prompt tokens only (the prefill); `response` the generated
tokens only (decode steps). Padding is never steered.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field

import torch

from ..chat import EncodedChat, encode_chat
from ..errors import PersonavecError, arg

POSITIONS = ("response_avg", "prompt_avg", "prompt_last")
STEER_POSITIONS = ("all", "prompt", "response")
ENGINE_MODES = ("eager", "compiled")  # the vLLM engine's (`VllmBackend(engine_mode=...)`, `--engine-mode`)


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

    def kept(self) -> "Activations":
        """The same activations without the rows of skipped chats (which hold zeros): what means and counts use."""
        if not self.skipped:
            return self
        skipped = set(self.skipped)
        total = next(t.shape[0] for t in (self.response_avg, self.prompt_avg, self.prompt_last, self.token_norm)
                     if t is not None)
        rows = torch.tensor([i for i in range(total) if i not in skipped], dtype=torch.long)
        take = lambda t: None if t is None else t[rows]  # noqa: E731
        return Activations(layers=list(self.layers), response_avg=take(self.response_avg),
                           prompt_avg=take(self.prompt_avg), prompt_last=take(self.prompt_last),
                           token_norm=take(self.token_norm), skipped=[])


@dataclass(eq=False)  # compared by identity: equality over dicts of tensors is ambiguous
class Steering:
    """What one request (or batch row) adds: `deltas[L]` at layer L, on `positions` (all | prompt | response)."""

    deltas: dict[int, torch.Tensor]
    positions: str = "all"

    def key(self) -> tuple:
        """Equal exactly when two steerings add the same values: rows that share it share one table slot."""
        return (self.positions,) + tuple((layer, hashlib.sha1(d.float().contiguous().numpy().tobytes()).hexdigest())
                                         for layer, d in sorted(self.deltas.items()))


def check_steering(total_layers: int, deltas: dict[int, torch.Tensor], positions: str) -> None:
    if positions not in STEER_POSITIONS:
        raise PersonavecError(f"{arg('positions', repr(positions), flag='--position')}: use one of "
                              f"{', '.join(STEER_POSITIONS)}")
    for layer, delta in deltas.items():
        if not 0 <= layer <= total_layers:
            raise PersonavecError(f"{arg('layer', layer)} is out of range: this model has layers 0..{total_layers}")
        if not torch.isfinite(delta).all():
            raise PersonavecError(f"the steering vector at layer {layer} contains NaN or inf")


def check_layers(total_layers: int, layers) -> list[int]:
    """Sorted distinct layers to read; None means every layer 0..total_layers."""
    if layers is None:
        return list(range(total_layers + 1))
    layers = sorted(set(int(layer) for layer in layers))
    for layer in layers:
        if not 0 <= layer <= total_layers:
            raise PersonavecError(f"{arg('layer', layer)} is out of range: this model has layers 0..{total_layers}")
    return layers


def check_positions(positions) -> None:
    unknown = set(positions) - set(POSITIONS)
    if unknown:
        raise PersonavecError(f"unknown position(s) {sorted(unknown)}; choose from {', '.join(POSITIONS)}")


def encode_for_capture(tokenizer, chats: list[list[dict]], positions, limit: int | None) -> tuple[list[EncodedChat], list[int]]:
    """Token ids and spans of every chat, and the indices of chats longer than `limit` (skipped, never truncated)."""
    with_response = "response_avg" in positions
    encoded = [encode_chat(tokenizer, messages, with_response=with_response) for messages in chats]
    skipped = [i for i, e in enumerate(encoded) if limit and len(e.input_ids) > limit]
    if with_response:
        empty = [i for i, e in enumerate(encoded) if e.response_len == 0]
        if empty:
            raise PersonavecError(f"chat {empty[0] + 1} has an empty response; response_avg needs at least one token")
    return encoded, skipped


def distinct_steerings(steerings: list[Steering | None]) -> tuple[list[Steering], list[int]]:
    """The distinct steerings (by value) and, per entry, its slot: 0 for none, else 1 + index into the list."""
    unique: list[Steering] = []
    slot_of: dict[tuple, int] = {}
    slots = []
    for steering in steerings:
        if steering is None or not steering.deltas:
            slots.append(0)
            continue
        key = steering.key()
        if key not in slot_of:
            unique.append(steering)
            slot_of[key] = len(unique)
        slots.append(slot_of[key])
    return unique, slots


class Backend(abc.ABC):
    """One model on one engine. See the module docstring for the contract every implementation keeps."""

    engine: str = ""
    tokenizer = None
    name_or_path: str = ""

    @property
    @abc.abstractmethod
    def n_layers(self) -> int:
        """Decoder blocks; readable layers are 0..n_layers."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def context_length(self) -> int | None:
        """Longest chat in tokens; longer ones are skipped and listed, never truncated."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """`models.model_fingerprint` of the weights: the same checkpoint gives the same value on every engine."""

    @abc.abstractmethod
    def generate(self, chats: list[list[dict]], steerings: list[Steering | None] | None = None, *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16,
                 seed: int | None = 0, show_progress: bool = True, on_batch=None) -> list[str]:
        """Answer each chat (its messages form the prompt), greedy when temperature is 0, in input order.
        `on_batch(indices, answers)` is called as answers are produced (for appending to a run's JSONL)."""

    @abc.abstractmethod
    def capture(self, chats: list[list[dict]], layers: list[int] | None = None, positions: tuple[str, ...] = POSITIONS,
                *, batch_size: int = 16, max_batch_tokens: int | None = 8192, max_length: int | None = None,
                show_progress: bool = True) -> Activations:
        """Per-chat activations at `layers` (default: all). Chats longer than `max_length` (default: the
        context) are skipped and listed in `Activations.skipped`."""

    @abc.abstractmethod
    def steer(self, deltas: dict[int, torch.Tensor], positions: str = "all"):
        """Add `deltas[L]` at each layer L to every later call; returns a handle (`remove()`, or use `with`)."""

    def ablate(self, directions: dict[int, torch.Tensor], positions: str = "all"):
        """Project each direction out of the residual stream at its layer (CAFT); a handle like `steer`'s."""
        raise PersonavecError(f"ablation needs the transformers model; the {self.engine} engine cannot ablate")

    def transformers_model(self, what: str = "this step") -> torch.nn.Module:
        """The underlying transformers model, for steps only transformers can run (training, logit scoring)."""
        raise PersonavecError(f"{what} needs the transformers model; use {arg('engine', 'hf')}")
