"""The model library at tiny size: registry, GRACE (ablations, features path, transport plan, motion weights,
drop path, layer-decay groups) and its losses."""
from __future__ import annotations

import itertools
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from affectprep.models.grace import motion_weights
from affectprep.models.losses import (focal_loss, grace_loss, inverse_sqrt_class_weights,
                                      supervised_contrastive_loss)
from affectprep.models.registry import create_model, list_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_grace(**options):
    torch.manual_seed(0)
    return create_model("grace", tiny=True, **options)


def astronaut_frames(model, shifts=(0, 1, 3, 6)) -> torch.Tensor:
    """A (1, T, 3, H, W) clip of the astronaut's face drifting right, normalised like VideoMAE input."""
    config = model.video_encoder.config
    face = data.astronaut()[20:220, 140:340]
    frames = []
    for shift in shifts[:config.num_frames]:
        crop = cv2.resize(np.roll(face, shift * 4, axis=1), (config.image_size, config.image_size),
                          interpolation=cv2.INTER_AREA)
        frames.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 255)
    clip = torch.stack(frames)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((clip - mean[:, None, None]) / std[:, None, None])[None]


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


def test_grace_outputs_have_the_documented_shapes():
    model = tiny_grace(num_classes=7)
    outputs = model(**model.example_inputs(batch_size=2))
    segments, patches = model.token_grid
    assert (segments, patches) == (2, 4)
    assert outputs["text_logits"].shape == (2, 7)
    assert outputs["plan"].shape == (2, 6, segments * patches)
    assert outputs["motion_weights"].shape == (2, segments, patches)
    assert outputs["visual_embedding"].shape == outputs["text_embedding"].shape == (2, 16)


@pytest.mark.parametrize("matching,text_level", list(itertools.product(("ot", "cosine", "cross_attention"),
                                                                       ("token", "sentence"))))
def test_grace_matching_and_text_level_ablations_run(matching, text_level):
    model = tiny_grace(matching=matching, text_level=text_level)
    inputs = model.example_inputs(batch_size=2)
    outputs = model(**inputs)
    text_tokens = 1 if text_level == "sentence" else inputs["input_ids"].shape[1]
    assert outputs["plan"].shape == (2, text_tokens, 8)
    real = outputs["text_mask"].float()
    # Every matching spreads each real text token's 1/L of mass over the visual tokens, padding gets none.
    torch.testing.assert_close(outputs["plan"].sum(-1), real / real.sum(1, keepdim=True), atol=1e-5, rtol=0)
    outputs["logits"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("motion", ["both", "spatial", "temporal", "none"])
def test_grace_motion_ablations_run(motion):
    model = tiny_grace(motion=motion)
    outputs = model(**model.example_inputs(batch_size=2))
    assert torch.isfinite(outputs["logits"]).all()
    if motion == "none":
        assert torch.equal(outputs["motion_weights"], torch.ones(2, 2, 4))


def test_motion_weights_favour_the_patch_and_segment_that_change():
    tokens = torch.zeros(1, 4, 6, 8)
    tokens[0, 2:, 3] = 5.0                      # patch 3 changes between segments 1 and 2, nothing else moves
    spatial = motion_weights(tokens, "spatial")[0]
    temporal = motion_weights(tokens, "temporal")[0]
    both = motion_weights(tokens, "both")[0]
    assert spatial[0].argmax() == 3 and torch.allclose(spatial[0], spatial[3])      # one weight per patch
    assert temporal[:, 0].argmax() == 2 and torch.allclose(temporal[:, 0], temporal[:, 5])
    torch.testing.assert_close(both, spatial * temporal)
    torch.testing.assert_close(spatial[0].mean(), torch.tensor(1.0))
    torch.testing.assert_close(temporal[:, 0].mean(), torch.tensor(1.0))
    static = torch.randn(1, 1, 6, 8).expand(2, 4, 6, 8)
    torch.testing.assert_close(motion_weights(static, "both"), torch.ones(2, 4, 6))


def test_features_path_equals_frames_path_on_the_encoders_own_tokens():
    model = tiny_grace().eval()
    frames = astronaut_frames(model)
    text = {"input_ids": torch.tensor([[5, 17, 42, 9, 77]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    with torch.no_grad():
        tokens = model.encode_video(frames)
        from_frames = model(frames, **text)
        from_tokens = model(visual_tokens=tokens, **text)
        text_tokens, text_mask = model.encode_text(**text)
        from_both_features = model(visual_tokens=tokens, text_tokens=text_tokens, text_mask=text_mask)
    assert tokens.shape == (1, 2, 4, 32)
    for key in ("logits", "text_logits", "plan", "motion_weights"):
        torch.testing.assert_close(from_frames[key], from_tokens[key])
        torch.testing.assert_close(from_frames[key], from_both_features[key])
    # The face drifts, so the clip has motion and the weights are not all ones.
    assert not torch.allclose(from_frames["motion_weights"], torch.ones_like(from_frames["motion_weights"]))


def test_transport_plan_marginals_are_uniform_over_real_tokens():
    model = tiny_grace(text_features=True, text_dim=12)
    text_tokens = torch.randn(3, 7, 12)
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], dtype=torch.bool)
    plan = model(model.example_inputs(3)["frames"], text_tokens=text_tokens, text_mask=text_mask)["plan"]
    real = text_mask.float()
    torch.testing.assert_close(plan.sum(-1), real / real.sum(1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((3, 8), 1 / 8), atol=1e-5, rtol=0)
    assert (plan[~text_mask] == 0).all()


def test_bad_inputs_raise_clear_errors():
    model = tiny_grace()
    inputs = model.example_inputs(2)
    with pytest.raises(ValueError, match="frames of shape"):
        model(inputs["frames"][:, :3], input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="exactly one of frames or visual_tokens"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"samples \[1\] have no text tokens"):
        model(inputs["frames"], input_ids=inputs["input_ids"],
              attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    with pytest.raises(ValueError, match="motion must be one of"):
        tiny_grace(motion="optical-flow")


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = tiny_grace(drop_path_rate=0.9)
    frames = astronaut_frames(model).expand(8, -1, -1, -1, -1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(frames), model.encode_video(frames))
        evaluated = model.encode_video(frames)
        model.train()
        torch.manual_seed(1)
        trained = model.encode_video(frames)
    # The last layer drops with p = 0.9 per sample: some samples of the batch differ from the eval pass.
    assert not torch.allclose(trained, evaluated)


def test_layer_decay_groups_cover_every_trainable_parameter_once():
    model = tiny_grace()
    groups = model.param_groups(lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())   # frozen, so not grouped

    def group_of(parameter):
        return next(g for g in groups if any(p is parameter for p in g["params"]))

    depth = model.video_encoder.config.num_hidden_layers
    patch = model.video_encoder.embeddings.patch_embeddings.projection.weight
    first_layer = model.video_encoder.encoder.layer[0].attention.attention.query.weight
    head = model.head[1]
    assert group_of(patch)["lr"] == pytest.approx(1e-3 * 0.75 ** (depth + 1))
    assert group_of(first_layer)["lr"] == pytest.approx(1e-3 * 0.75 ** depth)
    assert group_of(head.weight)["lr"] == pytest.approx(1e-3)
    assert group_of(head.weight)["weight_decay"] == 0.05
    assert group_of(head.bias)["weight_decay"] == 0.0
    assert group_of(model.video_encoder.encoder.layer[1].layernorm_before.weight)["weight_decay"] == 0.0
    torch.optim.AdamW(groups)   # the groups are valid AdamW input


def test_focal_loss_with_gamma_zero_equals_weighted_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=generator)
    targets = torch.randint(0, 5, (16,), generator=generator)
    weights = inverse_sqrt_class_weights([50, 10, 5, 20, 1])
    expected = F.cross_entropy(logits, targets, weight=weights)
    torch.testing.assert_close(focal_loss(logits, targets, weights, gamma=0.0), expected)
    torch.testing.assert_close(focal_loss(logits, F.one_hot(targets, 5).float(), weights, gamma=0.0), expected)
    # Focusing shrinks the loss of confident correct predictions far more than that of wrong ones.
    confident = F.one_hot(targets, 5).float() * 8
    assert focal_loss(confident, targets, gamma=2.0) < 1e-3 * focal_loss(confident, targets, gamma=0.0)


def test_inverse_sqrt_class_weights():
    weights = inverse_sqrt_class_weights([100, 25, 4])
    raw = torch.tensor([1 / 10, 1 / 5, 1 / 2])
    torch.testing.assert_close(weights, raw / raw.mean())
    torch.testing.assert_close(inverse_sqrt_class_weights([16, 0, 4]), torch.tensor([2 / 3, 0.0, 4 / 3]))
    with pytest.raises(ValueError, match="non-negative"):
        inverse_sqrt_class_weights([3, -1])
    with pytest.raises(ValueError, match="every class count is zero"):
        inverse_sqrt_class_weights([0, 0])


def test_supervised_contrastive_loss_prefers_clustered_embeddings():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    centres = torch.randn(4, 16, generator=generator) * 3
    visual = centres[labels] + 0.3 * torch.randn(16, 16, generator=generator)
    text = centres[labels] + 0.3 * torch.randn(16, 16, generator=generator)
    clustered = supervised_contrastive_loss(visual, text, labels)
    shuffled = supervised_contrastive_loss(visual, text, labels[torch.randperm(16, generator=generator)])
    assert clustered < shuffled
    torch.manual_seed(0)
    mixed = supervised_contrastive_loss(visual, text, labels, mixup_alpha=0.2)
    assert torch.isfinite(mixed)
    # No anchor has a positive when every class occurs once: nothing to pull together.
    assert supervised_contrastive_loss(visual[:4], text[:4], torch.arange(4)) == 0


def test_grace_loss_combines_the_three_terms_and_trains_the_tiny_model():
    model = tiny_grace(num_classes=3).train()
    inputs = model.example_inputs(batch_size=4)
    labels = torch.tensor([0, 1, 0, 2])
    weights = inverse_sqrt_class_weights([10, 5, 1])
    torch.manual_seed(0)
    total, parts = grace_loss(model(**inputs), labels, weights, lambdas=(1.0, 0.5, 0.25))
    assert set(parts) == {"focal", "supcon", "aux"}
    torch.testing.assert_close(total.detach(), parts["focal"] + 0.5 * parts["supcon"] + 0.25 * parts["aux"])
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    for _ in range(6):
        optimizer.zero_grad()
        loss, _ = grace_loss(model(**inputs), labels, weights, mixup_alpha=0.0)
        loss.backward()
        optimizer.step()
    assert loss.item() < total.item()


def test_pretrained_encoders_load_from_saved_checkpoints(tmp_path):
    source = tiny_grace()
    source.video_encoder.save_pretrained(tmp_path / "video")
    source.text_encoder.save_pretrained(tmp_path / "text")
    loaded = create_model("grace", tiny=True, pretrained=str(tmp_path / "video"), text_encoder=str(tmp_path / "text"))
    for mine, theirs in ((source.video_encoder, loaded.video_encoder), (source.text_encoder, loaded.text_encoder)):
        for (name, expected), actual in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(actual, expected, msg=name)
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
