"""Gradient sketches: the batched kernel equals the projection of explicitly built per-example gradients,
and the projection keeps inner products in expectation, with the variance the module states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_gradfilter.proxy.sketch import (
    LoraSketcher,
    lora_sketch,
    matrix_factors,
    projections,
    relative_variance,
    sketch_factors,
)


def explicit(a, g, p, q):
    """``vec(P^T G_b Q)`` with ``G_b = sum_t g_t a_t^T`` built as a matrix."""
    per_example = [sum(torch.outer(g[b, t], a[b, t]) for t in range(a.shape[1])) for b in range(a.shape[0])]
    return torch.stack([(p.T @ gb @ q).reshape(-1) for gb in per_example])


def test_sketch_kernel_equals_the_projection_of_explicit_per_example_gradients():
    torch.manual_seed(0)
    a, g = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
    (p, q), = projections([(4, 7)], 64, seed=1)
    torch.testing.assert_close(lora_sketch(a, g, p, q), explicit(a, g, p, q), rtol=1e-5, atol=1e-5)
    # one position per example ((B, d) inputs) and zero gradients at padded positions
    g[:, 3:] = 0
    torch.testing.assert_close(lora_sketch(a, g, p, q), explicit(a[:, :3], g[:, :3], p, q), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_sketch(a[:, 0], g[:, 0], p, q), explicit(a[:, :1], g[:, :1], p, q),
                               rtol=1e-5, atol=1e-5)


def test_sketcher_sums_matrices_and_divides_by_the_loss_factor():
    torch.manual_seed(0)
    mods = [torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(3, 5, bias=False)]
    sketcher = LoraSketcher(mods, 16, seed=2)
    sketcher.start(2, "cpu")
    assert sketcher.stop() is None  # not enabled: nothing sketched
    sketcher.enabled = True
    sketcher.start(2, "cpu")
    inputs = [(torch.randn(2, 4, 6), torch.randn(2, 4, 3)), (torch.randn(2, 4, 3), torch.randn(2, 4, 5))]
    for k, (a, g) in enumerate(inputs):
        sketcher.add(k, a, g)
    (p0, q0), (p1, q1) = projections([(3, 6), (5, 3)], 16, seed=2)
    want = (explicit(*inputs[0], p0, q0) + explicit(*inputs[1], p1, q1)) / 4.0
    torch.testing.assert_close(sketcher.stop(grad_scale=4.0), want, rtol=1e-5, atol=1e-5)


def test_projections_are_seeded_per_matrix():
    one = projections([(4, 7), (7, 4)], 64, seed=5)
    again = projections([(4, 7)], 64, seed=5)  # matrix 0 does not depend on what follows
    torch.testing.assert_close(one[0][1], again[0][1], rtol=0, atol=0)
    other = projections([(4, 7)], 64, seed=6)
    assert not torch.equal(one[0][1], other[0][1])


@pytest.mark.parametrize("dim, factors", [(256, (16, 16)), (512, (16, 32)), (1024, (32, 32)), (2048, (32, 64))])
def test_sketch_dims_split_into_two_near_equal_factors(dim, factors):
    assert sketch_factors(dim) == factors


@pytest.mark.parametrize("dim", [0, 3, 97, 2 * 101])
def test_lopsided_or_tiny_sketch_dims_are_refused(dim):
    with pytest.raises(ValueError, match="power of 2"):
        sketch_factors(dim)


@pytest.mark.parametrize("shape, exact", [((4, 24), "out"), ((24, 4), "in"), ((24, 40), None)])
def test_lora_rank_sides_are_kept_exactly_and_other_matrices_get_two_gaussians(shape, exact):
    d1, d2, side = matrix_factors(*shape, 64)
    assert side == exact and d1 * d2 == 64
    (p, q), = projections([shape], 64, seed=0)
    assert p.shape == (shape[0], d1) and q.shape == (shape[1], d2)
    if exact == "out":
        assert torch.equal(p, torch.eye(4))
    if exact == "in":
        assert torch.equal(q, torch.eye(4))


@pytest.mark.parametrize("shape", [(4, 24), (24, 4), (24, 40)])
def test_inner_products_are_kept_in_expectation_with_the_stated_variance(shape):
    rng = np.random.default_rng(0)
    # two "gradients", each 3 matrices of this shape (rank-limited, as LoRA's are)
    xs = [rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1])) for _ in range(3)]
    ys = [x + 0.8 * rng.standard_normal(x.shape) for x in xs]
    true = sum((x * y).sum() for x, y in zip(xs, ys))
    dots, norms = [], []
    for seed in range(2000):
        proj = [(p.double(), q.double()) for p, q in projections([shape] * 3, 64, seed)]
        sx = sum((p.T @ torch.from_numpy(x) @ q).reshape(-1) for (p, q), x in zip(proj, xs))
        sy = sum((p.T @ torch.from_numpy(y) @ q).reshape(-1) for (p, q), y in zip(proj, ys))
        dots.append(float(sx @ sy))
        p, q = proj[0]
        norms.append(float(((p.T @ torch.from_numpy(xs[0]) @ q) ** 2).sum()))
    dots, norms = np.array(dots), np.array(norms)
    assert abs(dots.mean() - true) < 4 * dots.std() / np.sqrt(len(dots))  # unbiased (4 standard errors)
    x = xs[0]
    n2, rho = (x**2).sum(), ((x @ x.T) ** 2).sum() / (x**2).sum() ** 2
    stated = relative_variance(*shape, 64, rho)
    assert abs(norms.mean() / n2 - 1) < 4 * np.sqrt(stated / len(norms))
    assert 0.8 < (norms.var() / n2**2) / stated < 1.2
