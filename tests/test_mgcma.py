"""MGCMA at tiny size: the 2-Wasserstein closed form, the alignment losses and their switches, padding invariance
(group- and layer-norm Wav2Vec2), loading saved encoders through `from_pretrained`, features mode, freezing, and
overfitting a fixed batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

from affectprep.models.mgcma import (TINY_SPEECH, TINY_TEXT, Mgcma, distribution_contrastive_loss,
                                     instance_contrastive_loss, wasserstein2_squared)
from affectprep.models.registry import create_model, list_models
from affectprep.models.text import tiny_tokenizer

TRANSCRIPTS = ["I can't believe you did that!", "Okay.", "That's wonderful news, really.", "Leave me alone"]


def tiny_mgcma(**options) -> Mgcma:
    torch.manual_seed(0)
    return create_model("mgcma", tiny=True, **options)


def tones(lengths: list[int], *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded 16 kHz waveforms (B, max length) of chirps with noise, and their sample masks."""
    generator = torch.Generator().manual_seed(seed)
    waveform = torch.zeros(len(lengths), max(lengths))
    for row, length in enumerate(lengths):
        t = torch.arange(length) / 16000
        pitch = 150 + 100 * row
        waveform[row, :length] = (0.5 * torch.sin(2 * torch.pi * (pitch + 2000 * t) * t)
                                  + 0.05 * torch.randn(length, generator=generator))
    mask = torch.arange(waveform.shape[1]) < torch.tensor(lengths)[:, None]
    return waveform, mask


def collated(lengths: list[int], texts: list[str], labels: list[int], *, seed: int = 0) -> dict:
    waveform, mask = tones(lengths, seed=seed)
    return {"waveform": waveform, "waveform_mask": mask, "texts": texts, "labels": torch.tensor(labels)}


def losses(model: Mgcma, batch: dict) -> dict[str, torch.Tensor]:
    outputs = model(**model.batch_inputs(batch))
    return model.loss({"expression": outputs}, {"expression": batch})


# ----- 2-Wasserstein and the contrastive losses -------------------------------------------------------------------

def test_wasserstein_matches_the_general_gaussian_formula():
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    variance_a, variance_b = rng.uniform(0.1, 3, size=(3, 5)), rng.uniform(0.1, 3, size=(4, 5))
    expected = np.zeros((3, 4))
    for i in range(3):
        for j in range(4):
            cov_a, root_b = np.diag(variance_a[i]), sqrtm(np.diag(variance_b[j]))
            cross = np.real(sqrtm(root_b @ cov_a @ root_b))
            expected[i, j] = (np.sum((mean_a[i] - mean_b[j]) ** 2)
                              + np.trace(cov_a + np.diag(variance_b[j]) - 2 * cross))
    distance = wasserstein2_squared(*(torch.from_numpy(x) for x in (mean_a, variance_a, mean_b, variance_b)))
    np.testing.assert_allclose(distance.numpy(), expected, rtol=1e-10)


def test_wasserstein_is_zero_for_identical_distributions_and_symmetric():
    generator = torch.Generator().manual_seed(1)
    mean, variance = torch.randn(4, 8, generator=generator), torch.rand(4, 8, generator=generator) + 0.1
    distance = wasserstein2_squared(mean, variance, mean, variance)
    assert torch.allclose(distance.diagonal(), torch.zeros(4), atol=1e-6)
    assert (distance - torch.diag(distance.diagonal()) > 0).sum() == 12
    assert torch.allclose(distance, distance.T, atol=1e-6)
    # Same means, different spreads: only the standard-deviation term remains.
    spread = wasserstein2_squared(mean[:1], torch.ones(1, 8), mean[:1], torch.full((1, 8), 4.0))
    assert spread.item() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="means and variances"):
        wasserstein2_squared(mean, variance[:, :4], mean, variance)


def test_distribution_loss_is_the_pairwise_sigmoid_loss_and_trains_its_bias():
    distance = torch.tensor([[0.1, 2.0, 3.0], [1.5, 0.2, 2.5], [2.2, 1.8, 0.3]])
    scale, bias = torch.tensor(4.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    loss = distribution_contrastive_loss(distance, scale, bias)
    similarity = -4.0 * distance.numpy().astype(np.float64) + 1.0
    positives = -np.log1p(np.exp(-np.diag(similarity))).sum()
    negatives = -np.log1p(np.exp(similarity))[~np.eye(3, dtype=bool)].sum()
    assert loss.item() == pytest.approx(-(positives + negatives) / 3, rel=1e-6)
    loss.backward()
    assert bias.grad.abs() > 1e-3 and scale.grad.abs() > 1e-3
    # Matched pairs close and the rest far apart: a better alignment has a lower loss.
    assert distribution_contrastive_loss(distance.T.flip(0), scale, bias) > loss


def test_instance_loss_is_low_for_matched_pairs_and_symmetric():
    generator = torch.Generator().manual_seed(2)
    speech = torch.randn(6, 16, generator=generator)
    text = speech + 0.05 * torch.randn(6, 16, generator=generator)
    matched = instance_contrastive_loss(speech, text, 0.07)
    shuffled = instance_contrastive_loss(speech, text.roll(1, dims=0), 0.07)
    assert matched < 0.05 < 3.0 < shuffled
    assert instance_contrastive_loss(text, speech, 0.07).item() == pytest.approx(matched.item(), rel=1e-5)


# ----- the model --------------------------------------------------------------------------------------------------

def test_mgcma_is_registered_with_the_contract():
    assert "mgcma" in list_models()
    model = tiny_mgcma()
    assert model.tasks == ("expression",)
    assert (model.inputs.frames, model.inputs.audio, model.inputs.text) == (0, True, "transcript")
    assert model.num_classes == 4


def test_forward_and_backward_on_padded_batches_are_finite():
    model = tiny_mgcma().train()
    batch = collated([1800, 700, 1300], TRANSCRIPTS[:3], [0, 3, 1])
    inputs = model.batch_inputs(batch)
    assert inputs["attention_mask"].sum(1).tolist() == [len(model.tokenizer(t)["input_ids"]) for t in TRANSCRIPTS[:3]]
    outputs = model(**inputs)
    assert outputs["logits"].shape == (3, 4)
    for name in ("speech_mean", "speech_variance", "text_mean", "text_variance", "speech_embedding",
                 "text_embedding"):
        assert outputs[name].shape == (3, 32), name
    assert torch.allclose(outputs["speech_mean"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (outputs["speech_variance"] > 0).all()
    parts = model.loss({"expression": outputs}, {"expression": batch})
    assert set(parts) == {"loss", "ce", "distribution", "instance"}
    assert all(torch.isfinite(value) for value in parts.values())
    parts["loss"].backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for name, p in trainable.items() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert model.speech_encoder.encoder.layers[0].attention.q_proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_cross_entropy_uses_class_weights_and_skips_unlabelled_samples():
    model = tiny_mgcma(distribution_alignment=False, instance_alignment=False).eval()
    batch = collated([1000, 1200, 900], TRANSCRIPTS[:3], [2, -1, 0])
    with torch.no_grad():
        logits = model(**model.batch_inputs(batch))["logits"]
        weights = torch.tensor([0.5, 1.0, 2.0, 1.0])
        parts = model.loss({"expression": {"logits": logits}}, {"expression": batch}, class_weights=weights)
    kept = torch.tensor([0, 2])
    expected = torch.nn.functional.cross_entropy(logits[kept], batch["labels"][kept], weight=weights)
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["ce"].item() != pytest.approx(
        torch.nn.functional.cross_entropy(logits[kept], batch["labels"][kept]).item(), rel=1e-3)


def test_frame_mask_follows_the_feature_encoder_output_lengths():
    model = tiny_mgcma().eval()
    waveform, mask = tones([2000, 900, 401])
    tokens, frame_mask = model.encode_speech(waveform, mask)
    expected = [(((n - 10) // 5 + 1) - 8) // 4 + 1 for n in (2000, 900, 401)]   # conv kernels 10, 8; strides 5, 4
    assert frame_mask.sum(1).tolist() == expected
    assert tokens.shape[:2] == (3, max(expected))
    holes = mask.clone()
    holes[0, 100] = False
    with pytest.raises(ValueError, match="prefix"):
        model.encode_speech(waveform, holes)
    with pytest.raises(ValueError, match="at least 18 samples"):
        model.encode_speech(waveform[:, :10], mask[:, :10])


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_padding_does_not_change_a_samples_logits(norm):
    torch.manual_seed(0)
    speech = Wav2Vec2Model(Wav2Vec2Config(**TINY_SPEECH, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer"))
    text = BertModel(BertConfig(**TINY_TEXT), add_pooling_layer=False)
    model = Mgcma(speech, text, tiny_tokenizer(), hidden_dim=32, heads=2).eval()
    alone = collated([900], TRANSCRIPTS[1:2], [1])
    batch = collated([900, 2400], TRANSCRIPTS[1:3], [1, 2])   # the first sample is padded in both modalities
    inputs = model.batch_inputs(batch)
    assert (~inputs["waveform_mask"][0]).sum() == 1500 and (inputs["attention_mask"][0] == 0).sum() > 10
    with torch.no_grad():
        single = model(**model.batch_inputs(alone))
        padded = model(**inputs)
    for name in ("logits", "speech_mean", "text_variance", "speech_embedding"):
        assert torch.allclose(single[name][0], padded[name][0], atol=1e-5), name


def test_features_mode_ignores_what_lies_under_the_padding():
    model = create_model("mgcma", tiny=True, features=True, audio_dim=24, text_dim=20).eval()
    assert model.speech_encoder is None and model.text_encoder is None
    inputs = model.example_inputs(batch_size=3, generator=torch.Generator().manual_seed(0))
    assert inputs["audio_tokens"].shape[-1] == 24 and inputs["text_tokens"].shape[-1] == 20
    noisy = {key: value.clone() for key, value in inputs.items()}
    noisy["audio_tokens"][~inputs["audio_mask"]] = 1e3
    noisy["text_tokens"][~inputs["text_mask"]] = -1e3
    with torch.no_grad():
        assert torch.allclose(model(**inputs)["logits"], model(**noisy)["logits"], atol=1e-5)
    batch = {**inputs, "labels": torch.tensor([0, 1, 2])}
    assert model.batch_inputs(batch).keys() == inputs.keys()
    model.train()
    parts = losses(model, batch)
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="no speech encoder"):
        model(waveform=torch.zeros(1, 1000), text_tokens=inputs["text_tokens"][:1])
    with pytest.raises(ValueError, match=r"audio_tokens must have shape \(B, L, 24\)"):
        model(audio_tokens=torch.zeros(1, 5, 7), text_tokens=inputs["text_tokens"][:1])


def test_saved_tiny_encoders_load_through_from_pretrained(tmp_path):
    torch.manual_seed(3)
    speech = Wav2Vec2Model(Wav2Vec2Config(**TINY_SPEECH))
    text = BertModel(BertConfig(**TINY_TEXT))
    speech.save_pretrained(tmp_path / "speech")
    text.save_pretrained(tmp_path / "text")
    tiny_tokenizer().save_pretrained(tmp_path / "text")

    model = create_model("mgcma", speech_encoder=str(tmp_path / "speech"), text_encoder=str(tmp_path / "text"),
                         hidden_dim=32, heads=2)
    for loaded, saved in ((model.speech_encoder, speech), (model.text_encoder, text)):
        saved_state = saved.state_dict()
        for name, value in loaded.state_dict().items():
            assert torch.equal(value, saved_state[name]), name
    assert model.text_encoder.pooler is None
    batch = collated([1200, 800], TRANSCRIPTS[:2], [0, 1])
    inputs = model.batch_inputs(batch)
    assert torch.equal(inputs["input_ids"], tiny_tokenizer()(TRANSCRIPTS[:2], padding=True,
                                                             return_tensors="pt")["input_ids"])
    assert model(**inputs)["logits"].shape == (2, 4)


@pytest.mark.parametrize("switch,term", [("distribution_alignment", "distribution"),
                                         ("instance_alignment", "instance"), ("token_alignment", None)])
def test_each_alignment_switch_removes_its_part(switch, term):
    batch = collated([1200, 900, 1500], TRANSCRIPTS[:3], [0, 1, 2])
    full = tiny_mgcma(loss_weights=(0.5, 2.0)).eval()
    parts = losses(full, batch)
    assert parts["loss"].item() == pytest.approx(
        (parts["ce"] + 0.5 * parts["distribution"] + 2.0 * parts["instance"]).item(), rel=1e-5)

    ablated = tiny_mgcma(loss_weights=(0.5, 2.0), **{switch: False}).eval()
    ablated_parts = losses(ablated, batch)
    kept = {"ce", "distribution", "instance"} - {term}
    assert set(ablated_parts) == {"loss"} | kept
    weights = {"ce": 1.0, "distribution": 0.5, "instance": 2.0}
    assert ablated_parts["loss"].item() == pytest.approx(sum(weights[k] * ablated_parts[k] for k in kept).item(),
                                                         rel=1e-5)
    names = {name.split(".")[0] for name, _ in ablated.named_parameters()}
    removed = {"distribution_alignment": {"speech_distribution", "text_distribution", "distribution_bias"},
               "instance_alignment": set(), "token_alignment": {"blocks", "speech_norm"}}[switch]
    assert removed <= {name.split(".")[0] for name, _ in full.named_parameters()}
    assert not removed & names
    if switch == "distribution_alignment":
        assert "speech_mean" not in ablated(**ablated.batch_inputs(batch))


def test_frozen_encoders_stay_frozen_and_out_of_the_optimiser():
    finetuned = tiny_mgcma()
    assert not any(p.requires_grad for p in finetuned.speech_encoder.feature_extractor.parameters())
    assert all(p.requires_grad for p in finetuned.speech_encoder.encoder.parameters())
    groups = finetuned.param_groups(1e-3, weight_decay=0.05)
    encoder_params = {id(p) for name, p in finetuned.named_parameters()
                      if name.startswith(("speech_encoder.", "text_encoder.")) and p.requires_grad}
    for group in groups:
        in_encoder = {id(p) in encoder_params for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
        assert group["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in group["params"]) else 0.05)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in finetuned.parameters())

    frozen = tiny_mgcma(freeze_encoders=True).train()
    assert not frozen.speech_encoder.training and not frozen.text_encoder.training and frozen.head.training
    assert not any(p.requires_grad for p in frozen.speech_encoder.parameters())
    grouped = {id(p) for g in frozen.param_groups(1e-3) for p in g["params"]}
    assert not grouped & {id(p) for p in frozen.text_encoder.parameters()}
    parts = losses(frozen, collated([1000, 1100], TRANSCRIPTS[:2], [2, 3]))
    parts["loss"].backward()
    assert all(p.grad is None for p in frozen.text_encoder.parameters())
    assert frozen.head[0].weight.grad is not None


def test_a_tiny_model_overfits_a_fixed_batch():
    model = tiny_mgcma(dropout=0.0).train()
    batch = collated([1400, 1000, 1800, 1200], TRANSCRIPTS, [0, 1, 2, 3])
    inputs = model.batch_inputs(batch)
    optimiser = torch.optim.AdamW(model.param_groups(3e-3, weight_decay=0.0))
    history = []
    for _ in range(40):
        outputs = model(**inputs)
        parts = model.loss({"expression": outputs}, {"expression": batch})
        optimiser.zero_grad()
        parts["loss"].backward()
        optimiser.step()
        history.append({name: value.item() for name, value in parts.items()})
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    assert history[-1]["ce"] < 0.2
    model.eval()
    with torch.no_grad():
        assert model(**inputs)["logits"].argmax(-1).tolist() == [0, 1, 2, 3]
