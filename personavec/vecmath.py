"""The math of persona vectors: pure functions over tensors, no model involved."""

from __future__ import annotations

import math

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


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (what Spearman and Mann-Whitney use)."""
    values = values.double().flatten()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    out = torch.empty_like(values)
    start = 0
    n = len(values)
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation; None with fewer than 2 points or a constant input."""
    x, y = torch.as_tensor(x).double().flatten(), torch.as_tensor(y).double().flatten()
    if len(x) < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return None if denominator == 0 else float((x @ y).item() / denominator)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation: Pearson over tie-averaged ranks."""
    return pearson(ranks(torch.as_tensor(x)), ranks(torch.as_tensor(y)))


def auroc(labels, scores) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting 1/2; None if a class is empty.

    Computed from ranks (Mann-Whitney U / (n_pos * n_neg)), so thousands of samples cost nothing.
    """
    labels = torch.as_tensor(labels).bool().flatten()
    scores = torch.as_tensor(scores).double().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = ranks(scores)[labels].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def layerwise_projection(differences: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Row L of `differences` projected on the unit of row L of `vectors`: `[layers, hidden] x2 -> [layers]`."""
    return (differences.float() * unit(vectors)).sum(-1)


def scale01(reading, neg_mean: float, pos_mean: float):
    """A reading on the 0..1 scale of a vector's own answers: 0 = like the trait-free ones, 1 = like the trait-showing."""
    return (reading - neg_mean) / (pos_mean - neg_mean)


def bootstrap_mean_ci(values: torch.Tensor, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the values with replacement)."""
    values = values.double().flatten()
    if values.numel() == 0:
        return (math.nan, math.nan)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, values.numel(), (n, values.numel()), generator=generator)
    means = values[picks].mean(1)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.double))
    return (float(low), float(high))


def paired_difference_ci(first: torch.Tensor, second: torch.Tensor, n: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """Mean of `second - first` over paired items and its bootstrap interval (items resampled as pairs)."""
    difference = second.double().flatten() - first.double().flatten()
    low, high = bootstrap_mean_ci(difference, n, level, seed)
    return (float(difference.mean()), low, high)
