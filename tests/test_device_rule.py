"""The registry's device rule (models/registry.py): the trainer, eval and explain move every tensor of a collated
batch to the model's device (runs.to_device), and each model's `batch_inputs` keeps what it makes (token ids,
sample keys) on the batch's device. Checked on the `meta` device, a stand-in for a GPU: a tensor left on the CPU
would show up here as it would on CUDA, and at no cost."""
from __future__ import annotations

import pytest
import torch

from affectprep.models.registry import create_model, list_models
from affectprep.models.runs import to_device

META = torch.device("meta")


def collated_batch(model, size: int = 2) -> dict:
    """A batch as models/data.py `collate` makes it, from the model's own example inputs, on the CPU."""
    example = model.example_inputs(size)
    batch = {"labels": torch.zeros(size, dtype=torch.long), "views": torch.zeros(size, dtype=torch.long),
             "sample_ids": [f"s{i}" for i in range(size)], "texts": ["the brows lower. the lips press."] * size}
    for key in ("frames", "waveform", "waveform_mask"):
        if key in example:
            batch[key] = example[key].cpu()
    return batch


@pytest.mark.parametrize("name", list_models())
def test_batch_inputs_stay_on_the_device_the_trainer_moved_the_batch_to(name):
    model = create_model(name, tiny=True)
    batch = collated_batch(model)
    moved = to_device(batch, META)
    assert all(v.device == META for v in moved.values() if isinstance(v, torch.Tensor))
    assert moved["sample_ids"] == batch["sample_ids"] and moved["texts"] == batch["texts"]
    inputs = model.to(META).batch_inputs(moved)
    tensors = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    assert tensors and all(t.device == META for t in tensors.values()), {k: t.device for k, t in tensors.items()}
