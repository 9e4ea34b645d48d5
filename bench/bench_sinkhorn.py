"""GRACE's token-level OT: the batched log-domain Sinkhorn against POT solving the same problems one at a time.

The shape GRACE meets per training batch: 64 clips, 32 caption tokens x 392 visual tokens (8 x 7 x 7 VideoMAE
tokens), 768-d random features, cosine cost. Both solvers get the same epsilon, iteration cap and stop threshold
(both measure the column-marginal error in L2, every 10 iterations). POT runs in float64
numpy, its usual use; affectprep in float32 torch. Targets: >= 10x POT, plans within 1e-4. Figures only.
Usage: python bench/bench_sinkhorn.py [--device cuda] [--epsilon 0.05] [--iterations 1000] [--tol 1e-6 | 0]
"""
from __future__ import annotations

import argparse

import numpy as np
import ot
import torch

from affectprep.models.layers import cosine_cost, sinkhorn

from common import timed

BATCH, TEXT_TOKENS, VISUAL_TOKENS, DIM = 64, 32, 392, 768


def pot_one_at_a_time(solver, costs: np.ndarray, epsilon: float, iterations: int, tol: float) -> np.ndarray:
    a, b = np.full(costs.shape[1], 1 / costs.shape[1]), np.full(costs.shape[2], 1 / costs.shape[2])
    return np.stack([solver(a, b, cost, epsilon, numItermax=iterations, stopThr=tol, warn=False) for cost in costs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--tol", type=float, default=1e-6, help="0: no early stop, run every iteration")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(3407)
    text = torch.randn(BATCH, TEXT_TOKENS, DIM, generator=generator).to(args.device)
    visual = torch.randn(BATCH, VISUAL_TOKENS, DIM, generator=generator).to(args.device)
    costs = cosine_cost(text, visual)
    solve = dict(epsilon=args.epsilon, iterations=args.iterations, tol=args.tol or None)
    sinkhorn(costs, **solve)  # warm-up: first-call allocations and kernel loading are not the solver's cost

    seconds: dict[str, float] = {}
    with timed("affectprep", seconds):
        plans = sinkhorn(costs, **solve)
        if plans.is_cuda:
            torch.cuda.synchronize()
    costs64 = costs.double().cpu().numpy()
    pot_plans = {}
    for name, solver in (("POT sinkhorn_log", ot.bregman.sinkhorn_log), ("POT sinkhorn (plain)", ot.sinkhorn)):
        with timed(name, seconds):
            pot_plans[name] = pot_one_at_a_time(solver, costs64, args.epsilon, args.iterations, args.tol)

    plans = plans.double().cpu().numpy()
    print(f"{BATCH} problems of {TEXT_TOKENS} x {VISUAL_TOKENS} tokens, D={DIM}, epsilon={args.epsilon}, "
          f"at most {args.iterations} iterations, tol={args.tol}, affectprep on {args.device}")
    print(f"  affectprep batched: {seconds['affectprep']:.4f} s")
    for name, reference in pot_plans.items():
        difference = np.abs(plans - reference).max()
        print(f"  {name}, one at a time: {seconds[name]:.4f} s -> speed ratio (POT / affectprep) "
              f"{seconds[name] / seconds['affectprep']:.2f}x; max |plan difference| {difference:.2e} "
              f"({difference / reference.max():.2e} of the largest plan entry)")
    print(f"  affectprep marginal error: rows {np.abs(plans.sum(2) - 1 / TEXT_TOKENS).max():.2e}, "
          f"columns {np.abs(plans.sum(1) - 1 / VISUAL_TOKENS).max():.2e}")


if __name__ == "__main__":
    main()
