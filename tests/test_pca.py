"""PCA at tiny size: prompt transfer hooks, the feature banks built by `begin_epoch` (labelled samples, top-5 per
class, no duplicates, every process's share), a sample never attending to a centre holding itself, Eqs. 9-13
against plain reference computations, the ablation switches (plain CLIP without CPT), explain, loading a saved
CLIP, and fitting a small batch."""
from __future__ import annotations

import json
import threading
import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from affectprep.models.pca import SOURCE, TARGET, sample_keys  # importing registers "pca"
from affectprep.models.registry import create_model, model_ablations
from affectprep.models.text import tiny_tokenizer

CLASSES = ["happy", "sad", "angry"]


def tiny_pca(**options):
    torch.manual_seed(0)
    return create_model("pca", tiny=True, num_classes=len(CLASSES), class_names=CLASSES, **options)


def class_batch(per_class: int = 2, seed: int = 1, prefix: str = "s") -> dict:
    """A collated batch of 3 * per_class samples: frames (one fixed random pattern per class plus noise), labels,
    sample ids."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(len(CLASSES), 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2
    labels = torch.arange(len(CLASSES)).repeat(per_class)
    frames = patterns[labels] + 0.3 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    return {"frames": frames[:, None], "labels": labels,
            "sample_ids": [f"{prefix}{seed}-{i}" for i in range(len(labels))]}


class EpochData:
    """The trainer's begin_epoch contract for one process: `batches(task)` yields that task's labelled training
    batches, `gather(tensor)` concatenates over processes (here one, unless `group` joins several)."""

    def __init__(self, batches: dict[str, list[dict]], group: "ProcessGroup | None" = None, rank: int = 0):
        self._batches, self.group, self.rank = batches, group, rank

    def batches(self, task: str):
        yield from self._batches.get(task, [])

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.group is None else self.group.gather(self.rank, tensor)


class ProcessGroup:
    """all_gather for threads standing in for processes: each call waits for every rank's tensor of that call."""

    def __init__(self, size: int):
        self.size, self.slots = size, [None] * size
        self.barrier = threading.Barrier(size, timeout=30)

    def gather(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor
        self.barrier.wait()
        result = torch.cat(self.slots)
        self.barrier.wait()
        return result


def build_banks(model, source: list[dict], target: list[dict] = ()) -> None:
    model.begin_epoch(0, EpochData({"expression": list(source), "target": list(target)}))


def confidences(model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """x_v, p(label | x_v) and ids of every sample of the batches, with plain calls (the reference)."""
    with torch.no_grad():
        features = torch.cat([model.encode_images(b["frames"]) for b in batches])
        classes = model.encode_classes()
        probabilities = (model.clip.logit_scale.exp() * features @ classes.T).softmax(-1)
    labels = torch.cat([b["labels"] for b in batches])
    ids = [s for b in batches for s in b["sample_ids"]]
    return features, probabilities[torch.arange(len(labels)), labels], ids


def loss_of(model, outputs, labels):
    return model.loss({"expression": outputs}, {"expression": {"labels": labels}})


def capture_input(layer: torch.nn.Module) -> dict:
    """Records the hidden states a layer receives (after the model's own pre-hooks have run)."""
    seen = {}

    def record(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    layer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


# ----- CPT --------------------------------------------------------------------------------------------------------

def test_forward_backward_trains_only_prompts_and_iga():
    model = tiny_pca().train()
    build_banks(model, [class_batch(seed=2)], [class_batch(seed=3, prefix="t")])
    batch = class_batch(seed=4)
    outputs = model(**model.batch_inputs(batch))
    assert outputs["logits"].shape == (6, 3) and outputs["bank_attention"].shape == (6, 2, 3)
    assert outputs["image_features"].shape == outputs["aligned_features"].shape == (6, 16)
    torch.testing.assert_close(outputs["image_features"].norm(dim=-1), torch.ones(6))
    losses = loss_of(model, outputs, batch["labels"])
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("clip.") for name in trainable)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
    groups = model.param_groups(lr=0.003, weight_decay=5e-4)
    assert {g["name"] for g in groups} == {"prompts", "alignment"}
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
    model = tiny_pca().eval()
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
    # P = T(Q): a linear map of the text prompts (§II-B).
    transfer = model.prompt_transfer[1]
    torch.testing.assert_close(expected_visual, model.text_prompts[1] @ transfer.weight.T + transfer.bias)

    # The image features follow the text prompts through the transfer map P = T(Q).
    before = model.encode_images(frames).detach()
    with torch.no_grad():
        model.text_prompts.add_(0.5)
    assert not torch.allclose(model.encode_images(frames), before)


def test_cpt_off_is_plain_clip_with_a_hand_made_template():
    model = tiny_pca(cpt=False, class_template="a photo of a {} face.")
    assert model.text_prompts is None and model.prompt_transfer is None
    assert not any("prompt" in name for name in model.state_dict())
    tokenizer = tiny_tokenizer()
    plain = tokenizer([f"a photo of a {c} face." for c in CLASSES], padding=True, return_tensors="pt")
    assert torch.equal(model.class_input_ids, plain["input_ids"])
    vision_layer = capture_input(model.clip.vision_model.encoder.layers[1])
    frames = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        features, classes = model.encode_images(frames), model.encode_classes()
        # CLIP's own forward: its normalised image and text embeddings, with no hook of ours in the way.
        expected = model.clip(pixel_values=frames[:, 0], **plain)
    assert vision_layer["hidden"].shape[1] == 1 + (32 // 8) ** 2
    torch.testing.assert_close(features, expected.image_embeds)
    torch.testing.assert_close(classes, expected.text_embeds)
    # Only IGA learns without CPT.
    assert {g["name"] for g in model.param_groups(0.1)} == {"alignment"}


def test_zero_shot_row_learns_only_the_temperature_which_changes_no_prediction():
    model = tiny_pca(cpt=False, iga=False).train()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["clip.logit_scale"]
    assert [g["name"] for g in model.param_groups(0.1)] == ["temperature"]
    frames, labels = class_batch()["frames"], class_batch()["labels"]
    before = model.eval()(frames)["logits"].argmax(-1)
    optimizer = torch.optim.SGD(model.param_groups(lr=1.0), lr=1.0)
    for _ in range(3):
        losses = loss_of(model, model.train()(frames), labels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert model.clip.logit_scale.item() != pytest.approx(np.log(100.0))
    with torch.no_grad():
        assert torch.equal(model.eval()(frames)["logits"].argmax(-1), before)


def test_iga_off_drops_the_module_the_banks_and_the_term():
    model = tiny_pca(iga=False).train()
    assert not hasattr(model, "align_mlp") and not hasattr(model, "bank_features")
    assert not any("bank" in name or "align" in name for name in model.state_dict())
    batch = class_batch()
    outputs = model(**model.batch_inputs(batch))
    assert "iga_logits" not in outputs
    torch.testing.assert_close(outputs["logits"], outputs["cls_logits"])
    losses = loss_of(model, outputs, batch["labels"])
    assert set(losses) == {"loss", "cls"}
    torch.testing.assert_close(losses["loss"].detach(), 0.5 * losses["cls"])
    model.begin_epoch(0, EpochData({"expression": [batch]}))   # nothing to build, and no error
    with pytest.raises(ValueError, match="no IGA"):
        model.explain(batch, outputs, None, CLASSES)


# ----- IGA: the banks ---------------------------------------------------------------------------------------------

def test_banks_hold_the_five_most_confident_labelled_samples_per_class_and_domain():
    model = tiny_pca()
    source = [class_batch(per_class=4, seed=s) for s in (10, 11)]           # 8 per class: 5 kept
    target = [class_batch(per_class=1, seed=12, prefix="t")]                # 1 per class
    unlabelled = class_batch(per_class=2, seed=13)
    unlabelled["labels"] = torch.full_like(unlabelled["labels"], -1)
    build_banks(model, source + [unlabelled], target)
    for domain, batches, per_class in ((SOURCE, source, 5), (TARGET, target, 1)):
        features, scores, ids = confidences(model, batches)
        labels = torch.cat([b["labels"] for b in batches])
        keys = sample_keys(ids)
        for c in range(len(CLASSES)):
            mine = [i for i in range(len(ids)) if labels[i] == c]
            best = sorted(mine, key=lambda i: -scores[i].item())[:per_class]
            filled = torch.isfinite(model.bank_scores[domain, c])
            assert filled.sum() == per_class
            assert sorted(model.bank_keys[domain, c][filled].tolist()) == sorted(keys[best].tolist())
            torch.testing.assert_close(model.bank_scores[domain, c][filled], scores[best], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.bank_features[domain, c][filled], features[best])
    # The unlabelled samples entered no bank.
    assert not set(sample_keys(unlabelled["sample_ids"]).tolist()) & set(model.bank_keys.flatten().tolist())
    centres, valid = model.bank_centres()
    features, _, ids = confidences(model, source)
    by_key = dict(zip(sample_keys(ids).tolist(), features))
    expected = torch.stack([by_key[k] for k in model.bank_keys[SOURCE, 0].tolist()]).mean(0)
    torch.testing.assert_close(centres[0, SOURCE, 0], expected)
    assert valid.all()

    # Saved with the model; the next epoch replaces them.
    restored = tiny_pca()
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.bank_features, model.bank_features)
    assert torch.equal(restored.bank_keys, model.bank_keys)
    build_banks(model, source[:1])
    assert (torch.isfinite(model.bank_scores[SOURCE]).sum(-1) == 4).all()
    assert torch.isinf(model.bank_scores[TARGET]).all()


def test_a_sample_offered_twice_takes_one_slot():
    model = tiny_pca(bank_size=3)
    batch = class_batch(per_class=2, seed=20)
    build_banks(model, [batch, batch])   # e.g. the same sample reaching the pass twice
    for c in range(len(CLASSES)):
        keys = model.bank_keys[SOURCE, c][torch.isfinite(model.bank_scores[SOURCE, c])].tolist()
        assert len(keys) == len(set(keys)) == 2


def test_every_process_share_counts_and_all_processes_build_the_same_banks():
    source = [class_batch(per_class=3, seed=s) for s in (30, 31, 32)]
    target = [class_batch(per_class=1, seed=33, prefix="t"), class_batch(per_class=1, seed=34, prefix="t")]
    alone = tiny_pca()
    build_banks(alone, source, target)
    # Rank 0 has two source batches and no target one; rank 1 one source and both target batches.
    shares = [{"expression": source[:2], "target": []}, {"expression": source[2:], "target": target}]
    group, models = ProcessGroup(2), [tiny_pca(), tiny_pca()]
    threads = [threading.Thread(target=m.begin_epoch, args=(0, EpochData(share, group, rank)))
               for rank, (m, share) in enumerate(zip(models, shares))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for model in models:
        for name in ("bank_keys", "bank_scores", "bank_features"):
            torch.testing.assert_close(getattr(model, name), getattr(alone, name), msg=name)
    # The best of the samples only rank 1 saw are in rank 0's banks.
    rank1_keys = set(sample_keys([s for b in source[2:] + target for s in b["sample_ids"]]).tolist())
    assert rank1_keys & set(models[0].bank_keys[SOURCE].flatten().tolist())
    assert torch.isfinite(models[0].bank_scores[TARGET]).sum() == 2 * len(CLASSES)


# ----- IGA: Eqs. 9-12 ---------------------------------------------------------------------------------------------

def reference_alignment(model, features: torch.Tensor, keys: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. 9-10 and x' with loops: per sample, per domain, per class the centre of the bank entries (without the
    sample itself when keys are given), q/k/v from f_pr, the softmax over the classes with a centre, f_po."""
    mlp, project, d = model.align_mlp, model.align_projector, model.iga_dim
    aligned = np.zeros(features.shape)
    attention = np.zeros((features.shape[0], 2, len(CLASSES)))
    with torch.no_grad():
        for b in range(features.shape[0]):
            q = mlp(features[b])[:d].numpy()
            total = np.zeros(features.shape[1])
            for domain in (SOURCE, TARGET):
                centres, classes = [], []
                for c in range(len(CLASSES)):
                    entries = [model.bank_features[domain, c, n].numpy() for n in range(model.bank_scores.shape[-1])
                               if np.isfinite(model.bank_scores[domain, c, n].item())
                               and (keys is None or model.bank_keys[domain, c, n] != keys[b])]
                    if entries:
                        centres.append(np.mean(entries, axis=0))
                        classes.append(c)
                x = features[b].numpy().astype(np.float64)
                if centres:
                    out = mlp(torch.tensor(np.array(centres), dtype=torch.float32)).numpy()
                    k, v = out[:, d:2 * d], out[:, 2 * d:]
                    logits = k @ q / model.epsilon
                    weights = np.exp(logits - logits.max())
                    weights /= weights.sum()
                    attention[b, domain, classes] = weights
                    x = x + project(torch.tensor(weights @ v, dtype=torch.float32)).numpy()
                total += x / np.linalg.norm(x)
            aligned[b] = total
    return aligned, attention


def test_alignment_matches_eqs_9_and_10_and_leaves_each_sample_out_of_its_own_centres():
    model = tiny_pca()
    source = [class_batch(per_class=2, seed=40)]
    target = [class_batch(per_class=1, seed=41, prefix="t")]
    build_banks(model, source, target)
    # Three bank members (one is the only target entry of its class) and two samples from outside the banks.
    members = {"frames": torch.cat([source[0]["frames"][:2], target[0]["frames"][:1]]),
               "sample_ids": source[0]["sample_ids"][:2] + target[0]["sample_ids"][:1]}
    outsiders = class_batch(per_class=1, seed=42)
    frames = torch.cat([members["frames"], outsiders["frames"][:2]])
    ids = members["sample_ids"] + outsiders["sample_ids"][:2]
    keys = sample_keys(ids)
    with torch.no_grad():
        training = model.train()(frames, sample_keys=keys)
        evaluation = model.eval()(frames, sample_keys=keys)
        features = model.encode_images(frames)
    for outputs, excluded in ((training, keys), (evaluation, None)):
        aligned, attention = reference_alignment(model, features, excluded)
        torch.testing.assert_close(outputs["aligned_features"], torch.tensor(aligned, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outputs["bank_attention"], torch.tensor(attention, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-6)
    # The only target entry of class 0 is the third sample: in training it attends to no target centre of class 0.
    assert training["bank_attention"][2, TARGET, 0] == 0 and evaluation["bank_attention"][2, TARGET, 0] > 0
    # Samples outside the banks see the same centres in training and in evaluation.
    torch.testing.assert_close(training["aligned_features"][3:], evaluation["aligned_features"][3:])
    assert not torch.allclose(training["aligned_features"][:3], evaluation["aligned_features"][:3])
    # Iga logits are Eq. 11's: the temperature times the cosine of x' and o_c.
    torch.testing.assert_close(evaluation["iga_logits"],
                               100.0 * F.normalize(evaluation["aligned_features"], dim=-1) @ model.encode_classes().T)


def test_empty_banks_leave_the_plain_feature_and_say_so_in_training():
    model = tiny_pca()
    frames = class_batch()["frames"]
    with torch.no_grad():
        outputs = model.eval()(frames)
    torch.testing.assert_close(outputs["aligned_features"], 2 * outputs["image_features"])
    assert (outputs["bank_attention"] == 0).all()
    with pytest.warns(RuntimeWarning, match="begin_epoch"):
        model.train()(frames)
    # Only the source bank: its half of x' moves, the target's is the plain feature.
    build_banks(model, [class_batch(seed=50)])
    with torch.no_grad():
        aligned = model.eval()(frames)["aligned_features"]
    features = model.encode_images(frames).detach()
    assert (aligned - features).norm(dim=-1).allclose(torch.ones(len(frames)), atol=1e-5)
    assert not torch.allclose(aligned, 2 * features)


def test_the_loss_is_eq_13_over_labelled_samples():
    model = tiny_pca().train()
    build_banks(model, [class_batch(seed=60)], [class_batch(seed=61, prefix="t")])
    batch = class_batch(seed=62)
    outputs = model(**model.batch_inputs(batch))
    labels = batch["labels"].clone()
    labels[:2] = -1
    weights = torch.tensor([0.5, 1.0, 2.0])
    parts = model.loss({"expression": outputs, "target": outputs},
                       {"expression": {"labels": labels}, "target": {"labels": labels}}, class_weights=weights)
    cls = (F.cross_entropy(outputs["cls_logits"][2:], labels[2:], weight=weights)
           + F.cross_entropy(outputs["cls_logits"][2:], labels[2:]))            # the target takes no weights
    iga = (F.cross_entropy(outputs["iga_logits"][2:], labels[2:], weight=weights)
           + F.cross_entropy(outputs["iga_logits"][2:], labels[2:]))
    torch.testing.assert_close(parts["cls"], cls.detach())
    torch.testing.assert_close(parts["iga"], iga.detach())
    torch.testing.assert_close(parts["loss"].detach(), 0.5 * cls.detach() + 0.5 * iga.detach())
    none = loss_of(model, outputs, torch.full_like(labels, -1))
    assert none["loss"].item() == 0 and none["loss"].requires_grad
    # Training forwards never touch the banks: only begin_epoch does.
    before = model.bank_keys.clone()
    model(**model.batch_inputs(class_batch(seed=63)))
    assert torch.equal(model.bank_keys, before)


# ----- explain, registry, loading, fitting ------------------------------------------------------------------------

def test_explain_draws_the_attention_over_the_bank_centres(tmp_path):
    model = tiny_pca()
    build_banks(model, [class_batch(seed=70)], [class_batch(per_class=1, seed=71, prefix="t")])
    batch = class_batch(seed=72)
    batch["sample_ids"][0] = "clips/img_0001"
    with torch.no_grad():
        outputs = model.eval()(**model.batch_inputs(batch))
    png, record = model.explain(batch, outputs, tmp_path, CLASSES)
    assert png.name == "clips_img_0001-bank-attention.png" and record.suffix == ".json"
    image = cv2.imread(str(png))
    assert image is not None and min(image.shape[:2]) > 200
    data = json.loads(record.read_text())
    assert data["classes"] == CLASSES and data["label"] == "happy"
    np.testing.assert_allclose(data["attention"], outputs["bank_attention"][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.sum(data["attention"], axis=1), [1.0, 1.0], rtol=1e-5)
    assert data["bank_sizes"] == [[2, 2, 2], [1, 1, 1]]
    assert data["predicted"]["aligned"] == CLASSES[int(outputs["iga_logits"][0].argmax())]


def test_every_registered_ablation_row_builds_and_trains_a_step():
    rows = model_ablations("pca")
    assert [(a.table, a.row) for a in rows] == [
        ("Table II", "CPT × / IGA ×"), ("Table II", "CPT ✓ / IGA ×"), ("Table II", "CPT × / IGA ✓"),
        ("Table II", "CPT ✓ / IGA ✓"), *[("Table III", f"k={k}") for k in range(1, 6)]]
    batch = class_batch()
    for ablation in rows:
        options = {key.removeprefix("model."): value for key, value in ablation.set.items()}
        assert all(key.startswith("model.") for key in ablation.set)
        model = tiny_pca(**options).train()
        assert model.cpt == options.get("cpt", True) and model.iga == options.get("iga", True)
        if model.cpt:
            assert model.text_prompts.shape[1] == options.get("prompts", 2)
        build_banks(model, [class_batch(seed=80)])
        losses = loss_of(model, model(**model.batch_inputs(batch)), batch["labels"])
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"]), ablation.row


def test_clip_and_tokenizer_load_from_a_saved_checkpoint(tmp_path):
    source = tiny_pca()
    source.clip.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = create_model("pca", tiny=True, num_classes=3, class_names=CLASSES, clip=str(tmp_path))
    for (name, expected), actual in zip(source.clip.state_dict().items(), loaded.clip.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    torch.testing.assert_close(loaded.class_input_ids, source.class_input_ids)
    assert not any(p.requires_grad for p in loaded.clip.parameters())
    build_banks(source, [class_batch(seed=90)])
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
    build_banks(model, [class_batch(seed=100)], [class_batch(per_class=1, seed=101, prefix="t")])
    batch = class_batch()
    inputs = model.batch_inputs(batch)
    # Only prompts and IGA learn, over a frozen random CLIP: a small lr and many cheap steps.
    optimizer = torch.optim.Adam(model.param_groups(lr=3e-3, weight_decay=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the banks are built: no warning
        for _ in range(150):
            losses = loss_of(model, model(**inputs), batch["labels"])
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
    assert losses["loss"].item() < 0.2
    with torch.no_grad():
        outputs = model.eval()(batch["frames"])
    assert outputs["logits"].argmax(-1).tolist() == batch["labels"].tolist()
    assert outputs["cls_logits"].argmax(-1).tolist() == batch["labels"].tolist()
