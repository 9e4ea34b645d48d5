"""Batched entropic optimal transport: log-domain Sinkhorn over padded token sets.

GRACE aligns caption tokens with visual tokens by the plan P that minimises <P, C> - epsilon * H(P) with given
marginals. The solver works on the dual potentials (u, v) in log space, so exp(-C / epsilon) is never formed and a
small epsilon cannot underflow; it is plain differentiable torch (autograd unrolls the iterations), batched over
problems of one padded shape, with masks marking the real tokens of each problem.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

# The marginal error is measured every this many iterations (as POT does): each check waits for the device.
_CHECK_EVERY = 10


def cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise cosine distance 1 - cos(x_i, y_j): (B, N, D) and (B, M, D) -> (B, N, M), in [0, 2].

    Computed in float32 (float64 for float64 input) whatever the input or autocast precision: a bfloat16 cosine is
    only good to about 0.004, which epsilon = 0.05 would blow up to an 8% error in the Sinkhorn logits. Zero vectors
    (padding) get cost 1 rather than NaN.
    """
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"cosine_cost expects (B, N, D) and (B, M, D) features, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"cosine_cost needs the same batch size and feature size on both sides, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    dtype = _compute_dtype(x, y)
    with _full_precision(x.device):
        x = F.normalize(x.to(dtype), dim=-1)
        y = F.normalize(y.to(dtype), dim=-1)
        return 1 - x @ y.transpose(1, 2)


def sinkhorn(cost: Tensor, a: Tensor | None = None, b: Tensor | None = None, *, epsilon: float = 0.05,
             iterations: int = 100, tol: float | None = 1e-6, mask_a: Tensor | None = None,
             mask_b: Tensor | None = None) -> Tensor:
    """Entropic transport plans for a batch of problems: cost (B, N, M) -> plans (B, N, M).

    a (B, N) and b (B, M) are non-negative token weights (uniform when None); each is renormalised to sum 1 over the
    real tokens of its problem, so every plan carries a total mass of 1. mask_a (B, N) and mask_b (B, M) are True
    for real tokens: padded rows and columns get exactly zero mass, and whatever the cost holds there is ignored.
    Iterates at most `iterations` times, stopping early once every problem's column marginal is within `tol` (L2
    distance, POT's criterion; float32 potentials put a floor near 1e-7 under it); tol=None always runs all
    iterations. The row marginals are exact on return. The plan comes back in float32 (float64 for float64 input): bfloat16 cannot hold marginals to
    1e-5. Raises ValueError, naming the problems, for malformed input.
    """
    _check_arguments(cost, a, b, mask_a, mask_b, epsilon, iterations, tol)
    batch, n, m = cost.shape
    dtype = _compute_dtype(cost, *(t for t in (a, b) if t is not None))
    with _full_precision(cost.device):
        real_a = _real_tokens(mask_a, batch, n, cost.device)
        real_b = _real_tokens(mask_b, batch, m, cost.device)
        log_a = _log_marginal(a, real_a, dtype, "a", "rows")
        log_b = _log_marginal(b, real_b, dtype, "b", "columns")
        real_pairs = real_a[:, :, None] & real_b[:, None, :]
        _check_finite(cost, real_pairs)
        # Padded pairs may hold anything (NaN from padding features): a zero keeps it out of the sums and their
        # gradients, and the -inf potentials of padded tokens give those pairs zero mass anyway.
        log_kernel = torch.where(real_pairs, cost.to(dtype), 0.0) / -epsilon
        if _kernel_span(log_kernel, real_pairs) < _SCALING_SPAN[dtype]:
            return _sinkhorn_scaling(log_kernel, real_pairs, log_a, log_b, iterations, tol)
        # Zero potentials, as POT starts, except -inf on massless tokens so they never enter a logsumexp.
        u = torch.zeros_like(log_a).masked_fill(log_a == -torch.inf, -torch.inf)
        v = torch.zeros_like(log_b)
        for step in range(1, iterations + 1):
            v = log_b - torch.logsumexp(log_kernel + u[:, :, None], dim=1)
            u = log_a - torch.logsumexp(log_kernel + v[:, None, :], dim=2)
            if tol is not None and step % _CHECK_EVERY == 0 and _column_error(log_kernel, u, v, log_b) < tol:
                break
        return torch.exp(log_kernel + u[:, :, None] + v[:, None, :])


# Largest spread of -cost/epsilon within a problem for which exp() of the shifted kernel stays a normal number:
# there the same iterations run on scalings with batched matrix products, several times faster than logsumexp.
_SCALING_SPAN = {torch.float32: 80.0, torch.float64: 700.0}


def _kernel_span(log_kernel: Tensor, real_pairs: Tensor) -> float:
    with torch.no_grad():
        high = log_kernel.masked_fill(~real_pairs, -torch.inf).amax(dim=(1, 2))
        low = log_kernel.masked_fill(~real_pairs, torch.inf).amin(dim=(1, 2))
        return (high - low).max().item()


def _sinkhorn_scaling(log_kernel: Tensor, real_pairs: Tensor, log_a: Tensor, log_b: Tensor, iterations: int,
                      tol: float | None) -> Tensor:
    """The same updates as the log-domain loop (same start, same order), on u = exp(potential) scalings."""
    shift = log_kernel.masked_fill(~real_pairs, -torch.inf).amax(dim=(1, 2), keepdim=True)
    kernel = torch.where(real_pairs, torch.exp(log_kernel - shift), 0.0)   # a per-problem constant cancels out
    a, b = log_a.exp(), log_b.exp()
    u = (a > 0).to(kernel.dtype)
    v = torch.zeros_like(b)

    def scale(weights: Tensor, sums: Tensor) -> Tensor:
        return torch.where(sums > 0, weights / torch.where(sums > 0, sums, 1.0), 0.0)

    for step in range(1, iterations + 1):
        v = scale(b, torch.bmm(kernel.transpose(1, 2), u[:, :, None]).squeeze(-1))
        u = scale(a, torch.bmm(kernel, v[:, :, None]).squeeze(-1))
        if tol is not None and step % _CHECK_EVERY == 0:
            with torch.no_grad():
                columns = v * torch.bmm(kernel.transpose(1, 2), u[:, :, None]).squeeze(-1)
                if torch.linalg.vector_norm(columns - b, dim=-1).max().item() < tol:
                    break
    return u[:, :, None] * kernel * v[:, None, :]


def _column_error(log_kernel: Tensor, u: Tensor, v: Tensor, log_b: Tensor) -> float:
    """Worst L2 distance, over the batch, between the plans' column sums and b (the rows are exact after u)."""
    with torch.no_grad():
        columns = torch.exp(log_kernel + u[:, :, None] + v[:, None, :]).sum(dim=1)
        return torch.linalg.vector_norm(columns - log_b.exp(), dim=-1).max().item()


def _log_marginal(weights: Tensor | None, real: Tensor, dtype: torch.dtype, name: str, side: str) -> Tensor:
    """log of the weights renormalised over the real tokens; -inf where a token is padded or weighs nothing."""
    weights = real.to(dtype) if weights is None else torch.where(real, weights.to(real.device, dtype), 0.0)
    if (weights < 0).any().item():
        bad = torch.nonzero((weights < 0).any(dim=-1)).flatten().tolist()
        raise ValueError(f"sinkhorn: marginal {name} has negative weights in problems {bad}")
    total = weights.sum(dim=-1, keepdim=True)
    empty = total.squeeze(-1) <= 0
    if empty.any().item():
        bad = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"sinkhorn: problems {bad} have no real {side} with positive weight in {name}; "
                         f"each problem needs at least one real token on each side")
    weights = weights / total
    has_mass = weights > 0
    # log of a safe 1 where there is no mass: a log(0) would send NaN gradients back into the weights.
    return torch.where(has_mass, torch.log(torch.where(has_mass, weights, 1.0)), -torch.inf)


def _real_tokens(mask: Tensor | None, batch: int, size: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, size, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def _check_finite(cost: Tensor, real_pairs: Tensor) -> None:
    bad_pairs = ~torch.isfinite(cost) & real_pairs
    if bad_pairs.any().item():
        bad = torch.nonzero(bad_pairs.flatten(1).any(dim=-1)).flatten().tolist()
        raise ValueError(f"sinkhorn: the cost of problems {bad} holds NaN or infinite values between real tokens")


def _check_arguments(cost: Tensor, a: Tensor | None, b: Tensor | None, mask_a: Tensor | None,
                     mask_b: Tensor | None, epsilon: float, iterations: int, tol: float | None) -> None:
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn expects a batch of cost matrices (B, N, M), got shape {tuple(cost.shape)}")
    batch, n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"sinkhorn needs at least one token on each side, got cost shape {tuple(cost.shape)}")
    for name, tensor, size in (("a", a, n), ("b", b, m), ("mask_a", mask_a, n), ("mask_b", mask_b, m)):
        if tensor is not None and tuple(tensor.shape) != (batch, size):
            raise ValueError(f"sinkhorn: {name} must have shape {(batch, size)} to match cost "
                             f"{tuple(cost.shape)}, got {tuple(tensor.shape)}")
    if not epsilon > 0 or epsilon == float("inf"):
        raise ValueError(f"sinkhorn: epsilon must be a positive finite number, got {epsilon}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be a positive integer, got {iterations!r}")
    if tol is not None and not tol > 0:
        raise ValueError(f"sinkhorn: tol must be positive or None, got {tol}")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (bfloat16 and half are too coarse for the potentials)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextmanager
def _full_precision(device: torch.device):
    """Keep an enclosing autocast region from pulling the matmul and sums back to half precision."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
