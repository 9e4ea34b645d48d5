"""MGCMA at tiny size: the 2-Wasserstein closed form and W, the utterance Gaussian of its tokens, Eq. 5 and the
two contrastive losses against plain references, the alignment switches and the stage order (each stage reading
what the previous left; DAM as a side branch), padding invariance (group- and layer-norm Wav2Vec2), waveform
normalisation as the checkpoint's feature extractor says, loading saved encoders through `from_pretrained`,
features mode, freezing, explain, every ablation row, and overfitting a fixed batch."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm
from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from affectprep.models.grace import masked_mean

from affectprep.models.mgcma import (TINY_SPEECH, TINY_TEXT, Mgcma, distribution_contrastive_loss,
                                     instance_contrastive_loss, mixture_gaussian, wasserstein2, wasserstein2_squared)
from affectprep.models.registry import create_model, list_models, model_ablations
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


def test_w_is_the_square_root_of_the_closed_form():
    rng = np.random.default_rng(3)
    mean_a, mean_b = rng.normal(size=(2, 4)), rng.normal(size=(3, 4))
    variance_a, variance_b = rng.uniform(0.1, 2, size=(2, 4)), rng.uniform(0.1, 2, size=(3, 4))
    expected = np.array([[np.sqrt(np.sum((mean_a[i] - mean_b[j]) ** 2)
                                  + np.sum((np.sqrt(variance_a[i]) - np.sqrt(variance_b[j])) ** 2))
                          for j in range(3)] for i in range(2)])
    distance = wasserstein2(*(torch.from_numpy(x) for x in (mean_a, variance_a, mean_b, variance_b)))
    np.testing.assert_allclose(distance.numpy(), expected, rtol=1e-7)
    # Where two distributions coincide the gradient stays finite.
    mean = torch.zeros(1, 4, requires_grad=True)
    wasserstein2(mean, torch.ones(1, 4), torch.zeros(1, 4), torch.ones(1, 4)).sum().backward()
    assert torch.isfinite(mean.grad).all()


def test_utterance_gaussian_has_the_moments_of_its_tokens_mixture():
    generator = torch.Generator().manual_seed(4)
    means, variances = torch.randn(2, 5, 3, generator=generator), torch.rand(2, 5, 3, generator=generator) + 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    mean, variance = mixture_gaussian(means, variances, mask)
    for b, n in enumerate((5, 2)):
        # Moments of the mixture (1/n) sum_i N(mu_i, sigma_i): E[x] and E[x^2] - E[x]^2, per dimension.
        m = means[b, :n].numpy().astype(np.float64)
        v = variances[b, :n].numpy().astype(np.float64)
        expected_mean = m.mean(0)
        expected_variance = (v + m ** 2).mean(0) - expected_mean ** 2
        np.testing.assert_allclose(mean[b].numpy(), expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variance[b].numpy(), expected_variance, rtol=1e-4, atol=1e-6)


def test_eq_5_similarity_uses_w_and_is_the_logit_of_the_pairwise_sigmoid_loss():
    model = tiny_mgcma(features=True, audio_dim=8, text_dim=8).eval()
    generator = torch.Generator().manual_seed(5)
    output = {name: torch.rand(3, 32, generator=generator) + (0.1 if "variance" in name else 0)
              for name in ("speech_mean", "speech_variance", "text_mean", "text_variance")}
    p, q = model.log_distribution_scale.exp().item(), model.distribution_bias.item()
    assert p > 0
    similarity = model.distribution_similarity(output)
    for i in range(3):
        for j in range(3):
            w = np.sqrt(np.sum((output["speech_mean"][i] - output["text_mean"][j]).numpy() ** 2)
                        + np.sum((output["speech_variance"][i].sqrt() - output["text_variance"][j].sqrt()).numpy()
                                 ** 2))
            assert similarity[i, j].item() == pytest.approx(-p * w + q, rel=1e-5, abs=1e-6)
    squared = tiny_mgcma(features=True, audio_dim=8, text_dim=8, squared_distance=True)
    w2 = wasserstein2_squared(*(output[n] for n in ("speech_mean", "speech_variance", "text_mean", "text_variance")))
    torch.testing.assert_close(squared.distribution_similarity(output),
                               -squared.log_distribution_scale.exp() * w2 + squared.distribution_bias)

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.2, 3.0]], requires_grad=True)
    loss = distribution_contrastive_loss(logits)
    values = logits.detach().numpy().astype(np.float64)
    positives = -np.log1p(np.exp(-np.diag(values))).sum()
    negatives = -np.log1p(np.exp(values))[~np.eye(3, dtype=bool)].sum()
    assert loss.item() == pytest.approx(-(positives + negatives) / 3, rel=1e-6)
    # The bias moves the loss (a softmax over the batch would cancel it), and matched pairs lower it.
    assert distribution_contrastive_loss(logits.detach() + 1).item() != pytest.approx(loss.item())
    assert distribution_contrastive_loss(logits.detach().flip(0)) > loss


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_instance_loss_is_the_symmetric_infonce_of_its_similarity(similarity):
    generator = torch.Generator().manual_seed(2)
    speech, text = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    a, b = speech.numpy().astype(np.float64), text.numpy().astype(np.float64)
    if similarity == "cosine":
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / (0.07 if similarity == "cosine" else 1.0)

    def cross_entropy(rows):
        return np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(rows)])
    expected = (cross_entropy(logits) + cross_entropy(logits.T)) / 2
    assert instance_contrastive_loss(speech, text, similarity, 0.07).item() == pytest.approx(expected, rel=1e-5)
    matched = instance_contrastive_loss(speech, speech + 0.05 * text, similarity, 0.07)
    assert matched < instance_contrastive_loss(speech, speech.roll(1, dims=0), similarity, 0.07)
    with pytest.raises(ValueError, match="dot' or 'cosine"):
        instance_contrastive_loss(speech, text, "l2")


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
                 "text_embedding", "speech_instance", "text_instance"):
        assert outputs[name].shape == (3, 32), name
    assert (outputs["speech_variance"] > 0).all()
    assert "text_to_speech_attention" not in outputs   # drawn in evaluation only
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
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["ce"] < 0.2 and history[-1]["instance"] < 0.1
    # The distribution loss falls more slowly (the Gaussians of random tiny encoders start alike): 3.3 -> 1.9 here.
    assert history[-1]["distribution"] < 0.8 * history[0]["distribution"]
    model.eval()
    with torch.no_grad():
        assert model(**inputs)["logits"].argmax(-1).tolist() == [0, 1, 2, 3]


# ----- module order, waveform normalisation, explain, ablation rows -----------------------------------------------

def record_input(module: torch.nn.Module) -> dict:
    """The first positional argument of every call of `module`, in call order."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_stages_run_in_order_each_reading_what_the_previous_left():
    batch = collated([1200, 900], TRANSCRIPTS[:2], [0, 1])
    # The paper's order: TAM reads DAM's token means, IAM contrasts the pooled TAM output.
    model = tiny_mgcma(dropout=0.0).eval()
    tam_input = record_input(model.blocks[0].self_attention[0])
    means = []
    model.speech_distribution.mean.register_forward_hook(lambda m, args, out: means.append(out.detach()))
    with torch.no_grad():
        outputs = model(**model.batch_inputs(batch))
    torch.testing.assert_close(tam_input[0], means[0])
    torch.testing.assert_close(outputs["speech_instance"], outputs["speech_embedding"])

    # The side branch: TAM reads the projected tokens DAM read, the Gaussians feed only the loss.
    side = tiny_mgcma(dropout=0.0, distribution_mode="side").eval()
    tam_input, dam_input = (record_input(side.blocks[0].self_attention[0]),
                            record_input(side.speech_distribution.attention))
    with torch.no_grad():
        side(**side.batch_inputs(batch))
    torch.testing.assert_close(tam_input[0], dam_input[0])

    # Another order: IAM first (the pooled projections), then TAM, then DAM on TAM's output.
    swapped = tiny_mgcma(dropout=0.0, module_order="instance,token,distribution").eval()
    projected, dam_input = record_input(swapped.blocks[0].self_attention[0]), \
        record_input(swapped.speech_distribution.attention)
    normed = []
    swapped.speech_norm.register_forward_hook(lambda m, args, out: normed.append(out.detach()))
    with torch.no_grad():
        outputs = swapped(**swapped.batch_inputs(batch))
        mask = outputs["speech_mask"]
    torch.testing.assert_close(outputs["speech_instance"], masked_mean(projected[0], mask))
    torch.testing.assert_close(dam_input[0], normed[0])
    with pytest.raises(ValueError, match="module_order"):
        tiny_mgcma(module_order="token,instance")
    with pytest.raises(ValueError, match="distribution_mode"):
        tiny_mgcma(distribution_mode="branch")


@pytest.mark.parametrize("do_normalize", [True, False])
def test_the_encoder_input_is_normalised_as_the_checkpoints_feature_extractor_says(tmp_path, do_normalize):
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**TINY_SPEECH)).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(tmp_path)
    model = create_model("mgcma", tiny=True, speech_encoder=str(tmp_path)).eval()
    assert model.normalize_waveform is do_normalize
    seen = record_input(model.speech_encoder)
    waveform, mask = tones([1200, 700])
    with torch.no_grad():
        model.encode_speech(waveform, mask)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=do_normalize)
    for row, length in enumerate((1200, 700)):   # group-norm Wav2Vec2: each utterance alone, unpadded
        expected = extractor(waveform[row, :length].numpy(), sampling_rate=16000, return_tensors="pt").input_values
        torch.testing.assert_close(seen[row], expected, rtol=1e-5, atol=1e-5)


def test_explain_draws_words_against_speech_frames(tmp_path):
    model = tiny_mgcma().eval()
    batch = collated([1600, 900], TRANSCRIPTS[2:4], [1, 2])
    batch["sample_ids"] = ["Ses01F_impro01_F000", "Ses01F_impro01_M001"]
    with torch.no_grad():
        outputs = model(**model.batch_inputs(batch))
    png, record = model.explain(batch, outputs, tmp_path, ["neutral", "happy", "angry", "sad"])
    assert png.name == "Ses01F_impro01_F000-token-attention.png" and record.suffix == ".json"
    image = cv2.imread(str(png))
    assert image is not None and min(image.shape[:2]) > 150
    data = json.loads(record.read_text())
    assert data["words"] == ["That", "'", "s", "wonderful", "news", ",", "really", "."]
    frames = int(outputs["speech_mask"][0].sum())
    matrix = np.array(data["text_to_speech"])
    assert matrix.shape == (len(data["words"]), frames)
    np.testing.assert_allclose(matrix.sum(1), 1.0, rtol=1e-5)        # each word's attention over the frames
    shares = np.array(data["speech_to_text"]).sum(1)   # each frame over the words; the rest on [CLS] / [SEP]
    assert ((shares > 0) & (shares <= 1 + 1e-6)).all()
    assert data["seconds_per_frame"] == pytest.approx(1600 / 16000 / frames)
    with pytest.raises(ValueError, match="no token alignment"):
        ablated = tiny_mgcma(token_alignment=False).eval()
        with torch.no_grad():
            ablated.explain(batch, ablated(**ablated.batch_inputs(batch)), tmp_path, ["a", "b", "c", "d"])


def test_every_registered_ablation_row_builds_and_trains_a_step():
    rows = model_ablations("mgcma")
    assert {a.table for a in rows} == {"Ablation: alignment modules", "Ablation: module order"}
    assert len([a for a in rows if a.table == "Ablation: module order"]) == 7
    batch = collated([1000, 1200, 900], TRANSCRIPTS[:3], [0, 1, 2])
    for ablation in rows:
        assert all(key.startswith("model.") for key in ablation.set), ablation.row
        model = tiny_mgcma(**{key.removeprefix("model."): value for key, value in ablation.set.items()}).train()
        parts = losses(model, batch)
        parts["loss"].backward()
        assert torch.isfinite(parts["loss"]), ablation.row
