"""The direction variants in vecmath (paired-difference PCA, averaging, style projection) against hand computations."""

import math

import pytest
import torch

from personavec.vecmath import (average_directions, group_directions, mean_difference, paired_difference_pca,
                                remove_directions)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_paired_pca_is_the_main_axis_of_the_differences_scaled_to_the_mean():
    # differences (3, 1) and (3, -1): D^T D = [[18, 0], [0, 2]], main axis (1, 0); mean (3, 0) -> 3 along it
    neg = t([0, 0], [1, 1])
    pos = neg + t([3, 1], [3, -1])
    torch.testing.assert_close(paired_difference_pca(pos, neg), torch.tensor([3.0, 0.0]))
    # differences (2, 2) and (-1, -1): axis (1, 1)/sqrt 2; mean (0.5, 0.5) lies on it
    torch.testing.assert_close(paired_difference_pca(t([2, 2], [-1, -1]), t([0, 0], [0, 0])), torch.tensor([0.5, 0.5]))


def test_paired_pca_sign_follows_the_mean_difference():
    out = paired_difference_pca(t([-2, 0], [-4, 0]), t([0, 0], [0, 0]))
    torch.testing.assert_close(out, torch.tensor([-3.0, 0.0]))


def test_paired_pca_axis_orthogonal_to_the_mean_gives_zero():
    # differences (1, 3), (1, -3), (3, 0): D^T D = [[11, 0], [0, 18]], axis (0, 1); mean (5/3, 0) has no part on it
    out = paired_difference_pca(t([1, 3], [1, -3], [3, 0]), torch.zeros(3, 2))
    torch.testing.assert_close(out, torch.zeros(2), atol=1e-6, rtol=0)


def test_paired_pca_centred_uses_the_spread_around_the_mean():
    # differences (0,0), (4,0), (2,1), (2,-1): mean (2, 0); centred (-2,0), (2,0), (0,1), (0,-1): x-variance wins
    d = t([0, 0], [4, 0], [2, 1], [2, -1])
    torch.testing.assert_close(paired_difference_pca(d, torch.zeros(4, 2), center=True), torch.tensor([2.0, 0.0]))
    # identical differences: centring leaves nothing, the uncentred direction is the mean difference itself
    same = t([1, 2], [1, 2], [1, 2])
    torch.testing.assert_close(paired_difference_pca(same, torch.zeros(3, 2)), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(paired_difference_pca(same, torch.zeros(3, 2), center=True), torch.zeros(2),
                               atol=1e-6, rtol=0)


def test_paired_pca_works_per_layer_and_checks_shapes():
    pos, neg = torch.randn(7, 4, 5), torch.randn(7, 4, 5)
    out = paired_difference_pca(pos, neg)
    assert out.shape == (4, 5)
    for layer in range(4):
        torch.testing.assert_close(out[layer], paired_difference_pca(pos[:, layer], neg[:, layer]))
        # never pointing against the mean difference
        assert (out[layer] @ mean_difference(pos[:, layer], neg[:, layer])) >= 0
    with pytest.raises(ValueError, match="one shape"):
        paired_difference_pca(pos, neg[:6])


def test_average_directions_weighs_sources_equally_and_keeps_the_mean_length():
    out = average_directions([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])
    torch.testing.assert_close(out, torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2)]))
    # per layer: row 0 from (1,0) and (1,0); row 1 from (0,2) and (2,0)
    layers = average_directions([t([1, 0], [0, 2]), t([1, 0], [2, 0])])
    torch.testing.assert_close(layers, t([1, 0], [math.sqrt(2), math.sqrt(2)]))


def test_remove_directions_by_hand():
    v = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(remove_directions(v, t([1, 0, 0])), torch.tensor([0.0, 2.0, 3.0]))
    # two non-orthogonal directions spanning the x-y plane
    torch.testing.assert_close(remove_directions(v, t([1, 0, 0], [1, 1, 0])), torch.tensor([0.0, 0.0, 3.0]),
                               atol=1e-6, rtol=0)
    # a repeated (dependent) direction removes nothing more
    torch.testing.assert_close(remove_directions(v, t([1, 0, 0], [2, 0, 0])), torch.tensor([0.0, 2.0, 3.0]),
                               atol=1e-6, rtol=0)


def test_remove_directions_per_layer_leaves_the_rest_orthogonal():
    v = torch.randn(3, 6)
    dirs = torch.randn(2, 3, 6)
    out = remove_directions(v, dirs)
    for layer in range(3):
        for k in range(2):
            assert abs(float(out[layer] @ dirs[k, layer])) < 1e-4
    with pytest.raises(ValueError, match="do not fit"):
        remove_directions(v, torch.randn(2, 6))


def test_group_directions_are_group_means_around_their_mean():
    a, b, c = t([0, 0], [2, 0]), t([0, 4], [0, 2]), t([3, 3], [3, 3])  # means (1,0), (0,3), (3,3); their mean (4/3, 2)
    out = group_directions([a, b, c])
    torch.testing.assert_close(out, t([-1 / 3, -2], [-4 / 3, 1], [5 / 3, 1]))
    # removing them from a vector leaves only what no group mean differs in
    v = torch.tensor([5.0, 7.0])
    torch.testing.assert_close(remove_directions(v, out), torch.zeros(2), atol=1e-5, rtol=0)
