"""The batched log-domain Sinkhorn against a plain float64 reference and POT: marginals, plans, masks, gradients."""
from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from affectprep.models.layers import cosine_cost, sinkhorn


def reference_plan(cost: np.ndarray, a: np.ndarray, b: np.ndarray, epsilon: float,
                   iterations: int = 5000) -> np.ndarray:
    """Textbook Sinkhorn-Knopp on one problem: plain kernel, float64, many iterations."""
    kernel = np.exp(-cost / epsilon)
    u = np.ones_like(a)
    for _ in range(iterations):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def random_problem(batch: int, n: int, m: int, seed: int, dim: int = 16):
    """Cosine costs between random token features, and random positive weights (not normalised)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, n, dim, generator=generator)
    visual = torch.randn(batch, m, dim, generator=generator)
    a = torch.rand(batch, n, generator=generator) + 0.1
    b = torch.rand(batch, m, generator=generator) + 0.1
    return cosine_cost(text, visual), a, b


def normalised(weights: torch.Tensor) -> np.ndarray:
    weights = weights.double().numpy()
    return weights / weights.sum()


@pytest.mark.parametrize("shape", [(4, 6, 9), (1, 3, 11), (2, 10, 4)])
def test_matches_plain_reference(shape):
    cost, a, b = random_problem(*shape, seed=sum(shape))
    plans = sinkhorn(cost, a, b, epsilon=0.1, iterations=2000)
    assert plans.shape == shape and plans.dtype == torch.float32
    for k in range(shape[0]):
        a_k, b_k = normalised(a[k]), normalised(b[k])
        plan = plans[k].double().numpy()
        assert np.abs(plan.sum(axis=1) - a_k).max() < 1e-5
        assert np.abs(plan.sum(axis=0) - b_k).max() < 1e-5
        expected = reference_plan(cost[k].double().numpy(), a_k, b_k, epsilon=0.1)
        assert np.abs(plan - expected).max() < 1e-4


@pytest.mark.parametrize("solver", [ot.sinkhorn, ot.bregman.sinkhorn_log])
def test_matches_pot(solver):
    cost, _, _ = random_problem(3, 8, 13, seed=7)
    plans = sinkhorn(cost, epsilon=0.05, iterations=1000, tol=1e-9)
    for k in range(3):
        expected = solver(np.full(8, 1 / 8), np.full(13, 1 / 13), cost[k].double().numpy(), 0.05,
                          numItermax=1000, stopThr=1e-9)
        assert np.abs(plans[k].double().numpy() - expected).max() < 1e-4


def test_first_iterations_follow_pot_step_by_step():
    # Same start and update order as POT's log-domain solver, so even an unconverged plan matches it.
    cost, a, b = random_problem(2, 5, 7, seed=3)
    plans = sinkhorn(cost.double(), a.double(), b.double(), epsilon=0.02, iterations=3, tol=None)
    for k in range(2):
        expected = ot.bregman.sinkhorn_log(normalised(a[k]), normalised(b[k]), cost[k].double().numpy(), 0.02,
                                   numItermax=3, stopThr=0.0, warn=False)
        assert np.abs(plans[k].numpy() - expected).max() < 1e-12


def test_padding_is_ignored_and_gets_no_mass():
    cost, a, b = random_problem(2, 7, 10, seed=11)
    mask_a = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    mask_b = torch.tensor([[True] * 6 + [False] * 4, [True] * 9 + [False]])
    # Padding features often produce garbage costs; the weights there are not zero either.
    cost = cost.clone()
    cost[0, 4:, :] = float("nan")
    cost[0, :, 6:] = float("inf")
    plans = sinkhorn(cost, a, b, epsilon=0.1, iterations=2000, mask_a=mask_a, mask_b=mask_b)

    assert torch.isfinite(plans).all()
    assert (plans[0, 4:, :] == 0).all() and (plans[0, :, 6:] == 0).all() and (plans[1, :, 9:] == 0).all()
    for k, (rows, cols) in enumerate([(4, 6), (7, 9)]):
        a_k, b_k = normalised(a[k, :rows]), normalised(b[k, :cols])
        real = plans[k, :rows, :cols].double().numpy()
        assert np.abs(real.sum(axis=1) - a_k).max() < 1e-5
        assert np.abs(real.sum(axis=0) - b_k).max() < 1e-5
        expected = reference_plan(cost[k, :rows, :cols].double().numpy(), a_k, b_k, epsilon=0.1)
        assert np.abs(real - expected).max() < 1e-4


def test_uniform_marginals_renormalise_over_real_tokens():
    cost, _, _ = random_problem(1, 5, 8, seed=5)
    mask_a = torch.tensor([[True, True, False, True, False]])
    plan = sinkhorn(cost, epsilon=0.1, iterations=500, mask_a=mask_a)[0]
    np.testing.assert_allclose(plan.sum(dim=1).numpy(), [1 / 3, 1 / 3, 0, 1 / 3, 0], atol=1e-6)
    np.testing.assert_allclose(plan.sum(dim=0).numpy(), np.full(8, 1 / 8), atol=1e-5)


def test_gradcheck_through_the_iterations():
    cost, a, b = random_problem(2, 3, 4, seed=13)
    cost = cost.double().requires_grad_()
    a = a.double().requires_grad_()
    mask_b = torch.tensor([[True, True, True, False], [True] * 4])
    # A fixed number of iterations: an early stop could fall on a different step for the perturbed inputs.
    def solve(cost, a):
        return sinkhorn(cost, a, b.double(), epsilon=0.2, iterations=30, tol=None, mask_b=mask_b)
    assert torch.autograd.gradcheck(solve, (cost, a))


def test_gradients_reach_the_features_of_real_tokens_only():
    generator = torch.Generator().manual_seed(17)
    text = torch.randn(2, 6, 32, generator=generator, requires_grad=True)
    visual = torch.randn(2, 9, 32, generator=generator, requires_grad=True)
    mask_b = torch.tensor([[True] * 7 + [False] * 2, [True] * 9])
    cost = cosine_cost(text, visual)
    plans = sinkhorn(cost, epsilon=0.05, mask_b=mask_b)
    (plans * cost).sum().backward()
    assert torch.isfinite(text.grad).all() and torch.isfinite(visual.grad).all()
    assert text.grad.abs().sum() > 0 and visual.grad[:, :7].abs().sum() > 0
    assert (visual.grad[0, 7:] == 0).all()


@pytest.mark.parametrize("epsilon", [0.01, 0.002])
def test_tiny_epsilon_stays_finite_where_the_plain_kernel_underflows(epsilon):
    cost, a, b = random_problem(3, 8, 12, seed=19)
    assert (torch.exp(-cost / epsilon) == 0).any()  # the plain-domain solver would divide by zero here
    plans = sinkhorn(cost, a, b, epsilon=epsilon, iterations=3000)
    assert torch.isfinite(plans).all()
    for k in range(3):
        assert np.abs(plans[k].sum(dim=1).double().numpy() - normalised(a[k])).max() < 1e-5
        assert np.abs(plans[k].sum(dim=0).double().numpy() - normalised(b[k])).max() < 1e-4


def test_bfloat16_input_is_solved_in_float32():
    cost, a, b = random_problem(2, 6, 10, seed=23)
    low = cost.bfloat16()
    plans = sinkhorn(low, a.bfloat16(), b.bfloat16(), epsilon=0.05, iterations=500)
    assert plans.dtype == torch.float32
    expected = sinkhorn(low.float(), a.bfloat16().float(), b.bfloat16().float(), epsilon=0.05, iterations=500)
    torch.testing.assert_close(plans, expected, rtol=0, atol=1e-7)


def test_cosine_cost_keeps_full_precision_under_autocast():
    generator = torch.Generator().manual_seed(29)
    text = torch.randn(1, 4, 8, generator=generator)
    visual = torch.cat([torch.randn(1, 5, 8, generator=generator), torch.zeros(1, 1, 8)], dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = cosine_cost(text.bfloat16(), visual.bfloat16())
    assert cost.dtype == torch.float32
    assert (cost[0, :, 5] == 1).all()  # a zero (padding) vector is at distance 1, not NaN
    expected = 1 - torch.nn.functional.cosine_similarity(text[0, :, None], visual[0, None, :5], dim=-1)
    torch.testing.assert_close(cost[0, :, :5], expected, rtol=0, atol=2e-2)


def test_early_stop_happens_at_the_first_check_once_converged():
    cost, _, _ = random_problem(2, 5, 6, seed=31)
    loose = sinkhorn(cost, epsilon=0.5, iterations=1000, tol=1e-1)
    ten_steps = sinkhorn(cost, epsilon=0.5, iterations=10, tol=None)
    assert torch.equal(loose, ten_steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    cost, a, b = random_problem(4, 9, 14, seed=37)
    mask_a = torch.ones(4, 9, dtype=torch.bool)
    mask_a[1, 6:] = False
    on_cpu = sinkhorn(cost, a, b, epsilon=0.05, iterations=500, mask_a=mask_a)
    on_gpu = sinkhorn(cost.cuda(), a.cuda(), b.cuda(), epsilon=0.05, iterations=500, mask_a=mask_a.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda c: sinkhorn(c[0]), "batch of cost matrices"),
    (lambda c: sinkhorn(c, a=torch.ones(2, 4)), "a must have shape"),
    (lambda c: sinkhorn(c, b=-torch.ones(2, 5)), "negative weights in problems [0, 1]"),
    (lambda c: sinkhorn(c, mask_a=torch.tensor([[True] * 3, [False] * 3])), "problems [1] have no real rows"),
    (lambda c: sinkhorn(c, a=torch.tensor([[1.0, 1, 1], [0, 0, 0]])), "problems [1] have no real rows"),
    (lambda c: sinkhorn(torch.where(torch.arange(5) == 2, torch.nan, c)), "NaN or infinite"),
    (lambda c: sinkhorn(c, epsilon=0.0), "epsilon must be"),
    (lambda c: sinkhorn(c, iterations=0), "iterations must be"),
    (lambda c: cosine_cost(torch.ones(2, 3, 4), torch.ones(2, 5, 6)), "same batch size and feature size"),
])
def test_bad_input_raises_a_clear_error(call, message):
    cost, _, _ = random_problem(2, 3, 5, seed=41)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(cost)
