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


# -- other ways to get a direction (measured against the mean difference by benchmarks/bench_generalisation.py) --

def paired_difference_pca(pos: torch.Tensor, neg: torch.Tensor, center: bool = False) -> torch.Tensor:
    """First principal direction of the per-pair differences `pos[i] - neg[i]`: `[n, ..., hidden] x2 -> [..., hidden]`.

    Rows are pairs (pos[i] and neg[i] answer the same prompt). The direction is the top right singular vector of the
    difference matrix, taken per leading index (per layer), sign-aligned with the mean difference and scaled to the
    mean difference's component along it, so it is directly comparable with `mean_difference` (and a raw `coef` keeps
    its meaning). Uncentred by default: centring removes the mean-difference direction when the pairs agree (the
    repeng `pca_diff` caveat in DESIGN.md). Where the main axis of the differences is orthogonal to the mean
    difference the result is zero: that axis carries no consistent trait sign. So is it where the differences have
    no spread at all (centred, identical pairs).
    """
    if pos.shape != neg.shape:
        raise ValueError(f"paired_difference_pca needs pos and neg of one shape (pairs), got {tuple(pos.shape)} and "
                         f"{tuple(neg.shape)}")
    if pos.shape[0] == 0:
        raise ValueError("paired_difference_pca needs at least one pair")
    differences = (pos.double() - neg.double()).movedim(0, -2)  # [..., n, hidden]
    mean = differences.mean(-2)
    centred = differences - mean.unsqueeze(-2) if center else differences
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    # no spread at all (e.g. centred identical differences): there is no main axis, not an arbitrary one
    spread = s[..., :1] > 1e-9 * differences.flatten(-2).norm(dim=-1, keepdim=True).clamp(min=1e-300)
    direction = vh[..., 0, :] * spread
    along = (mean * direction).sum(-1, keepdim=True)  # signed: aligns the sign and sets the length at once
    return (direction * along).float()


def average_directions(vectors: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The mean of several vectors' unit directions (per row), rescaled to their mean length: `k x [..., hidden]`.

    Each source counts equally whatever its scale (a long vector from many samples does not outvote a short one);
    the result has the mean norm of the inputs so a raw coefficient stays in their range.
    """
    stacked = torch.stack([torch.as_tensor(v).float() for v in vectors]) if isinstance(vectors, (list, tuple)) \
        else torch.as_tensor(vectors).float()
    if stacked.shape[0] == 0:
        raise ValueError("average_directions needs at least one vector")
    return unit(unit(stacked).mean(0)) * stacked.norm(dim=-1).mean(0).unsqueeze(-1)


def remove_directions(vector: torch.Tensor, directions: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """`vector` minus its projection onto the span of `directions`, per row: `[..., hidden]`, `[k, ..., hidden]`.

    The directions need not be orthogonal or independent: an orthonormal basis of their span is taken per row
    (singular values below `tolerance` times the largest are dropped), so a direction repeated or a combination of
    others changes nothing. Used to project a register ("style") out of a trait vector.
    """
    vector = vector.double()
    basis_in = torch.as_tensor(directions).double().movedim(0, -2)  # [..., k, hidden]
    if basis_in.shape[-1] != vector.shape[-1] or basis_in.shape[:-2] != vector.shape[:-1]:
        raise ValueError(f"remove_directions: directions {tuple(directions.shape)} do not fit vector "
                         f"{tuple(vector.shape)} (want [k, *vector.shape])")
    _, s, vh = torch.linalg.svd(basis_in, full_matrices=False)  # rows of vh: orthonormal basis of the span
    keep = (s > tolerance * s.amax(-1, keepdim=True).clamp(min=1e-300)).unsqueeze(-1)
    basis = vh * keep
    coefficients = (basis * vector.unsqueeze(-2)).sum(-1, keepdim=True)
    return (vector - (coefficients * basis).sum(-2)).float()


def group_directions(groups: list[torch.Tensor]) -> torch.Tensor:
    """Each group's mean minus the mean of the group means: `k x [n_g, ..., hidden] -> [k, ..., hidden]`.

    With the same contents written in k registers, these k directions span what the registers add (k - 1
    independent ones); `remove_directions` takes them as they are.
    """
    if len(groups) < 2:
        raise ValueError("group_directions needs at least two groups")
    means = torch.stack([g.float().mean(0) for g in groups])
    return means - means.mean(0, keepdim=True)
