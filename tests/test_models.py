"""The model library at tiny size: the registry and the convention every registered model follows (GRACE's own
tests are in test_grace.py)."""
from __future__ import annotations

import os

import pytest
import torch

from affectprep.models.registry import create_model, list_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_every_registered_model_runs_forward_and_backward_at_tiny_size():
    assert "grace" in list_models()
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name, tiny=True, num_classes=5).train()
        outputs = model(**model.example_inputs(batch_size=3))
        assert outputs["logits"].shape == (3, 5), name
        loss = sum(value.float().mean() for value in outputs.values() if value.is_floating_point())
        assert torch.isfinite(loss), name
        loss.backward()
        gradients = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is None or torch.isfinite(g).all() for g in gradients), name
        assert sum(g is not None for g in gradients) > len(gradients) // 2, name


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'nope'.*grace"):
        create_model("nope")
