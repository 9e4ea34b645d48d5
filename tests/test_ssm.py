"""SSM at tiny size: MoE keeps the pretrained block and routes top-2, DPM starts at the FACS prior, the frozen
text encoder passes gradients to the context tokens only and pools where CLIP does, the real checkpoint path,
the masked two-task loss, the ablation switches, parameter groups and the DPM explanation."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from affectprep.models.registry import create_model
from affectprep.models.ssm import TINY_TEXT, TINY_VISION, MoEFeedForward, add_moe
from affectprep.models.text import tiny_tokenizer
from affectprep.pipeline.facs import asset_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAN = float("nan")


@pytest.fixture(scope="module")
def facs() -> dict:
    rows = {row["asset_id"]: row for row in asset_rows()}
    return {"expression": rows["basic7"], "au": rows["bp4d12"], "prior": rows["basic7+bp4d12"]}


def tiny_ssm(facs=None, seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_model("ssm", tiny=True, facs=facs, **options)


def tiny_vision(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)).eval()


def pixels(batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = TINY_VISION["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_backward_on_both_tasks_is_finite_and_trains_the_new_parts(facs):
    model = tiny_ssm(facs).train()
    assert model.tasks == ("expression", "au")
    assert (model.inputs.frames, model.inputs.image_size) == (4, 32)
    expression_batch, au_batch = model.example_inputs(3), model.example_inputs(2)
    outputs = {"expression": model(**expression_batch), "au": model(**au_batch)}
    assert outputs["expression"]["logits"].shape == (3, 7) and outputs["expression"]["au_logits"].shape == (3, 12)
    assert outputs["au"]["au_logits"].shape == (2, 12)
    batches = {"expression": {"labels": torch.tensor([0, 6, 2])},
               "au": {"au": torch.tensor([[1.0] * 6 + [0.0] * 6, [0.0, NAN] * 6])}}
    losses = model.loss(outputs, batches)
    assert torch.isfinite(losses["loss"]) and set(losses) == {"loss", "dfe", "au"}
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    moe = [module for module in model.modules() if isinstance(module, MoEFeedForward)]
    assert len(moe) == 1 and all(module.gamma.grad.abs().sum() > 0 and module.router.weight.grad.abs().sum() > 0
                                 for module in moe)


def test_smoke_build_without_the_asset_synthesises_texts_and_prior():
    model = tiny_ssm(num_classes=5)
    assert model.prior.shape == (5, 4)
    torch.testing.assert_close(model.prior.sum(dim=1), torch.ones(5))
    assert model(**model.example_inputs(2))["logits"].shape == (2, 5)
    with pytest.raises(ValueError, match="needs the FACS asset"):
        create_model("ssm", tiny=False)


def test_moe_with_gamma_zero_is_exactly_the_pretrained_clip_encoder():
    original = tiny_vision()
    patched = copy.deepcopy(original)
    add_moe(patched, layers=1, expert_hidden=16)
    with torch.no_grad():
        reference = original(pixel_values=pixels()).image_embeds
        assert not torch.allclose(patched(pixel_values=pixels()).image_embeds, reference, atol=1e-4)
        for module in patched.modules():
            if isinstance(module, MoEFeedForward):
                module.gamma.zero_()
        torch.testing.assert_close(patched(pixel_values=pixels()).image_embeds, reference, atol=0, rtol=0)


def test_moe_with_private_experts_zeroed_equals_the_pretrained_block():
    original = tiny_vision()
    block = original.vision_model.encoder.layers[-1]
    hidden = torch.randn(2, 5, TINY_VISION["hidden_size"])
    moe = MoEFeedForward(copy.deepcopy(block.mlp), expert_hidden=16)
    with torch.no_grad():
        for expert in moe.experts:
            expert[2].weight.zero_()
            expert[2].bias.zero_()
        torch.testing.assert_close(moe(hidden), block.mlp(hidden), atol=0, rtol=0)


def test_a_clip_state_dict_loads_into_the_patched_encoder_unchanged():
    original = tiny_vision(seed=0)
    patched = tiny_vision(seed=1)
    add_moe(patched, layers=2, expert_hidden=16)
    result = patched.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(any(part in key for part in (".router.", ".experts.", ".gamma"))
                                       for key in result.missing_keys)
    assert all(".mlp." in key for key in result.missing_keys)
    torch.testing.assert_close(patched.vision_model.encoder.layers[0].mlp.fc1.weight,
                               original.vision_model.encoder.layers[0].mlp.fc1.weight)


def test_top2_routing_uses_exactly_two_experts_per_token_with_renormalised_gates():
    torch.manual_seed(0)
    moe = MoEFeedForward(tiny_vision().vision_model.encoder.layers[-1].mlp, num_experts=4, top_k=2,
                         expert_hidden=16)
    with torch.no_grad():
        moe.router.weight.normal_()      # spread the routing so several experts are used
    tokens = torch.randn(40, TINY_VISION["hidden_size"])
    seen = []
    hooks = [expert.register_forward_hook(lambda module, args, output, i=i: seen.append((i, args[0].shape[0])))
             for i, expert in enumerate(moe.experts)]
    with torch.no_grad():
        output = moe(tokens)
    for hook in hooks:
        hook.remove()
    weights, chosen = moe.route(tokens)
    assert chosen.shape == (40, 2) and (chosen[:, 0] != chosen[:, 1]).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(40))
    assert sum(count for _, count in seen) == 2 * 40
    assert len({index for index, _ in seen}) > 2
    with torch.no_grad():
        expected = torch.stack([
            moe.shared(token) + moe.gamma * sum(w * moe.experts[int(e)](token) for w, e in zip(weights[n], chosen[n]))
            for n, token in enumerate(tokens)])
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_dpm_starts_from_the_row_normalised_facs_prior(facs):
    model = tiny_ssm(facs)
    prior = torch.tensor(facs["prior"]["prior_normalised"])
    torch.testing.assert_close(model.dpm.au_to_expression.detach(), prior)
    torch.testing.assert_close(model.dpm.expression_to_au.detach(), prior.T)
    au_to_expression, expression_to_au = model.dpm.maps()
    torch.testing.assert_close(au_to_expression, (prior / 0.01).softmax(dim=1))
    torch.testing.assert_close(expression_to_au, (prior.T / 0.01).softmax(dim=1))
    # At tau_m = 0.01 the prior's row softmax spreads each expression evenly over its FACS AUs (Table S4).
    linked = torch.tensor(facs["prior"]["prior"]) == 1.0
    happy, neutral = facs["expression"]["names"].index("happy"), facs["expression"]["names"].index("neutral")
    expected_happy = linked[happy].float() / linked[happy].sum()
    torch.testing.assert_close(au_to_expression[happy], expected_happy, atol=1e-6, rtol=0)
    torch.testing.assert_close(au_to_expression[neutral], torch.full((12,), 1 / 12))
    assert model.dpm.alpha.item() == pytest.approx(0.1) and model.dpm.beta.item() == pytest.approx(0.1)


def test_dpm_directions_learn_independently(facs):
    model = tiny_ssm(facs, context_tokens=2).train()
    optimiser = torch.optim.SGD(model.dpm.parameters(), lr=10.0)
    outputs = model(**model.example_inputs(2))
    model.loss({"expression": outputs, "au": outputs},
               {"expression": {"labels": torch.tensor([0, 4])}, "au": {"au": torch.ones(2, 12)}})["loss"].backward()
    optimiser.step()
    assert not torch.allclose(model.dpm.expression_to_au, model.dpm.au_to_expression.T)


def test_frozen_text_encoder_gets_no_gradients_while_the_context_tokens_do(facs):
    model = tiny_ssm(facs).train()
    assert not model.text_encoder.training and model.vision.training
    outputs = model(**model.example_inputs(2))
    (outputs["logits"].sum() + outputs["au_logits"].sum()).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.text_encoder.parameters())
    assert model.expression_context.grad.abs().sum() > 0 and model.au_context.grad.abs().sum() > 0


def test_prompt_pooling_matches_clip_own_forward_at_the_eos_token(facs):
    model = tiny_ssm(facs)
    with torch.no_grad():
        placeholder = model.text_encoder.get_input_embeddings()(model.prompt_ids[0, 1])
        model.expression_context.copy_(placeholder.expand_as(model.expression_context))
        model.au_context.copy_(placeholder.expand_as(model.au_context))
        expression, au = model.encode_prompts()
        reference = model.text_encoder(input_ids=model.prompt_ids).text_embeds
    torch.testing.assert_close(torch.cat([expression, au]), reference, atol=1e-5, rtol=1e-5)
    # Every prompt pools at its own [SEP], not at a padding position or the last token.
    tokenizer = tiny_tokenizer()
    assert (model.prompt_ids[torch.arange(19), model.prompt_eos] == tokenizer.sep_token_id).all()
    assert len(set(model.prompt_eos.tolist())) > 1


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_tokenizer()
    text = {key: value for key, value in TINY_TEXT.items() if key != "projection_dim"}
    vision = {key: value for key, value in TINY_VISION.items() if key != "projection_dim"}
    config = CLIPConfig(text_config={**text, "bos_token_id": tokenizer.cls_token_id,
                                     "eos_token_id": tokenizer.sep_token_id,
                                     "pad_token_id": tokenizer.pad_token_id},
                        vision_config=vision, projection_dim=16)
    torch.manual_seed(7)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_saved_clip_checkpoint_loads_through_the_clip_path(facs, tiny_clip_checkpoint):
    saved = CLIPModel.from_pretrained(tiny_clip_checkpoint)
    model = tiny_ssm(facs, clip=str(tiny_clip_checkpoint))
    torch.testing.assert_close(model.vision.vision_model.encoder.layers[-1].mlp.fc1.weight,
                               saved.vision_model.encoder.layers[-1].mlp.fc1.weight)
    torch.testing.assert_close(model.vision.visual_projection.weight, saved.visual_projection.weight)
    torch.testing.assert_close(model.text_encoder.text_projection.weight, saved.text_projection.weight)
    assert isinstance(model.vision.vision_model.encoder.layers[-1].mlp, MoEFeedForward)
    # The loaded encoder is the pretrained one: with gamma 0 the frame embeddings are CLIP's image embeddings.
    with torch.no_grad():
        model.vision.vision_model.encoder.layers[-1].mlp.gamma.zero_()
        frames = model.example_inputs(1)["frames"]
        reference = saved.visual_projection(saved.vision_model(pixel_values=frames[0]).pooler_output)
        torch.testing.assert_close(model.encode_frames(frames)[0], reference, atol=1e-5, rtol=1e-5)
        reference = saved.text_projection(saved.text_model(input_ids=model.prompt_ids).pooler_output)
        placeholder = model.text_encoder.get_input_embeddings()(model.prompt_ids[0, 1])
        model.expression_context.copy_(placeholder.expand_as(model.expression_context))
        model.au_context.copy_(placeholder.expand_as(model.au_context))
        torch.testing.assert_close(torch.cat(model.encode_prompts()), reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model(**model.example_inputs(2))["logits"]).all()


def _outputs(logits=None, au_logits=None) -> dict:
    return {**({"expression": {"logits": logits}} if logits is not None else {}),
            **({"au": {"au_logits": au_logits}} if au_logits is not None else {})}


def test_loss_masks_unknown_aus(facs):
    model = tiny_ssm(facs)
    generator = torch.Generator().manual_seed(0)
    au_logits = torch.randn(3, 12, generator=generator, requires_grad=True)
    targets = torch.randint(0, 2, (3, 12), generator=generator).float()
    unknown = torch.rand(3, 12, generator=generator) < 0.3
    targets[unknown] = NAN
    losses = model.loss(_outputs(au_logits=au_logits), {"au": {"au": targets}})
    known = ~unknown
    expected = F.binary_cross_entropy_with_logits(au_logits[known], targets[known])
    torch.testing.assert_close(losses["au"], expected.detach())
    torch.testing.assert_close(losses["loss"], 2 / 3 * expected)
    losses["loss"].backward()
    assert (au_logits.grad[unknown] == 0).all() and (au_logits.grad[known] != 0).all()


def test_loss_weights_the_tasks_as_eq_14_also_across_separate_calls(facs):
    model = tiny_ssm(facs, lam=2.0)
    generator = torch.Generator().manual_seed(1)
    logits, au_logits = torch.randn(4, 7, generator=generator), torch.randn(4, 12, generator=generator)
    labels = torch.tensor([3, -1, 0, 6])                      # -1: a sample without an expression label
    targets = torch.randint(0, 2, (4, 12), generator=generator).float()
    weights = torch.linspace(0.5, 2.0, 7)
    both = model.loss(_outputs(logits, au_logits), {"expression": {"labels": labels}, "au": {"au": targets}},
                      class_weights=weights)
    dfe = F.cross_entropy(logits[labels >= 0], labels[labels >= 0], weight=weights)
    au = F.binary_cross_entropy_with_logits(au_logits, targets)
    torch.testing.assert_close(both["dfe"], dfe)
    torch.testing.assert_close(both["loss"], dfe / 3 + 2 * au / 3)
    # The trainer backpropagates each task's batch in its own call; the calls add up to the joint loss.
    expression_only = model.loss(_outputs(logits), {"expression": {"labels": labels}}, class_weights=weights)
    au_only = model.loss(_outputs(au_logits=au_logits), {"au": {"au": targets}}, class_weights=weights)
    assert set(expression_only) == {"loss", "dfe"} and set(au_only) == {"loss", "au"}
    torch.testing.assert_close(expression_only["loss"] + au_only["loss"], both["loss"])
    torch.testing.assert_close(tiny_ssm(facs, lam=0.5).loss(_outputs(logits), {"expression": {"labels": labels}},
                                                            class_weights=weights)["loss"], dfe / 1.5)


def test_a_batch_without_labels_gives_a_zero_loss_on_the_graph(facs):
    model = tiny_ssm(facs)
    logits = torch.randn(2, 7, requires_grad=True)
    losses = model.loss(_outputs(logits), {"expression": {"labels": torch.tensor([-1, -1])}})
    assert losses.keys() == {"loss"} and losses["loss"].item() == 0.0
    losses["loss"].backward()
    assert (logits.grad == 0).all()


def test_per_au_weights_weight_the_bce(facs):
    au_weights = torch.arange(1.0, 13.0)
    model = tiny_ssm(facs, au_weights=au_weights)
    au_logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1.0, 0.0] * 6, [NAN] * 6 + [1.0] * 6])
    known = ~torch.isnan(targets)
    per_label = F.binary_cross_entropy_with_logits(au_logits, targets.nan_to_num(0.0), reduction="none")
    weights = known * au_weights
    torch.testing.assert_close(model.loss(_outputs(au_logits=au_logits), {"au": {"au": targets}})["au"],
                               (per_label * weights).sum() / weights.sum())


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_baseline_without_tsp_has_linear_heads_and_no_text_side(facs):
    baseline = tiny_ssm(facs, tsp=False, dpm=False)
    names = _trainable(baseline)
    assert baseline.text_encoder is None and baseline.dpm is None
    assert {"expression_head.weight", "au_head.weight"} <= names
    assert not any("context" in name or "text_encoder" in name for name in names)
    outputs = baseline(**baseline.example_inputs(2))
    assert outputs["logits"].shape == (2, 7) and outputs["au_logits"].shape == (2, 12)
    with pytest.raises(ValueError, match="dpm=True needs tsp=True"):
        tiny_ssm(facs, tsp=False)


def test_tsp_without_dpm_classifies_against_the_plain_prototypes(facs):
    full, plain = tiny_ssm(facs, seed=0), tiny_ssm(facs, seed=0, dpm=False)
    assert _trainable(full) - _trainable(plain) == {"dpm.au_to_expression", "dpm.expression_to_au", "dpm.alpha",
                                                    "dpm.beta"}
    frames = full.example_inputs(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(full(**frames)["logits"], plain(**frames)["logits"])
        expression, au = plain.prototypes()
        raw_expression, raw_au = plain.encode_prompts()
        torch.testing.assert_close(expression, F.normalize(raw_expression, dim=-1))
        # With DPM, each prototype gains alpha (beta) times its mapped counterpart (Eqs. 21-24).
        mapped_expression, mapped_au = full.prototypes()
        normal_expression, normal_au = (F.normalize(t, dim=-1) for t in full.encode_prompts())
        au_to_expression, expression_to_au = full.dpm.maps()
        torch.testing.assert_close(mapped_expression, normal_expression + 0.1 * au_to_expression @ normal_au)
        torch.testing.assert_close(mapped_au, normal_au + 0.1 * expression_to_au @ normal_expression)


def test_dpm_random_init_and_transposed_mode(facs):
    prior = torch.tensor(facs["prior"]["prior_normalised"])
    random = tiny_ssm(facs, dpm_init="random")
    start = random.dpm.au_to_expression.detach()
    assert not torch.allclose(start, prior) and (start >= 0).all()
    torch.testing.assert_close(start.sum(dim=1), torch.ones(7))
    torch.testing.assert_close(random.prior, prior)       # the prior is still kept, for the explanation

    transposed = tiny_ssm(facs, dpm_mode="transposed")
    assert transposed.dpm.expression_to_au is None
    assert "dpm.expression_to_au" not in _trainable(transposed)
    with torch.no_grad():
        transposed.dpm.au_to_expression.add_(torch.randn(7, 12) * 0.05)
    forward, reverse = transposed.dpm.maps()
    torch.testing.assert_close(reverse, (transposed.dpm.au_to_expression.T / 0.01).softmax(dim=1))
    with pytest.raises(ValueError, match="dpm_mode"):
        tiny_ssm(facs, dpm_mode="both")


def test_text_forms_pick_the_asset_lists(facs):
    tokenizer = tiny_tokenizer()
    context = "x " * 8
    expected = {"words": "happiness", "standalone": "a facial expression of happiness",
                "compound": "cheek raiser, lip corner puller"}
    for form, happy in expected.items():
        model = tiny_ssm(facs, text_form=form)
        prompts = tokenizer.batch_decode(model.prompt_ids, skip_special_tokens=True)
        assert prompts[0] == context + happy
        assert prompts[7] == context + "inner brow raiser"     # AU prompts are the FACS description in every form
    words, compound = tiny_ssm(facs, text_form="words"), tiny_ssm(facs, text_form="compound")
    frames = words.example_inputs(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(words(**frames)["logits"], compound(**frames)["logits"])
    with pytest.raises(ValueError, match="text_form"):
        tiny_ssm(facs, text_form="sentence")


def test_context_token_count_and_moe_switch(facs):
    no_context = tiny_ssm(facs, context_tokens=0)
    assert no_context.expression_context.shape == (0, TINY_TEXT["hidden_size"])
    assert torch.isfinite(no_context(**no_context.example_inputs(1))["logits"]).all()
    plain = tiny_ssm(facs, moe_layers=0)
    assert not any(isinstance(module, MoEFeedForward) for module in plain.modules())
    both = tiny_ssm(facs, moe_layers=2)
    assert sum(isinstance(module, MoEFeedForward) for module in both.modules()) == 2


def test_param_groups_cover_every_trainable_parameter_once(facs):
    model = tiny_ssm(facs, backbone_lr_scale=0.01)
    groups = model.param_groups(lr=1e-4, weight_decay=0.05)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(_trainable(model))
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    moe = model.vision.vision_model.encoder.layers[-1].mlp
    assert lr_of[id(moe.fc1.weight)] == pytest.approx(1e-6)                     # pretrained shared expert
    assert lr_of[id(model.vision.vision_model.embeddings.patch_embedding.weight)] == pytest.approx(1e-6)
    for new in (moe.router.weight, moe.experts[0][0].weight, moe.gamma, model.expression_context,
                model.dpm.au_to_expression, model.au_temporal.positions):
        assert lr_of[id(new)] == pytest.approx(1e-4)
    assert decay_of[id(model.dpm.au_to_expression)] == 0.0 and decay_of[id(moe.router.weight)] == 0.05
    assert decay_of[id(moe.gamma)] == 0.0


def test_au_logits_read_the_centre_frame_after_temporal_mixing(facs):
    model = tiny_ssm(facs).eval()
    frames = model.example_inputs(1, generator=torch.Generator().manual_seed(0))["frames"]
    with torch.no_grad():
        per_frame = model.encode_frames(frames)
        temporal = model.au_temporal
        encoded = temporal.norm(temporal.transformer(per_frame + temporal.positions))
        torch.testing.assert_close(temporal(per_frame), encoded[:, 2])
        changed = frames.clone()
        changed[:, 0] += 1.0              # another frame than the centre still moves the AU prediction
        assert not torch.allclose(model(frames)["au_logits"], model(changed)["au_logits"])


def test_batch_inputs_take_the_collated_frames(facs):
    model = tiny_ssm(facs)
    frames = torch.randn(2, 4, 3, 32, 32)
    batch = {"frames": frames, "labels": torch.tensor([1, -1]), "au": torch.zeros(2, 12),
             "sample_ids": ["a", "b"], "views": torch.zeros(2, dtype=torch.long)}
    assert model.batch_inputs(batch).keys() == {"frames"}
    torch.testing.assert_close(model.batch_inputs(batch)["frames"], frames)
    with pytest.raises(ValueError, match="expects frames of shape"):
        model(torch.randn(2, 3, 3, 32, 32))


def test_explain_draws_the_learnt_maps_beside_the_prior(facs, tmp_path):
    model = tiny_ssm(facs)
    paths = model.explain(None, tmp_path / "explain")
    assert len(paths) == 1 and paths[0].suffix == ".png"
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 5000
    with pytest.raises(ValueError, match="no DPM"):
        tiny_ssm(facs, dpm=False).explain(None, tmp_path)
