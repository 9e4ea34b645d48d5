"""SSM at tiny size, each equation against a plain reference computation: the MoE with private experts per task
(Eqs. S1-S2), the temporal models' centre frame (Eq. 5), the TSP prompts through the frozen text encoder (Eqs.
11, 17-18), the DPM (Eqs. 19-24) and its Table VI / VII variants, the cosine logits (Eq. 25), the losses (Eqs. 12-14),
single-task (STL) models, parameter groups, the registered ablation rows and the DPM explanation."""
from __future__ import annotations

import copy
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from affectprep.models.layers.moe import MoEFeedForward, add_moe, routed_to
from affectprep.models.registry import create_model, model_ablations, model_builder
from affectprep.models.ssm import TINY_TEXT, TINY_VISION, DynamicPriorMapping, LabelAxisMapping
from affectprep.models.text import tiny_tokenizer
from affectprep.pipeline.facs import asset_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAN = float("nan")
TASKS = ("expression", "au")


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


def frames_of(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return model.example_inputs(batch, generator=torch.Generator().manual_seed(seed))["frames"]


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _outputs(logits=None, au_logits=None) -> dict:
    return {**({"expression": {"logits": logits}} if logits is not None else {}),
            **({"au": {"au_logits": au_logits}} if au_logits is not None else {})}


# ---- the whole model ----------------------------------------------------------------------------------------------

def test_each_task_batch_trains_its_own_branch_and_the_shared_parts(facs):
    model = tiny_ssm(facs).train()
    assert model.tasks == TASKS and (model.inputs.frames, model.inputs.image_size) == (4, 32)
    expression = model(**model.example_inputs(3, task="expression"))
    au = model(**model.example_inputs(2, task="au"))
    assert expression.keys() == {"logits"} and expression["logits"].shape == (3, 7)
    assert au.keys() == {"au_logits"} and au["au_logits"].shape == (2, 12)
    batches = {"expression": {"labels": torch.tensor([0, 6, 2])},
               "au": {"au": torch.tensor([[1.0] * 6 + [0.0] * 6, [0.0, NAN] * 6])}}
    model.loss({"au": au}, batches)["loss"].backward()
    graded = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # An AU batch routes through the AU experts only, and reads the AU temporal model; DPM links it to the
    # expression prototypes, so the expression context learns from it too.
    assert any(".experts.au." in name for name in graded) and not any(".experts.expression." in n for n in graded)
    assert not any(name.startswith("expression_temporal") for name in graded)
    assert {"au_context", "expression_context", "dpm.expression_to_au"} <= graded
    model.zero_grad()
    model.loss({"expression": expression}, batches)["loss"].backward()
    # An expression batch reads everything but the AU branch and the map into the AU prototypes (Eqs. 22, 24).
    au_side = {"dpm.beta", "dpm.expression_to_au"}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not (".au." in name or name.startswith("au_temporal") or name in au_side):
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_forward_refuses_a_task_the_model_does_not_learn_and_frames_of_the_wrong_shape(facs):
    model = tiny_ssm(facs)
    with pytest.raises(ValueError, match="not 'target'"):
        model(frames_of(model), task="target")
    with pytest.raises(ValueError, match="expects frames of shape"):
        model(torch.randn(2, 3, 3, 32, 32), task="au")


def test_batch_inputs_take_the_collated_frames_and_name_the_task_by_its_labels(facs):
    model = tiny_ssm(facs)
    frames = torch.randn(2, 4, 3, 32, 32)
    expression = {"frames": frames, "labels": torch.tensor([1, 0]), "sample_ids": ["a", "b"],
                  "views": torch.zeros(2, dtype=torch.long)}
    au = {**expression, "labels": torch.tensor([-1, -1]), "au": torch.zeros(2, 12)}
    assert model.batch_inputs(expression)["task"] == "expression" and model.batch_inputs(au)["task"] == "au"
    assert model.batch_inputs(au)["frames"] is frames


def test_smoke_build_without_the_asset_synthesises_texts_and_prior():
    model = tiny_ssm(num_classes=5)
    assert model.prior.shape == (5, 4)
    torch.testing.assert_close(model.prior.sum(dim=1), torch.ones(5))
    assert model(**model.example_inputs(2))["logits"].shape == (2, 5)
    with pytest.raises(ValueError, match="needs the FACS asset"):
        create_model("ssm", tiny=False)


def test_no_deprecation_warning_from_the_text_encoder(facs):
    model = tiny_ssm(facs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**model.example_inputs(1))


# ---- MoE (supplementary Eqs. S1, S2) -----------------------------------------------------------------------------

def moe_layer(seed: int = 0, **options) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(copy.deepcopy(tiny_vision().vision_model.encoder.layers[-1].mlp), TASKS,
                          expert_hidden=16, **options)


def test_moe_matches_eq_s2_per_token_with_each_tasks_own_experts():
    moe = moe_layer()
    with torch.no_grad():
        for router in moe.routers.values():
            router.weight.normal_()          # spread the routing so several experts are used
    tokens = torch.randn(40, TINY_VISION["hidden_size"], generator=torch.Generator().manual_seed(2))
    for task in TASKS:
        moe.task = task
        with torch.no_grad():
            output = moe(tokens)
            for n, token in enumerate(tokens):
                gates = torch.softmax(moe.routers[task].weight @ token + moe.routers[task].bias, dim=0)
                top = sorted(range(4), key=lambda j: -gates[j])[:2]
                experts = moe.experts[task]
                private = sum(gates[j] / sum(gates[i] for i in top)
                              * (experts[j].fc2.weight @ F.gelu(experts[j].fc1.weight @ token + experts[j].fc1.bias)
                                 + experts[j].fc2.bias) for j in top)
                shared = moe.fc2(moe.activation_fn(moe.fc1(token)))
                torch.testing.assert_close(output[n], shared + moe.gamma * private, atol=1e-5, rtol=1e-5)
    moe.task = "expression"
    expression = moe(tokens)
    moe.task = "au"
    assert not torch.allclose(expression, moe(tokens))


def test_top2_routing_runs_exactly_two_private_experts_per_token():
    moe = moe_layer()
    with torch.no_grad():
        moe.routers["au"].weight.normal_()
    tokens = torch.randn(40, TINY_VISION["hidden_size"])
    seen = []
    hooks = [expert.register_forward_hook(lambda module, args, output, i=i: seen.append((i, args[0].shape[0])))
             for i, expert in enumerate(moe.experts["au"])]
    untouched = [expert.register_forward_hook(lambda *args: pytest.fail("an expression expert ran"))
                 for expert in moe.experts["expression"]]
    moe.task = "au"
    with torch.no_grad():
        moe(tokens)
    for hook in hooks + untouched:
        hook.remove()
    weights, chosen = moe.route(tokens, "au")
    assert chosen.shape == (40, 2) and (chosen[:, 0] != chosen[:, 1]).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(40))
    assert sum(count for _, count in seen) == 2 * 40 and len({index for index, _ in seen}) > 2


def test_expert_activation_none_is_eq_s1_as_printed():
    moe = moe_layer(expert_activation="none")
    expert = moe.experts["expression"][0]
    token = torch.randn(TINY_VISION["hidden_size"])
    with torch.no_grad():
        expected = expert.fc2.weight @ (expert.fc1.weight @ token + expert.fc1.bias) + expert.fc2.bias
        torch.testing.assert_close(expert(token), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert_activation"):
        moe_layer(expert_activation="relu")


def test_moe_outside_routed_to_is_an_error_and_the_task_is_reset_after():
    patched = tiny_vision()
    add_moe(patched, layers=1, tasks=TASKS, expert_hidden=16)
    with pytest.raises(RuntimeError, match="routed_to"):
        patched(pixel_values=pixels())
    with routed_to(patched, "au"):
        patched(pixel_values=pixels())
    assert all(m.task is None for m in patched.modules() if isinstance(m, MoEFeedForward))


def test_moe_with_gamma_zero_is_exactly_the_pretrained_clip_encoder():
    original = tiny_vision()
    patched = copy.deepcopy(original)
    add_moe(patched, layers=1, tasks=TASKS, expert_hidden=16)
    with torch.no_grad(), routed_to(patched, "expression"):
        reference = original(pixel_values=pixels()).image_embeds
        assert not torch.allclose(patched(pixel_values=pixels()).image_embeds, reference, atol=1e-4)
        for module in patched.modules():
            if isinstance(module, MoEFeedForward):
                module.gamma.zero_()
        torch.testing.assert_close(patched(pixel_values=pixels()).image_embeds, reference, atol=0, rtol=0)


def test_a_clip_state_dict_loads_into_the_patched_encoder_unchanged():
    original = tiny_vision(seed=0)
    patched = tiny_vision(seed=1)
    add_moe(patched, layers=2, tasks=TASKS, expert_hidden=16)
    result = patched.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".mlp.routers." in key or ".mlp.experts." in key or key.endswith(".gamma")
                                       for key in result.missing_keys)
    assert {key.split(".mlp.")[1].split(".")[1] for key in result.missing_keys if "gamma" not in key} == set(TASKS)
    torch.testing.assert_close(patched.vision_model.encoder.layers[0].mlp.fc1.weight,
                               original.vision_model.encoder.layers[0].mlp.fc1.weight)


# ---- temporal models (Eqs. 3-5) ----------------------------------------------------------------------------------

def test_au_logits_read_the_centre_frame_after_temporal_mixing(facs):
    model = tiny_ssm(facs).eval()
    frames = frames_of(model, 1)
    with torch.no_grad():
        per_frame = model.encode_frames(frames, "au")
        temporal = model.au_temporal
        encoded = temporal.norm(temporal.transformer(per_frame + temporal.positions))
        torch.testing.assert_close(temporal(per_frame), encoded[:, 4 // 2])       # t = floor(n / 2)
        changed = frames.clone()
        changed[:, 0] += 1.0              # another frame than the centre still moves the AU prediction
        assert not torch.allclose(model(frames, task="au")["au_logits"], model(changed, task="au")["au_logits"])


# ---- TSP (Eqs. 11, 17, 18) ---------------------------------------------------------------------------------------

def reference_prompts(model) -> torch.Tensor:
    """CLIP's text transformer by hand: context vectors after BOS, learnt positions, an explicit causal mask,
    pooling at each prompt's first [SEP], projection."""
    text = model.text_encoder.text_model
    ids = model.prompt_ids
    context = torch.cat([model.expression_context.expand(7, -1, -1), model.au_context.expand(12, -1, -1)])
    tokens = text.embeddings.token_embedding(ids)
    tokens = torch.cat([tokens[:, :1], context, tokens[:, 1 + context.shape[1]:]], dim=1)
    hidden = tokens + text.embeddings.position_embedding.weight[:ids.shape[1]]
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    for layer in text.encoder.layers:
        hidden = layer(hidden, mask)
    hidden = text.final_layer_norm(hidden)
    eos = (ids == tiny_tokenizer().sep_token_id).int().argmax(dim=1)
    return model.text_encoder.text_projection(hidden[torch.arange(len(ids)), eos])


def test_prompts_put_the_context_tokens_after_bos_through_the_frozen_encoder(facs):
    model = tiny_ssm(facs)
    with torch.no_grad():
        prompts = model.encode_prompts()
        torch.testing.assert_close(torch.cat([prompts["expression"], prompts["au"]]), reference_prompts(model),
                                   atol=1e-5, rtol=1e-5)
        # With the placeholder's own embedding as context, the prompts are CLIP's embeddings of the token ids.
        placeholder = model.text_encoder.get_input_embeddings()(model.prompt_ids[0, 1])
        model.expression_context.copy_(placeholder.expand_as(model.expression_context))
        model.au_context.copy_(placeholder.expand_as(model.au_context))
        reference = model.text_encoder(input_ids=model.prompt_ids).text_embeds
        torch.testing.assert_close(torch.cat(list(model.encode_prompts().values())), reference)


def test_frozen_text_encoder_gets_no_gradients_while_the_context_tokens_do(facs):
    model = tiny_ssm(facs).train()
    assert not model.text_encoder.training and model.vision.training
    model(**model.example_inputs(2))["logits"].sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in model.text_encoder.parameters())
    assert model.expression_context.grad.abs().sum() > 0 and model.au_context.grad.abs().sum() > 0


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
    torch.testing.assert_close(model.text_encoder.text_projection.weight, saved.text_projection.weight)
    assert isinstance(model.vision.vision_model.encoder.layers[-1].mlp, MoEFeedForward)
    # The loaded encoder is the pretrained one: with gamma 0 the frame embeddings are CLIP's image embeddings.
    with torch.no_grad():
        model.vision.vision_model.encoder.layers[-1].mlp.gamma.zero_()
        frames = frames_of(model, 1)
        reference = saved.visual_projection(saved.vision_model(pixel_values=frames[0]).pooler_output)
        torch.testing.assert_close(model.encode_frames(frames, "au")[0], reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(list(model.encode_prompts().values())), reference_prompts(model),
                                   atol=1e-5, rtol=1e-5)


def test_a_tokenizer_that_disagrees_with_the_encoder_about_eos_is_refused(facs, tiny_clip_checkpoint):
    config = CLIPConfig.from_pretrained(tiny_clip_checkpoint)
    config.text_config.eos_token_id = tiny_tokenizer().pad_token_id
    config.save_pretrained(tiny_clip_checkpoint)
    try:
        with pytest.raises(ValueError, match="would pool the prompts elsewhere"):
            tiny_ssm(facs, clip=str(tiny_clip_checkpoint))
    finally:
        config.text_config.eos_token_id = tiny_tokenizer().sep_token_id
        config.save_pretrained(tiny_clip_checkpoint)


# ---- DPM (Eqs. 19-24) and the logits (Eq. 25) --------------------------------------------------------------------

def softmax_rows(matrix: np.ndarray, tau: float) -> np.ndarray:
    scaled = matrix / tau
    scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def test_dpm_and_the_logits_match_eqs_19_to_25_in_numpy(facs):
    model = tiny_ssm(facs).eval()
    p = np.asarray(facs["prior"]["prior"], dtype=np.float64)
    w0 = p / p.sum(axis=1, keepdims=True)                                                     # Eq. 19
    np.testing.assert_allclose(model.dpm.au_to_expression.detach().numpy(), w0, atol=1e-7)
    np.testing.assert_allclose(model.dpm.expression_to_au.detach().numpy(), w0.T, atol=1e-7)  # Eq. 20
    with torch.no_grad():
        model.dpm.expression_to_au.add_(torch.randn(12, 7) * 0.01)       # two independent matrices from here on
        raw = model.encode_prompts()
        t_exp, t_au = (F.normalize(raw[task], dim=-1).double().numpy() for task in TASKS)
        w_ae, w_ea = (m.detach().double().numpy() for m in (model.dpm.au_to_expression, model.dpm.expression_to_au))
        expected_exp = t_exp + 0.1 * softmax_rows(w_ae, 0.01) @ t_au                             # Eqs. 21, 23
        expected_au = t_au + 0.1 * softmax_rows(w_ea, 0.01) @ t_exp                              # Eqs. 22, 24
        prototypes = model.prototypes()
        np.testing.assert_allclose(prototypes["expression"].numpy(), expected_exp, atol=1e-5)
        np.testing.assert_allclose(prototypes["au"].numpy(), expected_au, atol=1e-5)
        frames = frames_of(model, 2)
        features = model.au_temporal(model.encode_frames(frames, "au")).double().numpy()
        cosine = (features @ expected_au.T) / (np.linalg.norm(features, axis=1, keepdims=True)
                                               * np.linalg.norm(expected_au, axis=1)[None])       # Eq. 25
        np.testing.assert_allclose(model(frames, task="au")["au_logits"].numpy(), cosine / 0.01, atol=1e-3)


def test_at_tau_m_001_only_the_linked_entries_and_unlinked_rows_of_the_prior_can_learn(facs):
    prior = torch.tensor(facs["prior"]["prior_normalised"])
    linked = torch.tensor(facs["prior"]["prior"]) == 1.0
    has_links = linked.any(dim=1, keepdim=True).expand_as(linked)
    neutral = facs["prior"]["names"].index("neutral")
    assert not has_links[neutral].any()
    generator = torch.Generator().manual_seed(0)
    expression, au, target = (torch.randn(n, 16, generator=generator) for n in (7, 12, 7))
    gradients = {}
    for tau in (0.01, 1.0):
        dpm = DynamicPriorMapping(prior, tau=tau)
        (dpm(expression, au)[0] * target).sum().backward()
        gradients[tau] = dpm.au_to_expression.grad.abs()
    saturated = gradients[0.01]
    assert saturated[linked].min() > 1e-2 and saturated[neutral].min() > 1e-2
    assert saturated[has_links & ~linked].max() < 1e-6 * saturated[linked].min()
    assert gradients[1.0][has_links & ~linked].min() > 1e-5          # a softer tau_m lets them learn


def test_dpm_directions_learn_independently(facs):
    model = tiny_ssm(facs, context_tokens=2).train()
    optimiser = torch.optim.SGD(model.dpm.parameters(), lr=10.0)
    outputs = {task: model(**model.example_inputs(2, task=task)) for task in TASKS}
    model.loss(outputs, {"expression": {"labels": torch.tensor([0, 4])}, "au": {"au": torch.ones(2, 12)}})["loss"] \
        .backward()
    optimiser.step()
    assert not torch.allclose(model.dpm.expression_to_au, model.dpm.au_to_expression.T)


def test_table_vi_random_init_and_transposed_mode(facs):
    prior = torch.tensor(facs["prior"]["prior_normalised"])
    random = tiny_ssm(facs, dpm_init="random")
    start = random.dpm.au_to_expression.detach()
    assert not torch.allclose(start, prior) and (start >= 0).all()
    torch.testing.assert_close(start.sum(dim=1), torch.ones(7))
    torch.testing.assert_close(random.dpm.expression_to_au.detach(), start.T)
    torch.testing.assert_close(random.prior, prior)       # the prior is still kept, for the explanation

    transposed = tiny_ssm(facs, dpm_mode="transposed")
    assert transposed.dpm.expression_to_au is None and "dpm.expression_to_au" not in _trainable(transposed)
    with torch.no_grad():
        transposed.dpm.au_to_expression.add_(torch.randn(7, 12) * 0.05)
    _, reverse = transposed.dpm.maps()
    torch.testing.assert_close(reverse, (transposed.dpm.au_to_expression.T / 0.01).softmax(dim=1))
    with pytest.raises(ValueError, match="dpm_mode"):
        tiny_ssm(facs, dpm_mode="both")


def test_table_vii_frozen_dpm_keeps_its_matrices_and_learns_alpha_beta(facs):
    for init in ("prior", "random"):
        model = tiny_ssm(facs, dpm_mode="frozen", dpm_init=init)
        assert {name for name in _trainable(model) if name.startswith("dpm.")} == {"dpm.alpha", "dpm.beta"}
        state = model.state_dict()
        assert {"dpm.au_to_expression", "dpm.expression_to_au"} <= state.keys()
        start = state["dpm.au_to_expression"].clone()
        if init == "prior":
            torch.testing.assert_close(start, torch.tensor(facs["prior"]["prior_normalised"]))
        optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model(**model.example_inputs(2))["logits"].sum().backward()
        optimiser.step()
        torch.testing.assert_close(model.dpm.au_to_expression, start)
        torch.testing.assert_close(model.dpm.expression_to_au, start.T)


@pytest.mark.parametrize("mode", ["linear", "mlp"])
def test_table_vii_linear_and_mlp_map_along_the_label_axis(facs, mode):
    model = tiny_ssm(facs, dpm_mode=mode)
    assert isinstance(model.dpm, LabelAxisMapping)
    generator = torch.Generator().manual_seed(0)
    expression, au = torch.randn(7, 16, generator=generator), torch.randn(12, 16, generator=generator)
    with torch.no_grad():
        mapped_expression, mapped_au = model.dpm(expression, au)

        def apply(module, x):            # one feature column at a time: x (N_in, d) -> (N_out, d)
            columns = []
            for column in x.T:
                if mode == "linear":
                    columns.append(module.weight @ column + module.bias)
                else:
                    hidden = F.gelu(module[0].weight @ column + module[0].bias)
                    columns.append(module[2].weight @ hidden + module[2].bias)
            return torch.stack(columns, dim=1)

        torch.testing.assert_close(mapped_expression, expression + 0.1 * apply(model.dpm.au_to_expression, au))
        torch.testing.assert_close(mapped_au, au + 0.1 * apply(model.dpm.expression_to_au, expression))
    if mode == "mlp":
        assert model.dpm.au_to_expression[0].out_features == 7 + 12
    with pytest.raises(ValueError, match="no DPM matrices"):
        model.explain("unused")


# ---- losses (Eqs. 12-14) -----------------------------------------------------------------------------------------

def test_au_loss_is_eq_13_summed_over_the_aus_and_averaged_over_the_batch(facs):
    model = tiny_ssm(facs)
    generator = torch.Generator().manual_seed(0)
    au_logits = torch.randn(4, 12, generator=generator, requires_grad=True)
    targets = torch.randint(0, 2, (4, 12), generator=generator).float()
    unknown = torch.rand(4, 12, generator=generator) < 0.3
    unknown[3] = True                      # a sample with no known AU does not count in B
    targets[unknown] = NAN
    losses = model.loss(_outputs(au_logits=au_logits), {"au": {"au": targets}})
    o, y = au_logits.detach().double().numpy(), targets.double().numpy()
    total, samples = 0.0, 0
    for m in range(4):
        known = [n for n in range(12) if not math.isnan(y[m, n])]
        samples += bool(known)
        for n in known:
            s = 1 / (1 + math.exp(-o[m, n]))
            total -= y[m, n] * math.log(s) + (1 - y[m, n]) * math.log(1 - s)
    assert samples == 3
    assert losses["au"].item() == pytest.approx(total / samples, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 / 3 * total / samples, rel=1e-5)     # Eq. 14, lambda = 2
    losses["loss"].backward()
    assert (au_logits.grad[unknown] == 0).all() and (au_logits.grad[~unknown] != 0).all()


def test_per_au_weights_weight_each_aus_term(facs):
    au_weights = torch.arange(1.0, 13.0)
    model = tiny_ssm(facs, au_weights=au_weights)
    au_logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[1.0, 0.0] * 6, [NAN] * 6 + [1.0] * 6])
    per_label = F.binary_cross_entropy_with_logits(au_logits, targets.nan_to_num(0.0), reduction="none")
    expected = (per_label * ~torch.isnan(targets) * au_weights).sum() / 2
    torch.testing.assert_close(model.loss(_outputs(au_logits=au_logits), {"au": {"au": targets}})["au"], expected)


def test_expression_loss_is_eq_12_and_the_tasks_weigh_as_eq_14_across_separate_calls(facs):
    model = tiny_ssm(facs, lam=2.0)
    generator = torch.Generator().manual_seed(1)
    logits, au_logits = torch.randn(4, 7, generator=generator), torch.randn(4, 12, generator=generator)
    labels = torch.tensor([3, -1, 0, 6])                      # -1: a sample without an expression label
    targets = torch.randint(0, 2, (4, 12), generator=generator).float()
    both = model.loss(_outputs(logits, au_logits), {"expression": {"labels": labels}, "au": {"au": targets}})
    o = logits.double().numpy()
    dfe = -np.mean([o[m, y] - np.log(np.exp(o[m]).sum()) for m, y in enumerate(labels.tolist()) if y >= 0])
    au = F.binary_cross_entropy_with_logits(au_logits, targets, reduction="sum") / 4
    assert both["dfe"].item() == pytest.approx(dfe, rel=1e-5)
    torch.testing.assert_close(both["loss"], both["dfe"] / 3 + 2 * au / 3)
    # The trainer backpropagates each task's batch in its own call; the calls add up to the joint loss.
    expression_only = model.loss(_outputs(logits), {"expression": {"labels": labels}})
    au_only = model.loss(_outputs(au_logits=au_logits), {"au": {"au": targets}})
    assert set(expression_only) == {"loss", "dfe"} and set(au_only) == {"loss", "au"}
    torch.testing.assert_close(expression_only["loss"] + au_only["loss"], both["loss"])
    torch.testing.assert_close(tiny_ssm(facs, lam=0.5).loss(_outputs(logits), {"expression": {"labels": labels}})
                               ["loss"], both["dfe"] / 1.5)


def test_a_batch_without_labels_gives_a_zero_loss_on_the_graph(facs):
    model = tiny_ssm(facs)
    logits = torch.randn(2, 7, requires_grad=True)
    losses = model.loss(_outputs(logits), {"expression": {"labels": torch.tensor([-1, -1])}})
    assert losses.keys() == {"loss"} and losses["loss"].item() == 0.0
    losses["loss"].backward()
    assert (logits.grad == 0).all()


# ---- ablation switches ---------------------------------------------------------------------------------------------

def test_baseline_without_tsp_has_linear_heads_and_no_text_side(facs):
    baseline = tiny_ssm(facs, tsp=False, dpm=False)
    names = _trainable(baseline)
    assert baseline.text_encoder is None and baseline.dpm is None
    assert {"expression_head.weight", "au_head.weight"} <= names
    assert not any("context" in name or "text_encoder" in name for name in names)
    frames = frames_of(baseline)
    with torch.no_grad():
        features = baseline.au_temporal(baseline.encode_frames(frames, "au"))
        torch.testing.assert_close(baseline(frames, task="au")["au_logits"], baseline.au_head(features))   # Eq. 6
    with pytest.raises(ValueError, match="dpm=True needs tsp=True"):
        tiny_ssm(facs, tsp=False)


def test_tsp_without_dpm_classifies_against_the_plain_prototypes(facs):
    full, plain = tiny_ssm(facs, seed=0), tiny_ssm(facs, seed=0, dpm=False)
    assert _trainable(full) - _trainable(plain) == {"dpm.au_to_expression", "dpm.expression_to_au", "dpm.alpha",
                                                    "dpm.beta"}
    frames = frames_of(full)
    with torch.no_grad():
        assert not torch.allclose(full(frames, task="expression")["logits"], plain(frames, task="expression")["logits"])
        torch.testing.assert_close(plain.prototypes()["au"], F.normalize(plain.encode_prompts()["au"], dim=-1))


@pytest.mark.parametrize("task", TASKS)
def test_a_single_task_model_builds_only_its_task_and_every_part_learns(facs, task):
    rows = {"expression": {"expression": facs["expression"]}, "au": {"au": facs["au"]}}[task]
    for options in ({"tsp": False, "dpm": False, "moe_layers": 0}, {"dpm": False}):
        model = tiny_ssm(rows, tasks=task, **options).train()
        other = "au" if task == "expression" else "expression"
        assert model.tasks == (task,) and not any(name.startswith(other) or f".{other}." in name
                                                  for name in _trainable(model))
        outputs = model(**model.example_inputs(3))
        batch = {"expression": {"labels": torch.tensor([0, 1, 2])}, "au": {"au": torch.ones(3, 12)}}[task]
        losses = model.loss({task: outputs}, {task: batch})
        part = "dfe" if task == "expression" else "au"
        torch.testing.assert_close(losses["loss"], losses[part])               # one task: no Eq. 14 weight
        losses["loss"].backward()
        # Nothing is left without a gradient, so DDP needs no unused-parameter search for an STL run.
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="needs dpm=False"):
        tiny_ssm(facs, tasks=task)
    with pytest.raises(ValueError, match=r"tasks must be one or both"):
        tiny_ssm(facs, tasks=["au", "target"])


def test_both_tasks_without_an_au_dataset_say_how_to_train_one(facs):
    with pytest.raises(ValueError, match="model.tasks=au or =expression, with model.dpm=false"):
        tiny_ssm({"expression": facs["expression"]})


# ---- optimisation --------------------------------------------------------------------------------------------------

def test_param_groups_put_the_whole_visual_encoder_apart_and_decay_every_parameter(facs):
    model = tiny_ssm(facs, backbone_lr_scale=0.01)
    groups = model.param_groups(lr=1e-4, weight_decay=1e-4)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(_trainable(model))
    group_of = {id(p): group for group in groups for p in group["params"]}
    moe = model.vision.vision_model.encoder.layers[-1].mlp
    for encoder in (moe.fc1.weight, moe.routers["au"].weight, moe.experts["expression"][0].fc1.bias, moe.gamma,
                    model.vision.vision_model.embeddings.patch_embedding.weight, model.vision.visual_projection.weight):
        assert group_of[id(encoder)]["name"] == "visual_encoder" and group_of[id(encoder)]["lr"] == pytest.approx(1e-6)
    for new in (model.expression_context, model.dpm.au_to_expression, model.dpm.alpha, model.au_temporal.positions):
        assert group_of[id(new)]["name"] == "new" and group_of[id(new)]["lr"] == pytest.approx(1e-4)
    assert {group["weight_decay"] for group in groups} == {1e-4}
    per_group = model.param_groups(lr={"visual_encoder": 1e-6, "new": 1e-4}, weight_decay=1e-4)
    assert {g["name"]: g["lr"] for g in per_group} == {"visual_encoder": pytest.approx(1e-8), "new": 1e-4}


# ---- registered ablation rows ------------------------------------------------------------------------------------

def test_every_ablation_table_of_the_paper_is_registered_and_its_model_options_build(facs):
    ablations = model_ablations("ssm")
    tables = {a.table for a in ablations}
    assert tables == {"Table I", "Table II", "Table III", "Table V", "Table VI", "Table VII", "Table VIII",
                      "Table IX", "Table X", "Table XI", "Table S1", "Table S2", "Table S3"}
    counts = {table: sum(a.table == table for a in ablations) for table in tables}
    assert counts == {"Table I": 2, "Table II": 2, "Table III": 2, "Table V": 5, "Table VI": 4, "Table VII": 5,
                      "Table VIII": 3, "Table IX": 5, "Table X": 4, "Table XI": 18, "Table S1": 6, "Table S2": 6,
                      "Table S3": 5}
    assert len({(a.table, a.row) for a in ablations}) == len(ablations)
    accepted = set(model_builder("ssm").__code__.co_varnames) | {
        "dpm_init", "dpm_mode", "context_tokens", "alpha", "beta", "moe_layers"}
    for ablation in ablations:
        model_options = {key[len("model."):]: value for key, value in ablation.set.items() if key.startswith("model.")}
        assert set(model_options) <= accepted, ablation
        tasks = model_options.get("tasks", TASKS)
        model = tiny_ssm({part: facs[part] for part in (*tasks, "prior") if part in facs}, **model_options)
        assert model.tasks == tuple(tasks), ablation
    rows = {(a.table, a.row): a.set for a in ablations}
    assert rows["Table VII", "DPM(Random, Frozen)"] == {"model.dpm_mode": "frozen", "model.dpm_init": "random"}
    assert rows["Table S1", "40%"] == {"expression_fraction": 0.4} and rows["Table S2", "80%"] == {"au_fraction": 0.8}
    assert rows["Table XI", "AU fold 2 x expression fold 5"] == {"au_fold": 2, "fold": 5}
    assert rows["Table S1", "0%"] == rows["Table I", "STL (Ours)"]


# ---- explanation ---------------------------------------------------------------------------------------------------

def test_explain_draws_the_learnt_maps_beside_the_prior(facs, tmp_path):
    model = tiny_ssm(facs)
    png, record = model.explain(tmp_path / "explain")
    assert (png.name, record.name) == ("dpm-maps.png", "dpm-maps.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    drawn = json.loads(record.read_text())
    with torch.no_grad():
        learnt = [m.numpy() for m in model.dpm.maps()]
    np.testing.assert_allclose(drawn["au_to_expression"]["learnt"], learnt[0], rtol=1e-6)
    np.testing.assert_allclose(drawn["expression_to_au"]["learnt"], learnt[1], rtol=1e-6)
    assert len(drawn["expressions"]) == model.num_classes and len(drawn["aus"]) == model.num_aus
    with pytest.raises(ValueError, match="no DPM"):
        tiny_ssm(facs, dpm=False).explain(tmp_path)
