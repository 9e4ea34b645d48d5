"""PCA at tiny size: prompt transfer hooks, feature banks, IGA, the loss, the ablation switches, loading a saved
CLIP, and fitting a small batch."""
from __future__ import annotations

import pytest
import torch

from affectprep.models.pca import SOURCE, TARGET  # importing registers "pca"
from affectprep.models.registry import create_model
from affectprep.models.text import tiny_tokenizer

CLASSES = ["happy", "sad", "angry"]


def tiny_pca(**options):
    torch.manual_seed(0)
    return create_model("pca", tiny=True, num_classes=len(CLASSES), class_names=CLASSES, **options)


def class_batch(per_class: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames (3 * per_class, 1, 3, 32, 32), one fixed random pattern per class plus noise; labels; domains
    (first half source, second half target)."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(len(CLASSES), 3, 32, 32, generator=generator) * 2
    labels = torch.arange(len(CLASSES)).repeat(per_class)
    frames = patterns[labels] + 0.3 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    domain = (torch.arange(len(labels)) >= len(labels) // 2).long()
    return frames[:, None], labels, domain


def loss_of(model, outputs, labels):
    return model.loss({"expression": outputs}, {"expression": {"labels": labels}})


def capture_input(layer: torch.nn.Module) -> dict:
    """Records the hidden states a layer receives (after the model's own pre-hooks have run)."""
    seen = {}

    def record(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    layer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


def test_forward_backward_trains_only_prompts_and_iga():
    model = tiny_pca().train()
    inputs = model.example_inputs(batch_size=4, generator=torch.Generator().manual_seed(0))
    outputs = model(**inputs)
    assert outputs["logits"].shape == (4, 3)
    assert outputs["image_features"].shape == outputs["aligned_features"].shape == (4, 16)
    torch.testing.assert_close(outputs["image_features"].norm(dim=-1), torch.ones(4))
    losses = loss_of(model, outputs, inputs["labels"])
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("clip.") for name in trainable)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
    groups = model.param_groups(lr=0.003, weight_decay=5e-4)
    assert {id(p) for group in groups for p in group["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    assert not model.clip.training


def test_text_encoder_pools_at_the_end_token_of_the_tiny_tokenizer():
    model = tiny_pca()
    tokenizer = tiny_tokenizer()
    assert model.clip.config.text_config.eos_token_id == tokenizer.sep_token_id
    ids = model.class_input_ids
    text = model.clip.text_model(input_ids=ids, attention_mask=model.class_attention_mask)
    ends = [row.tolist().index(tokenizer.sep_token_id) for row in ids]
    torch.testing.assert_close(text.pooler_output, text.last_hidden_state[torch.arange(len(ids)), ends])
    # The class texts differ after the prompt placeholders, so the pooled states differ per class.
    assert torch.cdist(text.pooler_output, text.pooler_output).triu(1).sum() > 0


def test_deep_prompts_enter_both_encoders():
    model = tiny_pca()
    text_layer = capture_input(model.clip.text_model.encoder.layers[1])
    vision_layer = capture_input(model.clip.vision_model.encoder.layers[1])
    frames = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        model(frames)
        expected_text, expected_visual = model.text_prompts[1], model.visual_prompts(1)
    patches = (32 // 8) ** 2
    assert vision_layer["hidden"].shape == (2, 1 + patches + 2, 32)
    torch.testing.assert_close(vision_layer["hidden"][:, -2:], expected_visual.expand(2, -1, -1))
    torch.testing.assert_close(text_layer["hidden"][:, 1:3], expected_text.expand(len(CLASSES), -1, -1))

    # The image features follow the text prompts through the transfer map P = T(Q).
    before = model.encode_images(frames).detach()
    with torch.no_grad():
        model.text_prompts.add_(0.5)
    assert not torch.allclose(model.encode_images(frames), before)


def test_cpt_off_leaves_plain_clip_vision_and_no_transfer_map():
    model = tiny_pca(cpt=False)
    assert model.prompt_transfer is None
    assert not any("prompt_transfer" in name for name in model.state_dict())
    vision_layer = capture_input(model.clip.vision_model.encoder.layers[1])
    frames = torch.randn(2, 1, 3, 32, 32)
    before = model.encode_images(frames).detach()
    assert vision_layer["hidden"].shape[1] == 1 + (32 // 8) ** 2
    with torch.no_grad():
        model.text_prompts.add_(0.5)
    torch.testing.assert_close(model.encode_images(frames), before)
    # The text prompts stay learnable.
    assert model.text_prompts.requires_grad


def test_iga_off_drops_the_module_the_banks_and_the_term():
    model = tiny_pca(iga=False).train()
    assert not hasattr(model, "align_mlp") and not hasattr(model, "bank_features")
    assert not any("bank" in name or "align" in name for name in model.state_dict())
    inputs = model.example_inputs(batch_size=3)
    outputs = model(**inputs)
    assert "iga_logits" not in outputs
    torch.testing.assert_close(outputs["logits"], outputs["cls_logits"])
    losses = loss_of(model, outputs, inputs["labels"])
    assert set(losses) == {"loss", "cls"}
    torch.testing.assert_close(losses["loss"].detach(), 0.5 * losses["cls"])

    full = tiny_pca().train()
    losses = loss_of(full, full(**inputs), inputs["labels"])
    assert set(losses) == {"loss", "cls", "iga"}
    torch.testing.assert_close(losses["loss"].detach(), 0.5 * losses["cls"] + 0.5 * losses["iga"])


def test_banks_keep_the_five_most_confident_features_per_domain_and_class():
    model = tiny_pca()
    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    confidence = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])
    probabilities = torch.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], dim=1)
    labels = torch.zeros(8, dtype=torch.long)
    model.update_banks(features, probabilities, labels, torch.full((8,), SOURCE))
    kept = confidence.topk(5).indices
    torch.testing.assert_close(model.bank_scores[SOURCE, 0], confidence[kept])
    torch.testing.assert_close(model.bank_features[SOURCE, 0], features[kept])
    assert torch.isinf(model.bank_scores[SOURCE, 1:]).all() and torch.isinf(model.bank_scores[TARGET]).all()

    # An unlabelled target sample joins the bank of its predicted class, scored by that class's probability.
    model.update_banks(features[:1], torch.tensor([[0.1, 0.2, 0.7]]), torch.tensor([-1]), torch.tensor([TARGET]))
    assert model.bank_scores[TARGET, 2, 0] == pytest.approx(0.7)
    assert torch.isfinite(model.bank_scores[TARGET]).sum() == 1

    centres, filled = model.bank_centres()
    torch.testing.assert_close(centres[SOURCE, 0], features[kept].mean(0))
    torch.testing.assert_close(centres[TARGET, 2], features[0])
    assert filled.tolist() == [[True, False, False], [False, False, True]]

    restored = tiny_pca()
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.bank_features, model.bank_features)
    model.reset_banks()
    assert torch.isinf(model.bank_scores).all()


def test_training_forwards_fill_banks_and_eval_forwards_do_not():
    model = tiny_pca().train()
    frames, labels, domain = class_batch(per_class=4)
    for _ in range(2):
        model(frames, domain=domain, labels=labels)
    filled = torch.isfinite(model.bank_scores).sum(-1)
    # 2 forwards x 2 samples per (domain, class) offered, at most 5 kept.
    assert filled.tolist() == [[4, 4, 4], [4, 4, 4]]
    model(frames, domain=domain, labels=labels)
    assert (torch.isfinite(model.bank_scores).sum(-1) == 5).all()
    snapshot = model.bank_scores.clone()
    model.eval()
    model(frames, domain=domain, labels=labels)
    torch.testing.assert_close(model.bank_scores, snapshot)
    with pytest.raises(ValueError, match="domain"):
        model.train()(frames, domain=domain + 1, labels=labels)


def test_alignment_moves_features_towards_the_bank_centres_only_when_banks_exist():
    model = tiny_pca()
    features = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    # Empty banks: x' = normalise(x) + normalise(x).
    torch.testing.assert_close(model.align(features), 2 * features)
    model.update_banks(features, torch.full((3, 3), 1 / 3), torch.tensor([0, 1, 2]), torch.full((3,), TARGET))
    aligned = model.align(features)
    assert not torch.allclose(aligned, 2 * features)
    # The source bank is still empty, so its half of x' is the plain feature.
    assert (aligned - features).norm(dim=-1).allclose(torch.ones(3), atol=1e-5)


def test_unlabelled_samples_do_not_enter_the_loss():
    model = tiny_pca().train()
    frames, labels, domain = class_batch()
    outputs = model(frames, domain=domain, labels=labels)
    partial = labels.clone()
    partial[:2] = -1
    expected = torch.nn.functional.cross_entropy(outputs["cls_logits"][2:], labels[2:])
    torch.testing.assert_close(loss_of(model, outputs, partial)["cls"], expected.detach())
    none = loss_of(model, outputs, torch.full_like(labels, -1))
    assert none["loss"].item() == 0 and none["loss"].requires_grad
    assert model.batch_inputs({"frames": frames, "labels": labels, "domain": domain, "views": labels}).keys() == {
        "frames", "labels", "domain"}


def test_clip_and_tokenizer_load_from_a_saved_checkpoint(tmp_path):
    source = tiny_pca()
    source.clip.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = create_model("pca", tiny=True, num_classes=3, class_names=CLASSES, clip=str(tmp_path))
    for (name, expected), actual in zip(source.clip.state_dict().items(), loaded.clip.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    torch.testing.assert_close(loaded.class_input_ids, source.class_input_ids)
    assert not any(p.requires_grad for p in loaded.clip.parameters())
    loaded.load_state_dict(source.state_dict())
    frames = torch.randn(2, 1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(frames)["logits"], source.eval()(frames)["logits"])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="class_names are required"):
        create_model("pca", num_classes=4)
    with pytest.raises(ValueError, match="prompt_depth"):
        tiny_pca(prompt_depth=5)
    with pytest.raises(ValueError, match="still frames"):
        tiny_pca()(torch.randn(2, 3, 3, 32, 32))


def test_tiny_model_fits_a_small_fixed_batch():
    model = tiny_pca().train()
    frames, labels, domain = class_batch()
    # Only prompts and IGA learn, over a frozen random CLIP: a small lr and many cheap steps.
    optimizer = torch.optim.Adam(model.param_groups(lr=1e-3, weight_decay=0.0))
    for _ in range(200):
        losses = loss_of(model, model(frames, domain=domain, labels=labels), labels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert losses["loss"].item() < 0.2
    with torch.no_grad():
        outputs = model.eval()(frames)
    assert outputs["logits"].argmax(-1).tolist() == labels.tolist()
    assert outputs["cls_logits"].argmax(-1).tolist() == labels.tolist()
