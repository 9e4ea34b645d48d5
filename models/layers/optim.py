"""Optimiser parameter groups, shared by every model.

A model names the group each parameter belongs to (e.g. SSM: "visual_encoder" for its CLIP vision encoder and "new"
for the rest) and, optionally, a learning-rate scale per parameter (GRACE's layer-wise decay). The groups
come back split by weight decay: biases and norm weights (1-D tensors) take none, as in most papers' reference
code (timm, MAE-DFER, CLIP fine-tuning), unless a model asks for `decay_vectors` (SSM decays "uniformly"), and so do
the parameters a model lists as `no_decay`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor


def parameter_groups(named_parameters: Iterable[tuple[str, Tensor]], *, lr: float | dict[str, float],
                     weight_decay: float | dict[str, float], group_of: Callable[[str], str] = lambda name: "all",
                     lr_scale_of: Callable[[str], float] = lambda name: 1.0,
                     no_decay: Callable[[str, Tensor], bool] = lambda name, p: False,
                     decay_vectors: bool = False) -> list[dict]:
    """Optimiser groups of the trainable parameters.

    lr / weight_decay: one value, or one per group name (every name `group_of` returns must be there). Each
    returned group holds "name", "params", "lr" (= the group's lr x the parameter's scale), "lr_scale",
    "weight_decay"; parameters that share all of those share a group. Frozen parameters are left out.
    """
    groups: dict[tuple[str, float, bool], dict] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        group = group_of(name)
        decays = (decay_vectors or parameter.ndim > 1) and not no_decay(name, parameter)
        scale = float(lr_scale_of(name))
        entry = groups.get((group, scale, decays))
        if entry is None:
            entry = groups[(group, scale, decays)] = {
                "name": group, "params": [], "lr": _value(lr, group, "lr") * scale, "lr_scale": scale,
                "weight_decay": _value(weight_decay, group, "weight_decay") if decays else 0.0}
        entry["params"].append(parameter)
    return list(groups.values())


def _value(value: float | dict[str, float], group: str, what: str) -> float:
    if not isinstance(value, dict):
        return float(value)
    if group not in value:
        raise ValueError(f"no {what} for parameter group '{group}'; given for {sorted(value)}")
    return float(value[group])
