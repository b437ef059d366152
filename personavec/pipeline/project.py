"""Projections of chats onto a persona vector at one layer: the reading side that monitor, screen and shift share."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..activations import capture
from ..backends import as_backend
from ..vecmath import project
from ..vectors import PersonaVector


@dataclass
class ChatProjections:
    """Scalar projections onto the unit vector at `layer`, one list per position, `nan` for skipped chats."""

    layer: int
    values: dict[str, list[float]]
    skipped: list[int] = field(default_factory=list)  # chat indices longer than the context limit

    def __getitem__(self, position: str) -> list[float]:
        return self.values[position]


def project_chats(model, tokenizer, chats: list[list[dict]], vector: PersonaVector, layer: int,
                  positions: tuple[str, ...] = ("prompt_last",), batch_size: int = 16, max_length: int | None = None,
                  show_progress: bool = True, label: str = "chats") -> ChatProjections:
    """Project each chat's activation at `layer` onto `vector`'s unit direction there (only blocks 1..layer run).

    The direction is always the main (response-average) vector, as in the paper,
    whichever token positions are read. Chats longer than `max_length` tokens
    (default: the model's context) are skipped with a warning and get `nan`.
    """
    vector.check_nonzero(layer)
    acts = capture(model, tokenizer, chats, layers=[layer], positions=positions, batch_size=batch_size,
                   max_length=max_length, show_progress=show_progress)
    direction = vector.vectors[layer]
    values = {}
    for position in positions:
        scores = project(acts.at(position)[:, 0], direction)
        if acts.skipped:
            scores[acts.skipped] = math.nan
        values[position] = scores.tolist()
    if acts.skipped:
        limit = max_length or as_backend(model).context_length
        warnings.warn(f"skipped {len(acts.skipped)} of {len(chats)} {label} longer than {limit} tokens "
                      f"(first: #{acts.skipped[0] + 1}); they get no score", stacklevel=2)
    return ChatProjections(layer=layer, values=values, skipped=list(acts.skipped))


def finite(values) -> torch.Tensor:
    """The non-nan entries as a float64 tensor."""
    t = torch.as_tensor(values, dtype=torch.float64)
    return t[~torch.isnan(t)]


def distribution(values) -> dict:
    """n, mean, std and quantiles of the finite values (None when there are none)."""
    t = finite(values)
    if len(t) == 0:
        return {"n": 0}
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": len(t), "mean": t.mean().item(), "std": t.std().item() if len(t) > 1 else 0.0, "min": t.min().item(),
            "p10": q[0], "median": q[1], "p90": q[2], "max": t.max().item()}
