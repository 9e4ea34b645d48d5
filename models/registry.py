"""Model registry, timm-style: builders register under a name, `create_model(name)` builds one.

Every builder accepts `tiny` (small random configs for tests and CPU smoke runs) plus its own keyword arguments.
Every registered model follows one convention so the trainer and the tests can drive any of them:
`model.example_inputs(batch_size)` returns keyword arguments for `model(**inputs)`, and `forward` returns a dict
holding at least "logits" (B, num_classes).
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

# Modules under affectprep.models that register models when imported; imported on first registry lookup so
# that `create_model` works without the caller importing each model module first.
_BUILTIN_MODULES = ("grace",)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_builtins_loaded = False


def register_model(name: str) -> Callable:
    """Decorator registering `builder(tiny=False, **kwargs) -> nn.Module` under `name`."""
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"a model named {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder
    return decorate


def create_model(name: str, *, tiny: bool = False, **kwargs) -> nn.Module:
    """Build the registered model `name`; `tiny=True` gives its small test configuration."""
    _load_builtins()
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models()) or 'none'}")
    return _BUILDERS[name](tiny=tiny, **kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_builtins()
    return sorted(_BUILDERS)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
