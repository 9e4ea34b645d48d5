"""GReFEL at tiny size: each equation against a plain reference (window cross-attention and its position table,
the fusion blocks, confidence, the corrections, the losses), the embedding's scale, the ablation switches, the
released IR-50 / MobileFaceNet checkpoints by their public names, the landmark detector learning geometry, a batch
of one, the explanation figures, and fitting a small batch."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from transformers import ResNetBackbone, ResNetConfig

from affectprep.config import ConfigError
from affectprep.models.grefel import (ABLATIONS, RESNET_STAGES, TINY_IR, TINY_MOBILEFACENET, TINY_RESNET,
                                      CrossFusionBlock, FusionBlock, WindowCrossAttention, anchor_loss,
                                      attention_received, center_loss, confidence, confidence_weighted,
                                      geometric_correction, relative_position_index, window_partition,
                                      window_reverse)
from affectprep.models.layers.batchnorm import BatchNorm1d
from affectprep.models.layers.ir50 import IRBackbone, load_ir50_checkpoint
from affectprep.models.layers.mobilefacenet import MobileFaceNet, load_mobilefacenet_checkpoint
from affectprep.models.registry import create_model, model_ablations

TINY_SIZE = 64


def tiny_grefel(**options):
    torch.manual_seed(0)
    return create_model("grefel", tiny=True, num_classes=3, **options)


def random_landmarks(batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch_size, 1, 68, 2, generator=torch.Generator().manual_seed(seed))


def loss_of(model, outputs, labels, landmarks=None):
    batch = {"labels": labels}
    if model.trains_landmark_detector:
        batch["landmarks"] = random_landmarks(len(labels)) if landmarks is None else landmarks
    return model.loss({"expression": outputs}, {"expression": batch})


def test_forward_backward_gives_distributions_and_finite_gradients():
    model = tiny_grefel().train()
    inputs = model.example_inputs(batch_size=4, generator=torch.Generator().manual_seed(0))
    assert inputs["frames"].shape == (4, 1, 3, 64, 64)
    outputs = model(**inputs)
    assert outputs["logits"].shape == (4, 3) and outputs["embedding"].shape == (4, 32)
    assert outputs["landmarks"].shape == (4, 68, 2)
    for name in ("probabilities", "primary", "geometric", "attentive", "correction"):
        torch.testing.assert_close(outputs[name].sum(-1), torch.ones(4), msg=name)
        assert (outputs[name] >= 0).all(), name
    torch.testing.assert_close(outputs["logits"].softmax(-1), outputs["probabilities"])
    assert ((outputs["confidence"] >= 0) & (outputs["confidence"] <= 1)).all()
    losses = loss_of(model, outputs, torch.tensor([0, 1, 2, -1]))
    assert set(losses) == {"loss", "cls", "anchor", "center", "landmarks"}
    torch.testing.assert_close(losses["loss"].detach(), losses["cls"] + 0.1 * losses["anchor"]
                               + 0.1 * losses["center"] + losses["landmarks"])
    losses["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.batch_inputs({**inputs, "landmarks": random_landmarks(4), "labels": torch.zeros(4)}).keys() == {
        "frames"}
    assert model.inputs.landmarks and model.inputs.real_landmarks and model.inputs.frames == 1
    assert model.tasks == ("expression",)
    with pytest.raises(ValueError, match="landmarks"):
        model.loss({"expression": model(**inputs)}, {"expression": {"labels": torch.zeros(4, dtype=torch.long)}})


# ---- Eqs. 1-8: window cross-attention, the scale blocks, the fusion ----------------------------------------------

def test_windows_partition_and_reverse_are_inverse_and_row_major():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    windows = window_partition(x, 2)
    assert windows.shape == (2, 6, 4, 3)
    # Window 1 is rows 0-1, columns 2-3; its tokens in row-major order.
    torch.testing.assert_close(windows[0, 1], x[0, 0:2, 2:4].reshape(4, 3))
    torch.testing.assert_close(window_reverse(windows, 2, 4, 6), x)


def test_relative_position_index_counts_every_offset_once():
    window = 3
    index = relative_position_index(window)
    for (i, (ri, ci)), (j, (rj, cj)) in itertools.product(
            enumerate(itertools.product(range(window), repeat=2)), repeat=2):
        assert index[i, j] == (ri - rj + window - 1) * (2 * window - 1) + (ci - cj + window - 1)
    assert sorted(set(index.flatten().tolist())) == list(range((2 * window - 1) ** 2))


def reference_cross_attention(module: WindowCrossAttention, landmarks: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Eqs. 1-3 with loops: per window, head and landmark token, a softmax over the window's image tokens of
    q.k / sqrt(d) + b[offset, head], then the heads merged by w_o."""
    weight = {name: getattr(module, name).weight.detach().double().numpy() for name in ("query", "key_value", "out")}
    bias = {name: getattr(module, name).bias.detach().double().numpy() for name in ("query", "key_value", "out")}
    table = module.relative_position_bias_table.detach().double().numpy()
    height, width, dim = image.shape
    w, heads = module.window, module.heads
    d = dim // heads
    out = np.zeros_like(image)
    for top, left in itertools.product(range(0, height, w), range(0, width, w)):
        cells = [(top + r, left + c) for r, c in itertools.product(range(w), repeat=2)]
        for (ri, ci) in cells:
            q = weight["query"] @ landmarks[ri, ci] + bias["query"]
            merged = np.zeros(dim)
            for h in range(heads):
                scores, values = [], []
                for (rj, cj) in cells:
                    kv = weight["key_value"] @ image[rj, cj] + bias["key_value"]
                    k, v = kv[:dim][h * d:(h + 1) * d], kv[dim:][h * d:(h + 1) * d]
                    offset = (ri - rj + w - 1) * (2 * w - 1) + (ci - cj + w - 1)
                    scores.append(q[h * d:(h + 1) * d] @ k / math.sqrt(d) + table[offset, h])
                    values.append(v)
                p = np.exp(np.array(scores) - max(scores))
                merged[h * d:(h + 1) * d] = (p / p.sum()) @ np.array(values)
            out[ri, ci] = weight["out"] @ merged + bias["out"]
    return out


def test_window_cross_attention_is_eqs_1_to_3_with_the_position_table():
    torch.manual_seed(0)
    attention = WindowCrossAttention(dim=6, heads=2, window=2)
    with torch.no_grad():
        attention.relative_position_bias_table.normal_()      # a bias large enough to matter
    landmarks, image = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    output, weights = attention(landmarks, image)
    assert output.shape == (1, 4, 4, 6) and weights.shape == (1, 4, 2, 4, 4)
    expected = reference_cross_attention(attention, landmarks[0].double().numpy(), image[0].double().numpy())
    np.testing.assert_allclose(output[0].detach().double().numpy(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 2, 4))
    # An image token outside a landmark token's window cannot change that token's output.
    changed = image.clone()
    changed[0, 3, 3] += 10
    torch.testing.assert_close(attention(landmarks, changed)[0][0, :2, :2], output[0, :2, :2])
    assert not torch.allclose(attention(landmarks, changed)[0][0, 2:, 2:], output[0, 2:, 2:])


def test_scale_block_puts_the_residual_on_the_image_stream():
    torch.manual_seed(0)
    block = CrossFusionBlock(dim=8, heads=2, window=2)
    landmarks, image = torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4, 8)
    output, _ = block(landmarks, image)
    combined = block.attention(landmarks, image)[0] + image                       # Eq. 4
    torch.testing.assert_close(output, block.mlp(block.norm(combined)) + combined)  # Eq. 5


def test_fusion_block_is_eqs_7_and_8_as_printed():
    torch.manual_seed(0)
    block = FusionBlock(dim=8, heads=2)
    tokens = torch.randn(2, 5, 8)
    attended = block.attention(tokens, tokens, tokens)[0] + tokens                 # Eq. 7
    torch.testing.assert_close(block(tokens), block.mlp(block.norm(tokens)) + attended)   # Eq. 8


def test_attention_received_sums_the_queries_weight_per_image_token():
    weights = torch.rand(1, 4, 2, 4, 4).softmax(-1)                               # 4x4 map, 2x2 windows
    grid = attention_received(weights, 2, 4, 4)
    assert grid.shape == (1, 4, 4)
    torch.testing.assert_close(grid.sum(), torch.tensor(1.0))
    # Token (0, 1) is the second token of the first window.
    expected = weights[0, 0, :, :, 1].sum(-1).mean() / weights.mean(2).sum((1, 2, 3))[0]
    torch.testing.assert_close(grid[0, 0, 1], expected)


def test_the_landmark_stream_is_shaped_by_its_landmarks_only():
    model = tiny_grefel().train()
    inputs = model.example_inputs(batch_size=3)
    detector = [p for p in model.landmark_detector.parameters()]
    outputs = model(**inputs)
    expression = torch.autograd.grad(outputs["logits"].sum() + outputs["embedding"].sum(), detector,
                                     allow_unused=True)
    assert all(g is None or not g.any() for g in expression)
    others = [p for name, p in model.named_parameters() if not name.startswith("landmark_detector.")]
    landmark = torch.autograd.grad(model(**inputs)["landmarks"].sum(), detector + others, allow_unused=True)
    assert any(g is not None and g.any() for g in landmark[:len(detector)])
    assert all(g is None for g in landmark[len(detector):])


def test_the_landmark_detector_learns_the_faces_geometry():
    """Trained on landmarks that follow each image (a bright square, the 68 points spread over it), the detector's
    points track each face's geometry better than the mean shape: the landmark queries carry real geometry."""
    generator = torch.Generator().manual_seed(0)
    pattern = torch.rand(68, 2, generator=generator)

    def squares(count):
        side = torch.randint(16, 32, (count,), generator=generator)
        top = (torch.rand(count, generator=generator) * (TINY_SIZE - side)).long()
        left = (torch.rand(count, generator=generator) * (TINY_SIZE - side)).long()
        frames = torch.full((count, 1, 3, TINY_SIZE, TINY_SIZE), -1.0)
        for i in range(count):
            frames[i, 0, :, top[i]:top[i] + side[i], left[i]:left[i] + side[i]] = 1.0
        corner = torch.stack([left, top], -1).float()[:, None]
        return frames, ((corner + pattern * side[:, None, None]) / TINY_SIZE)[:, None]

    model = tiny_grefel().train()
    optimizer = torch.optim.Adam(model.landmark_detector.parameters(), lr=1e-2)
    for _ in range(80):
        frames, points = squares(16)
        loss = loss_of(model, model(frames=frames), torch.full((16,), -1), points)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frames, points = squares(64)
    with torch.no_grad():
        predicted = model.eval()(frames=frames)["landmarks"]
    error = (predicted - points[:, 0]).norm(dim=-1).mean()
    mean_shape = (points[:, 0].mean(0) - points[:, 0]).norm(dim=-1).mean()
    assert error < 0.5 * mean_shape, (error, mean_shape)


# ---- the embedding and the reliability balancing (Eqs. 9-19) -----------------------------------------------------

def test_embedding_and_anchors_share_one_scale():
    model = tiny_grefel().eval()
    with torch.no_grad():
        embedding = model(**model.example_inputs(batch_size=5))["embedding"]
        anchors = model.anchors
    width = embedding.shape[-1]
    for points in (embedding, anchors.flatten(0, 1)):
        torch.testing.assert_close(points.mean(-1), torch.zeros(points.shape[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(points.norm(dim=-1), torch.full((points.shape[0],), math.sqrt(width)),
                                   atol=0, rtol=1e-3)


def test_primary_head_is_the_papers_mlp_and_takes_a_batch_of_one():
    model = tiny_grefel().train()
    kinds = [type(layer).__name__ for layer in model.head]
    assert kinds == ["Linear", "ReLU", "Dropout", "BatchNorm1d"] * 2 + ["Linear"]
    assert model.head[0].out_features == model.head[4].out_features == 16 and model.head[2].p == 0.5
    norm = model.head[3]
    before = norm.running_mean.clone()
    outputs = model(**model.example_inputs(batch_size=1))
    loss_of(model, outputs, torch.tensor([1]))["loss"].backward()
    assert torch.equal(norm.running_mean, before)        # one sample does not move the statistics
    model(**model.example_inputs(batch_size=2))
    assert not torch.equal(norm.running_mean, before)


def test_batchnorm_uses_running_statistics_for_one_value_per_channel():
    norm = BatchNorm1d(3).train()
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        norm.running_var.copy_(torch.tensor([4.0, 1.0, 9.0]))
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0]))
    x = torch.tensor([[3.0, 2.0, 0.0]])
    expected = [(3 - 1) / math.sqrt(4 + norm.eps), 2 * (2 - 2) / math.sqrt(1 + norm.eps), (0 - 3) / math.sqrt(9 + norm.eps)]
    torch.testing.assert_close(norm(x), torch.tensor([expected]))
    batch = torch.randn(4, 3)
    torch.testing.assert_close(norm(batch), torch.nn.functional.batch_norm(
        batch, None, None, norm.weight, norm.bias, True, 0.0, norm.eps))


def test_confidence_is_one_minus_normalised_entropy():
    one_hot = torch.eye(5)
    torch.testing.assert_close(confidence(one_hot), torch.ones(5))
    torch.testing.assert_close(confidence(torch.full((2, 5), 0.2)), torch.zeros(2), atol=1e-6, rtol=0)
    distributions = torch.randn(100, 5).softmax(-1).double()
    entropy = [-sum(p * math.log(p) for p in row) for row in distributions.tolist()]
    torch.testing.assert_close(confidence(distributions), 1 - torch.tensor(entropy).double() / math.log(5))


def test_confidence_weighting_trusts_the_confident_distribution():
    certain, unsure = torch.tensor([[0.0, 1.0, 0.0]]), torch.full((1, 3), 1 / 3)
    torch.testing.assert_close(confidence_weighted(certain, unsure), certain, atol=1e-5, rtol=0)
    torch.testing.assert_close(confidence_weighted(unsure, unsure), unsure)
    first, second = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.1, 0.8]])
    weights = confidence(first), confidence(second)
    expected = (weights[0] * first + weights[1] * second) / (weights[0] + weights[1])
    torch.testing.assert_close(confidence_weighted(first, second), expected, atol=1e-5, rtol=0)


def test_geometric_correction_is_a_distance_softmax_over_anchors():
    anchors = torch.randn(3, 2, 4, dtype=torch.float64)
    embedding = anchors[2, 1][None] + 0.01
    correction = geometric_correction(embedding, anchors)
    assert correction.argmax().item() == 2
    exps = {(i, j): math.exp(-math.sqrt(sum((a - e) ** 2 for a, e in zip(anchors[i, j].tolist(),
                                                                          embedding[0].tolist()))))
            for i in range(3) for j in range(2)}
    total = sum(exps.values())
    torch.testing.assert_close(correction[0], torch.tensor([sum(exps[i, j] for j in range(2)) / total
                                                            for i in range(3)], dtype=torch.float64))
    # delta sets the steepness: a large delta flattens the correction towards uniform.
    assert confidence(geometric_correction(embedding, anchors, delta=100.0)) < confidence(correction)


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
        assert "correction" not in outputs
    else:
        correction = corrections[0] if len(corrections) == 1 else confidence_weighted(*corrections)
        torch.testing.assert_close(outputs["correction"], correction)
        torch.testing.assert_close(outputs["probabilities"], confidence_weighted(outputs["primary"], correction))


# ---- the losses (Eqs. 20-23) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("losses", [("cls",), ("anchor",), ("center",), ("cls", "anchor"), ("cls", "anchor", "center")])
def test_loss_ablations_sum_only_the_chosen_terms(losses):
    model = tiny_grefel(losses=losses).train()
    parts = loss_of(model, model(**model.example_inputs(batch_size=3)), torch.tensor([0, 2, 1]))
    assert set(parts) == {"loss", "landmarks", *losses}
    weights = {"cls": 1.0, "anchor": 0.1, "center": 0.1}
    torch.testing.assert_close(parts["loss"].detach(), sum(weights[name] * parts[name] for name in losses)
                               + parts["landmarks"])
    # Every parameter stays on the graph (distributed training reduces the same ones each step).
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_switches_reject_what_cannot_work():
    with pytest.raises(ValueError, match="need anchors"):
        tiny_grefel(balancing="attention")
    with pytest.raises(ValueError, match="balancing"):
        tiny_grefel(balancing="anchor")
    with pytest.raises(ValueError, match="losses"):
        tiny_grefel(losses=("cls", "triplet"))
    with pytest.raises(ValueError, match="image_backbone"):
        tiny_grefel(image_backbone="vgg")
    with pytest.raises(ValueError, match="windows"):
        tiny_grefel(windows=(3, 2, 2))
    with pytest.raises(ValueError, match="still frames"):
        tiny_grefel()(torch.randn(2, 3, 64, 64))


def test_anchor_and_center_losses_match_their_definitions():
    anchors = torch.randn(3, 2, 4)
    flat = anchors.flatten(0, 1)
    pairs = [(flat[i] - flat[j]).pow(2).sum() for i, j in itertools.permutations(range(6), 2)]
    torch.testing.assert_close(anchor_loss(anchors), -torch.stack(pairs).mean() / 4)
    embeddings, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 2, 0])
    nearest = [min((embeddings[i] - anchors[labels[i], k]).pow(2).sum() for k in range(2)) for i in range(5)]
    torch.testing.assert_close(center_loss(embeddings, labels, anchors), torch.stack(nearest).mean() / 4)
    # Anchors live on the embedding's sphere, so the anchor loss is bounded below.
    model = tiny_grefel()
    with torch.no_grad():
        model.anchor_parameters.mul_(1000)
    assert anchor_loss(model.anchors) > -4


def test_class_loss_is_the_unweighted_nll_of_the_final_distribution_over_labelled_samples():
    model = tiny_grefel().train()
    outputs = model(**model.example_inputs(batch_size=3))
    labels = torch.tensor([-1, 2, 1])
    parts = model.loss({"expression": outputs}, {"expression": {"labels": labels, "landmarks": random_landmarks(3)}},
                       class_weights=torch.tensor([1.0, 5.0, 0.1]))
    expected = -(outputs["probabilities"][1, 2].log() + outputs["probabilities"][2, 1].log()) / 2
    torch.testing.assert_close(parts["cls"], expected.detach())
    empty = loss_of(model, outputs, torch.full((3,), -1))
    assert empty["cls"].item() == 0 and empty["center"].item() == 0


def test_every_table_row_is_registered_and_builds():
    rows = {(a.table, a.row) for a in model_ablations("grefel")}
    assert len(rows) == len(ABLATIONS) == 9
    assert {table for table, _ in rows} == {"Table 2", "Table 3"}
    for ablation in ABLATIONS:
        options = {key.removeprefix("model."): value for key, value in ablation.set.items()}
        assert all(key.startswith("model.") for key in ablation.set), ablation
        model = tiny_grefel(**options)
        assert model.balancing == options.get("balancing", "both"), ablation
        assert set(model.losses) == set(options.get("losses", ("cls", "anchor", "center"))), ablation


# ---- the released backbones, by their public names ----------------------------------------------------------------

def _batchnorm(prefix: str, channels: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.rand(channels), f"{prefix}.bias": torch.randn(channels),
            f"{prefix}.running_mean": torch.randn(channels), f"{prefix}.running_var": torch.rand(channels) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(7)}


def face_evolve_ir(widths=(8, 16, 32, 40), units=(1, 1, 1, 1), embedding=12, final=2) -> dict[str, torch.Tensor]:
    """A tiny state dict laid out as face.evoLVe's released IR-50 (backbone/model_irse.py): stem, every stage of
    improved residual units, and the recognition head, with random values."""
    state = {"input_layer.0.weight": torch.randn(widths[0], 3, 3, 3), **_batchnorm("input_layer.1", widths[0]),
             "input_layer.2.weight": torch.rand(widths[0])}
    unit, channels = 0, widths[0]
    for width, count in zip(widths, units):
        for _ in range(count):
            if channels != width:
                state[f"body.{unit}.shortcut_layer.0.weight"] = torch.randn(width, channels, 1, 1)
                state.update(_batchnorm(f"body.{unit}.shortcut_layer.1", width))
            state.update(_batchnorm(f"body.{unit}.res_layer.0", channels))
            state[f"body.{unit}.res_layer.1.weight"] = torch.randn(width, channels, 3, 3)
            state[f"body.{unit}.res_layer.2.weight"] = torch.rand(width)
            state[f"body.{unit}.res_layer.3.weight"] = torch.randn(width, width, 3, 3)
            state.update(_batchnorm(f"body.{unit}.res_layer.4", width))
            unit, channels = unit + 1, width
    state.update(_batchnorm("output_layer.0", widths[-1]))
    state["output_layer.3.weight"] = torch.randn(embedding, widths[-1] * final * final)
    state["output_layer.3.bias"] = torch.randn(embedding)
    state.update(_batchnorm("output_layer.4", embedding))
    return state


def test_face_evolve_ir50_loads_by_its_names(tmp_path):
    released = face_evolve_ir()
    path = tmp_path / "backbone_ir50_ms1m_epoch120.pth"
    torch.save(released, path)                     # face.evoLVe saves the bare state dict
    backbone = IRBackbone(**TINY_IR)
    ignored = load_ir50_checkpoint(backbone, path)
    # Only the fourth stage and the recognition head are left out, and nothing is missing.
    assert ignored == sorted(k for k in released if k.startswith(("body.3.", "output_layer.")))
    loaded = backbone.state_dict()
    assert set(loaded) == set(released) - set(ignored)
    for key, value in loaded.items():
        torch.testing.assert_close(value, released[key], msg=key)


def test_poster_v2_split_ir50_names_load_too(tmp_path):
    released = {k: v for k, v in face_evolve_ir().items() if not k.startswith("body.3.")}
    split = {}
    for key, value in released.items():    # POSTER++'s Backbone: body1, body2, body3, one unit each here
        if key.startswith("body."):
            _, unit, rest = key.split(".", 2)
            key = f"body{int(unit) + 1}.0.{rest}"
        split[f"module.{key}"] = value         # saved from nn.DataParallel
    path = tmp_path / "ir50.pth"
    torch.save({"state_dict": split}, path)
    backbone = IRBackbone(**TINY_IR)
    assert load_ir50_checkpoint(backbone, path) == sorted(k for k in released if k.startswith("output_layer."))
    torch.testing.assert_close(backbone.state_dict()["body.2.res_layer.3.weight"], released["body.2.res_layer.3.weight"])


def test_a_wrong_ir50_file_is_a_one_line_error_naming_the_keys(tmp_path):
    released = face_evolve_ir()
    del released["body.1.res_layer.1.weight"]
    released["body.0.res_layer.9.weight"] = torch.zeros(1)
    released["input_layer.0.weight"] = torch.zeros(8, 3, 5, 5)
    path = tmp_path / "ir50.pth"
    torch.save(released, path)
    with pytest.raises(ConfigError) as error:
        load_ir50_checkpoint(IRBackbone(**TINY_IR), path)
    message = str(error.value)
    assert "\n" not in message
    assert "missing body.1.res_layer.1.weight" in message and "unexpected body.0.res_layer.9.weight" in message
    assert "other shapes input_layer.0.weight" in message
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint") as error:
        load_ir50_checkpoint(IRBackbone(**TINY_IR), tmp_path / "notes.pth")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_ir50_checkpoint(IRBackbone(**TINY_IR), tmp_path / "absent.pth")


def release_mobilefacenet_keys(units=(1, 1, 1)) -> set[str]:
    """The parameter names of POSTER++'s mobilefacenet_model_best.pth.tar, from the public models/mobilefacenet.py
    layout (Conv_block: conv, bn, prelu; Linear_block: conv, bn; Depth_Wise: conv, conv_dw, project; GDC head)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    conv_block = lambda p: {f"{p}.conv.weight", f"{p}.prelu.weight", *(f"{p}.bn.{n}" for n in bn)}
    linear_block = lambda p: {f"{p}.conv.weight", *(f"{p}.bn.{n}" for n in bn)}
    depth_wise = lambda p: conv_block(f"{p}.conv") | conv_block(f"{p}.conv_dw") | linear_block(f"{p}.project")
    keys = conv_block("conv1") | conv_block("conv2_dw") | conv_block("conv_6_sep")
    for name in ("conv_23", "conv_34", "conv_45"):
        keys |= depth_wise(name)
    for name, count in zip(("conv_3", "conv_4", "conv_5"), units):
        for i in range(count):
            keys |= depth_wise(f"{name}.model.{i}")
    return keys | linear_block("output_layer.conv_6_dw") | {"output_layer.linear.weight"} | {
        f"output_layer.bn.{n}" for n in bn}


def test_mobilefacenet_has_the_release_names():
    assert set(MobileFaceNet(32, **TINY_MOBILEFACENET).state_dict()) == release_mobilefacenet_keys()
    assert set(MobileFaceNet(112).state_dict()) == release_mobilefacenet_keys((4, 6, 2))


def test_released_landmark_detector_loads_frozen_and_needs_no_landmarks(tmp_path):
    torch.manual_seed(3)
    released = MobileFaceNet(32, **TINY_MOBILEFACENET)
    for name, value in released.state_dict().items():
        if value.is_floating_point():
            value.copy_(torch.rand_like(value) + 0.5 if "running_var" in name else torch.randn_like(value))
    path = tmp_path / "mobilefacenet_model_best.pth.tar"
    torch.save({"epoch": 12, "state_dict": released.state_dict()}, path)     # as the .pth.tar release
    model = tiny_grefel(landmark_weights=str(path)).train()
    for key, value in released.state_dict().items():
        torch.testing.assert_close(model.landmark_detector.state_dict()[key], value, msg=key)
    assert not model.trains_landmark_detector and not model.landmark_detector.training
    assert not any(p.requires_grad for p in model.landmark_detector.parameters())
    assert not model.inputs.landmarks and not model.inputs.real_landmarks
    outputs = model(**model.example_inputs(batch_size=2))
    parts = model.loss({"expression": outputs}, {"expression": {"labels": torch.tensor([0, 1])}})
    assert "landmarks" not in parts
    released.eval()
    with torch.no_grad():
        half = torch.nn.functional.interpolate(model.example_inputs(2)["frames"][:, 0], size=32, mode="bilinear",
                                               antialias=True, align_corners=False)
    torch.testing.assert_close(model.landmark_detector(half)[1], released(half)[1])


def test_a_recognition_mobilefacenet_or_a_wrong_file_is_refused(tmp_path):
    trunk = {k: v for k, v in MobileFaceNet(32, **TINY_MOBILEFACENET).state_dict().items()
             if not k.startswith("output_layer.")}
    recognition = {**trunk, "conv_6_dw.conv.weight": torch.zeros(64, 1, 2, 2), "linear.weight": torch.zeros(8, 64),
                   **_batchnorm("bn", 8)}
    torch.save(recognition, tmp_path / "face_evolve_mobilefacenet.pth")
    with pytest.raises(ConfigError, match="face-recognition network") as error:
        load_mobilefacenet_checkpoint(MobileFaceNet(32, **TINY_MOBILEFACENET), tmp_path / "face_evolve_mobilefacenet.pth")
    assert "\n" not in str(error.value)
    torch.save(face_evolve_ir(), tmp_path / "ir50.pth")
    with pytest.raises(ConfigError, match="missing conv1.bn.bias") as error:
        tiny_grefel(landmark_weights=str(tmp_path / "ir50.pth"))
    assert "unexpected body.0" in str(error.value) and "\n" not in str(error.value)


def test_ir50_weights_reach_the_model_and_resnet_stays_an_option(tmp_path):
    released = face_evolve_ir()
    torch.save(released, tmp_path / "ir50.pth")
    model = tiny_grefel(image_weights=str(tmp_path / "ir50.pth"))
    torch.testing.assert_close(model.image_stream.backbone.state_dict()["body.1.res_layer.3.weight"],
                               released["body.1.res_layer.3.weight"])
    torch.manual_seed(1)
    ResNetBackbone(ResNetConfig(**TINY_RESNET, out_features=RESNET_STAGES)).save_pretrained(tmp_path / "resnet")
    saved = ResNetBackbone.from_pretrained(tmp_path / "resnet", out_features=RESNET_STAGES)
    resnet = tiny_grefel(image_backbone="resnet50", image_weights=str(tmp_path / "resnet"))
    for (name, expected), actual in zip(saved.state_dict().items(), resnet.image_stream.backbone.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    assert resnet(**resnet.example_inputs(2))["logits"].shape == (2, 3)


# ---- the explanation and training ----------------------------------------------------------------------------------

def test_explain_draws_the_landmark_attention_and_the_reliability_correction(tmp_path):
    model = tiny_grefel().eval()
    frames = model.example_inputs(batch_size=2)["frames"]
    batch = {"frames": frames, "landmarks": random_landmarks(2), "labels": torch.tensor([1, 0]),
             "sample_ids": ["train/00042", "x"]}
    with torch.no_grad():
        outputs = model(**model.batch_inputs(batch))
    paths = model.explain(batch, outputs, tmp_path, ["happy", "sad", "angry"])
    assert [p.name for p in paths] == ["train_00042-landmark-attention.png", "train_00042-landmark-attention.json",
                                       "train_00042-reliability.png", "train_00042-reliability.json"]
    for path in paths[::2]:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    attention = json.loads(paths[1].read_text())
    assert [(s["size"], s["window"]) for s in attention["scales"]] == [(8, 4), (4, 2), (2, 2)]
    for scale in attention["scales"]:
        assert np.isclose(np.sum(scale["attention_received"]), 1.0)
    assert np.array(attention["detected_landmarks"]).shape == (68, 2)
    reliability = json.loads(paths[3].read_text())
    assert reliability["label"] == "sad" and reliability["classes"] == ["happy", "sad", "angry"]
    final = np.array(reliability["distributions"]["probabilities"])
    np.testing.assert_allclose(final, outputs["probabilities"][0].numpy(), rtol=1e-5)
    assert reliability["predicted"] == ["happy", "sad", "angry"][int(final.argmax())]
    assert set(reliability["distributions"]) == {"primary", "geometric", "attentive", "correction", "probabilities"}


def test_tiny_model_fits_a_small_fixed_batch():
    model = tiny_grefel().train()
    generator = torch.Generator().manual_seed(1)
    inputs = model.example_inputs(batch_size=6, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    # 30 steps: enough for the backbones' BatchNorm running statistics, which evaluation uses, to settle.
    for _ in range(30):
        losses = loss_of(model, model(**inputs), labels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first if first is not None else losses["cls"].item()
    assert losses["cls"].item() < 0.3 * first
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    assert outputs["logits"].argmax(-1).tolist() == labels.tolist()
