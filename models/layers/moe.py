"""A pretrained transformer FFN turned into a mixture of experts with private experts per task (SSM supplementary
§E, Fig. S3, Eqs. S1-S2).

    x~ = LN(x)                                      (the CLIP block's own LayerNorm before its FFN)
    g  = softmax(R_task x~),  S = TopK(g, K)        (a router per task over that task's m private experts)
    y_j = E_j(x~) = W2_j act(W1_j x~ + b1_j) + b2_j (Eq. S1; see `PrivateExpert` on the activation)
    y  = E_s(x~) + gamma * sum_{j in S} g^_j y_j    (Eq. S2; g^ = the top-K gates re-normalised to sum to 1)

E_s is the pretrained FFN itself, kept under CLIP's parameter names (fc1, fc2) so a CLIP checkpoint loads into the
patched encoder unchanged; routers, private experts and gamma are the new parameters. The paper keeps the private
experts "separately for each task": each task has its own router and its own m experts, and a forward pass routes
through the pool of the task its batch belongs to (`routed_to`). The shared expert and gamma (one learnable vector,
Eq. S2) serve both tasks.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

EXPERT_ACTIVATIONS = ("gelu", "none")


class PrivateExpert(nn.Module):
    """E_j (Eq. S1), a compact two-layer FFN (d -> hidden -> d).

    Eq. S1 prints no non-linearity between the layers, but the text calls the expert "a compact FFN", and without
    one the two layers collapse to a single rank-`hidden` linear map; the authors' public code puts a GELU there.
    activation="gelu" (default) follows the code, "none" is Eq. S1 as printed. Xavier-uniform weights and zero
    biases, as the public code initialises them (the paper gives no initialisation)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"expert_activation must be one of {EXPERT_ACTIVATIONS}, got {activation!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if activation == "gelu" else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class MoEFeedForward(nn.Module):
    """A CLIP FFN (`CLIPMLP`: fc1, activation_fn, fc2) as the shared expert E_s plus, per task, a router and
    `num_experts` private experts of which the top `top_k` run per token (Eq. S2).

    Choices the paper leaves open, from the public code: the router starts small (Xavier gain 0.1, zero bias) and
    gamma at 0.1, so the block starts close to the pretrained one. The public code's router noise and its
    un-normalised top-k gates are left out: the paper re-normalises the selected gates and adds no noise."""

    def __init__(self, mlp: nn.Module, tasks: Sequence[str], num_experts: int = 4, top_k: int = 2,
                 expert_hidden: int = 512, gamma: float = 0.1, expert_activation: str = "gelu"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, {num_experts}], got {top_k}")
        if not tasks:
            raise ValueError("an MoE layer needs at least one task to keep private experts for")
        self.fc1, self.fc2, self.activation_fn = mlp.fc1, mlp.fc2, mlp.activation_fn
        dim = self.fc1.in_features
        self.top_k = top_k
        self.routers = nn.ModuleDict({task: nn.Linear(dim, num_experts) for task in tasks})
        self.experts = nn.ModuleDict({task: nn.ModuleList(PrivateExpert(dim, expert_hidden, expert_activation)
                                                          for _ in range(num_experts)) for task in tasks})
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma)))
        for router in self.routers.values():
            nn.init.xavier_uniform_(router.weight, gain=0.1)
            nn.init.zeros_(router.bias)
        self.task: str | None = None       # the task whose experts the next forward uses; set by `routed_to`

    def shared(self, hidden: Tensor) -> Tensor:
        """E_s: the pretrained CLIP FFN."""
        return self.fc2(self.activation_fn(self.fc1(hidden)))

    def route(self, tokens: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """Tokens (N, D) -> the top-k gates of `task`'s router re-normalised to sum to 1 (N, k) and the experts they
        select (N, k)."""
        gates = self.routers[task](tokens).softmax(dim=-1)
        weights, experts = gates.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, hidden: Tensor) -> Tensor:
        task = self.task
        if task is None:
            raise RuntimeError("MoEFeedForward has private experts per task: run the encoder inside "
                               "`routed_to(encoder, task)`")
        if task not in self.experts:
            raise ValueError(f"this MoE layer has private experts for {list(self.experts)}, not for {task!r}")
        tokens = hidden.reshape(-1, hidden.shape[-1])
        weights, chosen = self.route(tokens, task)
        private = torch.zeros_like(tokens)
        # Each expert runs only on the tokens routed to it (sparse compute), scattered back weighted.
        for index, expert in enumerate(self.experts[task]):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            if token.numel():
                routed = expert(tokens[token]) * weights[token, slot, None]
                private.index_add_(0, token, routed.to(private.dtype))   # experts may run in lower precision
        return self.shared(hidden) + self.gamma * private.view_as(hidden)


def add_moe(encoder: nn.Module, layers: int, tasks: Sequence[str], **options) -> None:
    """Replace the FFNs of the last `layers` blocks of a CLIP vision encoder (`CLIPVisionModel` or
    `...WithProjection`) by MoEFeedForward, in place. Options go to MoEFeedForward."""
    blocks = encoder.vision_model.encoder.layers
    if not 0 <= layers <= len(blocks):
        raise ValueError(f"moe_layers must lie in [0, {len(blocks)}], got {layers}")
    for block in blocks[len(blocks) - layers:]:
        block.mlp = MoEFeedForward(block.mlp, tasks, **options)


@contextmanager
def routed_to(encoder: nn.Module, task: str) -> Iterator[None]:
    """Within the block, every MoE layer of `encoder` routes through `task`'s private experts."""
    layers = [module for module in encoder.modules() if isinstance(module, MoEFeedForward)]
    for layer in layers:
        layer.task = task
    try:
        yield
    finally:
        for layer in layers:
            layer.task = None
