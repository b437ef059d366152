"""The math of persona vectors: pure functions over tensors, no model involved."""

from __future__ import annotations

import torch


def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg) over the first axis, in float32: `[n, ...] -> [...]`."""
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError("mean_difference needs at least one positive and one negative sample")
    return pos.float().mean(0) - neg.float().mean(0)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """The vector divided by its L2 norm along the last axis (a zero vector stays zero)."""
    vector = vector.float()
    return vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def project(activations: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Scalar projection of each activation onto the unit vector: `a . v / |v|`."""
    return activations.float() @ unit(vector)


def projection_difference(data: torch.Tensor, base: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Per-sample `(a(x, y_data) - a(x, y_base)) . v_hat`; its mean is the paper's dataset-level delta P."""
    return project(data.float() - base.float(), vector)


def layer_incremental(vectors: torch.Tensor) -> torch.Tensor:
    """`v[L] - v[L-1]` for L >= 1 (row 0 stays v[0]): what each block adds to the direction."""
    out = vectors.float().clone()
    out[1:] = vectors[1:].float() - vectors[:-1].float()
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis."""
    return (unit(a) * unit(b)).sum(-1)


def separation(pos_proj: torch.Tensor, neg_proj: torch.Tensor) -> float:
    """Cohen's d of two groups of projections: difference of means over the pooled standard deviation."""
    pos_proj, neg_proj = pos_proj.double(), neg_proj.double()
    n1, n2 = len(pos_proj), len(neg_proj)
    pooled = ((n1 - 1) * _var(pos_proj) + (n2 - 1) * _var(neg_proj)) / max(n1 + n2 - 2, 1)
    return float((pos_proj.mean() - neg_proj.mean()) / pooled.sqrt().clamp(min=1e-12))


def _var(x: torch.Tensor) -> torch.Tensor:
    return x.var(unbiased=True) if len(x) > 1 else x.new_zeros(())
