"""GReFEL at tiny size: window cross-attention, reliability balancing (confidence, anchors, attention), the three
losses, the ablation switches, loading a saved backbone, and fitting a small batch."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import ResNetBackbone, ResNetConfig

# Importing the module registers "grefel".
from affectprep.models.grefel import (STAGES, TINY_BACKBONE, WindowCrossAttention, anchor_loss, center_loss,
                                      confidence, confidence_weighted, geometric_correction)
from affectprep.models.registry import create_model


def tiny_grefel(**options):
    torch.manual_seed(0)
    return create_model("grefel", tiny=True, num_classes=3, **options)


def loss_of(model, outputs, labels):
    return model.loss({"expression": outputs}, {"expression": {"labels": labels}})


def test_forward_backward_gives_distributions_and_finite_gradients():
    model = tiny_grefel().train()
    inputs = model.example_inputs(batch_size=4, generator=torch.Generator().manual_seed(0))
    assert inputs["frames"].shape == (4, 1, 3, 64, 64) and inputs["landmarks"].shape == (4, 1, 68, 2)
    outputs = model(**inputs)
    assert outputs["logits"].shape == (4, 3) and outputs["embedding"].shape == (4, 32)
    for name in ("probabilities", "primary", "geometric", "attentive"):
        torch.testing.assert_close(outputs[name].sum(-1), torch.ones(4), msg=name)
        assert (outputs[name] >= 0).all(), name
    torch.testing.assert_close(outputs["logits"].softmax(-1), outputs["probabilities"])
    assert ((outputs["confidence"] >= 0) & (outputs["confidence"] <= 1)).all()
    losses = loss_of(model, outputs, torch.tensor([0, 1, 2, -1]))
    assert set(losses) == {"loss", "cls", "anchor", "center"}
    torch.testing.assert_close(losses["loss"].detach(),
                               losses["cls"] + 0.1 * losses["anchor"] + 0.1 * losses["center"])
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.batch_inputs({**inputs, "labels": torch.zeros(4), "views": torch.zeros(4)}).keys() == {
        "frames", "landmarks"}
    assert model.inputs.landmarks and model.inputs.frames == 1 and model.tasks == ("expression",)


def test_confidence_is_one_minus_normalised_entropy():
    one_hot = torch.eye(5)
    torch.testing.assert_close(confidence(one_hot), torch.ones(5))
    torch.testing.assert_close(confidence(torch.full((2, 5), 0.2)), torch.zeros(2), atol=1e-6, rtol=0)
    distributions = torch.randn(100, 5).softmax(-1)
    values = confidence(distributions)
    assert ((values >= 0) & (values <= 1)).all()
    entropy = -(distributions * distributions.log()).sum(-1)
    torch.testing.assert_close(values, 1 - entropy / math.log(5))


def test_confidence_weighting_trusts_the_confident_distribution():
    certain, unsure = torch.tensor([[0.0, 1.0, 0.0]]), torch.full((1, 3), 1 / 3)
    combined = confidence_weighted(certain, unsure)
    torch.testing.assert_close(combined, certain, atol=1e-5, rtol=0)
    torch.testing.assert_close(confidence_weighted(unsure, unsure), unsure)
    first, second = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.1, 0.8]])
    weights = confidence(first), confidence(second)
    expected = (weights[0] * first + weights[1] * second) / (weights[0] + weights[1])
    torch.testing.assert_close(confidence_weighted(first, second), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(confidence_weighted(first, second).sum(-1), torch.ones(1))


def test_geometric_correction_is_a_distance_softmax_over_anchors():
    anchors = torch.randn(3, 2, 4)
    embedding = anchors[2, 1][None] + 0.01
    correction = geometric_correction(embedding, anchors)
    assert correction.argmax().item() == 2
    distances = (anchors.flatten(0, 1) - embedding).norm(dim=-1)
    similarity = torch.exp(-distances) / torch.exp(-distances).sum()
    torch.testing.assert_close(correction[0], similarity.view(3, 2).sum(-1))
    # delta sets the steepness: a large delta flattens the correction towards uniform.
    assert confidence(geometric_correction(embedding, anchors, delta=100.0)) < confidence(correction)


def test_window_cross_attention_sees_only_the_landmarks_window():
    torch.manual_seed(0)
    attention = WindowCrossAttention(dim=8, heads=2, window=2)
    tokens = torch.randn(1, 4, 4, 8)
    points = torch.tensor([[[0.1, 0.1], [0.9, 0.6], [0.6, 0.2]]])          # (x, y)
    output, weights = attention(torch.randn(1, 3, 8), points, tokens)
    assert output.shape == (1, 3, 8) and weights.shape == (1, 2, 3, 16)
    grid = weights[0].sum(0).view(3, 4, 4) > 0                                   # rows (y), cols (x)
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[0, :2, :2] = True           # top-left window
    expected[1, 2:, 2:] = True           # x 0.9 -> cols 2-3, y 0.6 -> rows 2-3
    expected[2, :2, 2:] = True
    assert torch.equal(grid, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 3))
    # Tokens outside a landmark's window cannot change its output.
    changed = tokens.clone()
    changed[0, 3, 0] += 10
    torch.testing.assert_close(attention(torch.zeros(1, 3, 8), points, changed)[0][0, 0],
                               attention(torch.zeros(1, 3, 8), points, tokens)[0][0, 0])


def test_landmarks_steer_the_embedding():
    model = tiny_grefel().eval()
    inputs = model.example_inputs(batch_size=2)
    moved = {**inputs, "landmarks": inputs["landmarks"].flip(-1)}
    with torch.no_grad():
        assert not torch.allclose(model(**inputs)["embedding"], model(**moved)["embedding"])


@pytest.mark.parametrize("balancing, has_anchors, has_attention", [
    ("none", False, False), ("anchors", True, False), ("attention", False, True), ("both", True, True)])
def test_balancing_ablations_remove_what_they_name(balancing, has_anchors, has_attention):
    losses = ("cls", "anchor", "center") if has_anchors else ("cls",)
    model = tiny_grefel(balancing=balancing, losses=losses).eval()
    assert hasattr(model, "anchor_parameters") == has_anchors
    assert hasattr(model, "correction_attention") == has_attention
    with torch.no_grad():
        outputs = model(**model.example_inputs(batch_size=3))
    assert ("geometric" in outputs) == has_anchors and ("attentive" in outputs) == has_attention
    corrections = [outputs[name] for name in ("geometric", "attentive") if name in outputs]
    if not corrections:
        torch.testing.assert_close(outputs["probabilities"], outputs["primary"])
    else:
        correction = corrections[0] if len(corrections) == 1 else confidence_weighted(*corrections)
        torch.testing.assert_close(outputs["probabilities"], confidence_weighted(outputs["primary"], correction))


@pytest.mark.parametrize("losses", [("cls",), ("anchor",), ("center",), ("cls", "anchor"), ("cls", "anchor", "center")])
def test_loss_ablations_sum_only_the_chosen_terms(losses):
    model = tiny_grefel(losses=losses).train()
    inputs = model.example_inputs(batch_size=3)
    labels = torch.tensor([0, 2, 1])
    parts = loss_of(model, model(**inputs), labels)
    assert set(parts) == {"loss", *losses}
    weights = {"cls": 1.0, "anchor": 0.1, "center": 0.1}
    torch.testing.assert_close(parts["loss"].detach(), sum(weights[name] * parts[name] for name in losses))


def test_switches_reject_what_cannot_work():
    with pytest.raises(ValueError, match="need anchors"):
        tiny_grefel(balancing="attention")
    with pytest.raises(ValueError, match="balancing"):
        tiny_grefel(balancing="anchor")
    with pytest.raises(ValueError, match="losses"):
        tiny_grefel(losses=("cls", "triplet"))
    with pytest.raises(ValueError, match="landmarks"):
        model = tiny_grefel()
        model(torch.randn(2, 1, 3, 64, 64), torch.rand(2, 1, 5, 2))


def test_anchor_and_center_losses_match_their_definitions():
    anchors = torch.randn(3, 2, 4)
    flat = anchors.flatten(0, 1)
    pairs = [(flat[i] - flat[j]).pow(2).sum() for i, j in itertools.permutations(range(6), 2)]
    torch.testing.assert_close(anchor_loss(anchors), -torch.stack(pairs).mean() / 4)
    embeddings, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 0])
    nearest = [min((embeddings[i] - anchors[labels[i], k]).pow(2).sum() for k in range(2)) for i in range(5)]
    torch.testing.assert_close(center_loss(embeddings, labels, anchors), torch.stack(nearest).mean() / 4)
    # Anchors live in the embedding's normalised space, so the anchor loss is bounded below.
    model = tiny_grefel()
    with torch.no_grad():
        model.anchor_parameters.mul_(1000)
    assert anchor_loss(model.anchors) > -4 * model.anchors.shape[-1]


def test_unlabelled_samples_do_not_enter_the_loss():
    model = tiny_grefel().train()
    inputs = model.example_inputs(batch_size=3)
    outputs = model(**inputs)
    partial = loss_of(model, outputs, torch.tensor([-1, 2, 1]))
    expected = torch.nn.functional.nll_loss(outputs["logits"][1:], torch.tensor([2, 1]))
    torch.testing.assert_close(partial["cls"], expected.detach())
    empty = loss_of(model, outputs, torch.full((3,), -1))
    assert empty["cls"].item() == 0 and empty["center"].item() == 0


def test_backbone_loads_from_a_saved_checkpoint(tmp_path):
    torch.manual_seed(1)
    ResNetBackbone(ResNetConfig(**TINY_BACKBONE, out_features=STAGES)).save_pretrained(tmp_path)
    saved = ResNetBackbone.from_pretrained(tmp_path, out_features=STAGES)
    model = create_model("grefel", tiny=True, backbone=str(tmp_path))
    for (name, expected), actual in zip(saved.state_dict().items(), model.backbone.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    assert model.backbone.channels == [16, 24, 32]


def test_tiny_model_fits_a_small_fixed_batch():
    model = tiny_grefel().train()
    generator = torch.Generator().manual_seed(1)
    inputs = model.example_inputs(batch_size=6, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(15):
        losses = loss_of(model, model(**inputs), labels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first if first is not None else losses["cls"].item()
    assert losses["cls"].item() < 0.3 * first
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    assert outputs["logits"].argmax(-1).tolist() == labels.tolist()
