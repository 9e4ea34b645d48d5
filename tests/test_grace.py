"""GRACE at tiny size: each equation against a plain reference (numpy or loops), the LGI-Former and the MAE-DFER /
VideoCLIP checkpoints loaded by their public names, the ablation switches, and the losses."""
from __future__ import annotations

import argparse
import inspect
import math
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from transformers import BertConfig, BertModel, VideoMAEConfig, VideoMAEModel

from affectprep.config import ConfigError
from affectprep.models.grace import (TINY_LGI, TINY_TEXT, TINY_VIDEO, Grace, caption_sentences, motion_weights,
                                     salient_tokens, sentence_groups)
from affectprep.models.layers.lgi_former import LGIFormer, sinusoid_table
from affectprep.models.losses import (auxiliary_text_loss, focal_loss, grace_loss, inverse_sqrt_class_weights,
                                      supervised_contrastive_loss)
from affectprep.models.registry import create_model, model_ablations, model_builder
from affectprep.models.text import tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_grace(**options):
    torch.manual_seed(0)
    return create_model("grace", tiny=True, **options)


def astronaut_frames(config, shifts=(0, 1, 3, 6)) -> torch.Tensor:
    """A (1, T, 3, H, W) clip of the astronaut's face drifting right, normalised with the ImageNet statistics."""
    face = data.astronaut()[20:220, 140:340]
    frames = []
    for shift in shifts[:config.num_frames]:
        crop = cv2.resize(np.roll(face, shift * 4, axis=1), (config.image_size, config.image_size),
                          interpolation=cv2.INTER_AREA)
        frames.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 255)
    clip = torch.stack(frames)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((clip - mean[:, None, None]) / std[:, None, None])[None]


# ---- Eqs. 2-3: motion-difference weights ------------------------------------------------------------------------

def reference_motion(tokens: np.ndarray, mode: str) -> np.ndarray:
    batch, segments, patches, _ = tokens.shape
    if mode == "none":
        return np.ones((batch, segments, patches))
    delta = np.zeros((batch, segments, patches))
    for b in range(batch):
        for t in range(1, segments):
            for p in range(patches):
                delta[b, t, p] = math.sqrt(((tokens[b, t, p] - tokens[b, t - 1, p]) ** 2).sum() + 1e-6)
        delta[b, 0] = delta[b, 1]
        if mode == "temporal":
            delta[b] = delta[b].mean(axis=1, keepdims=True)
        elif mode == "spatial":
            delta[b] = delta[b].mean(axis=0, keepdims=True)
        delta[b] /= delta[b].mean()
    return delta


@pytest.mark.parametrize("mode", ["both", "spatial", "temporal", "none"])
def test_motion_weights_follow_eqs_2_and_3(mode):
    tokens = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens[1, 2:, 3] += 4.0                         # sample 1: patch 3 jumps between segments 1 and 2
    weights = motion_weights(tokens, mode)
    np.testing.assert_allclose(weights.numpy(), reference_motion(tokens.numpy(), mode), rtol=1e-9)
    if mode in ("both", "spatial"):
        assert weights[1, 2].argmax() == 3
    static = torch.randn(1, 1, 6, 8).expand(2, 4, 6, 8)
    torch.testing.assert_close(motion_weights(static, mode), torch.ones(2, 4, 6))


def test_salient_tokens_keep_the_top_share_by_weight():
    weights = torch.rand(3, 40, generator=torch.Generator().manual_seed(0))
    kept = salient_tokens(weights, 0.25)
    for b in range(3):
        assert kept[b].tolist() == sorted(np.argsort(-weights[b].numpy())[:10].tolist())
    assert salient_tokens(weights, 0.001).shape == (3, 1)


# ---- the transport plan (Eqs. 4-5) and what motion does to it ---------------------------------------------------

def reference_sinkhorn(cost: np.ndarray, a: np.ndarray, b: np.ndarray, epsilon: float, iterations: int):
    kernel = np.exp(-cost / epsilon)
    u, v = np.ones_like(a), np.zeros_like(b)
    for _ in range(iterations):
        v = b / (kernel.T @ u)
        u = a / (kernel @ v)
    return u[:, None] * kernel * v[None]


def features_grace(**options):
    """A tiny GRACE over cached tokens, so a test can set the visual tokens (and their motion) directly."""
    return tiny_grace(video_features=True, text_features=True, text_dim=12, **options).eval()


def region_inputs(motion: float, batch: int = 1):
    """Visual tokens (B, 2, 4, 32) where position 1 moves by `motion` between the two segments, and text."""
    generator = torch.Generator().manual_seed(3)
    still = torch.randn(batch, 1, 4, 32, generator=generator).expand(-1, 2, -1, -1).clone()
    still += 0.1 * torch.randn(still.shape, generator=generator)
    still[:, 1, 1] += motion * torch.randn(32, generator=generator)
    text = torch.randn(batch, 5, 12, generator=generator)
    return {"visual_tokens": still, "text_tokens": text, "text_mask": torch.ones(batch, 5, dtype=torch.bool)}


@pytest.mark.parametrize("matching", ["ot", "cosine", "cross_attention"])
def test_moving_one_region_moves_plan_mass_onto_its_tokens(matching):
    model = features_grace(matching=matching, keep_tokens=1.0)
    with torch.no_grad():
        quiet, moving = model(**region_inputs(0.5)), model(**region_inputs(3.0))
    region = [1, 5]                               # position 1 in both segments
    quiet_mass, moving_mass = quiet["plan"].sum(1)[0, region].sum(), moving["plan"].sum(1)[0, region].sum()
    assert moving_mass > quiet_mass + 0.1
    if matching == "ot":   # the visual marginal is the motion weights: a token's mass is its share of W
        weights = moving["motion_weights"].flatten(1)
        torch.testing.assert_close(moving["plan"].sum(1), weights / weights.sum(), atol=1e-5, rtol=0)
    without = features_grace(matching=matching, motion="none")
    with torch.no_grad():
        same = [without(**region_inputs(m))["plan"].sum(1) for m in (0.5, 3.0)]
    if matching == "ot":   # uniform marginals (Eq. 5 "typically uniform"): motion cannot move mass
        torch.testing.assert_close(same[0], same[1], atol=1e-5, rtol=0)


def test_plan_is_the_entropic_ot_of_the_cosine_cost_over_the_salient_tokens():
    model = features_grace(keep_tokens=0.5, sinkhorn_iterations=300)
    inputs = region_inputs(2.0, batch=2)
    inputs["text_mask"][1, 3:] = False
    with torch.no_grad():
        out = model(**inputs)
    kept = out["kept"]
    assert kept.sum(1).tolist() == [4, 4]
    for b in range(2):
        text = out["shared_text"][b].double().numpy()[: int(inputs["text_mask"][b].sum())]
        visual = out["shared_visual"][b].double().numpy()
        cost = 1 - (text / np.linalg.norm(text, axis=1, keepdims=True)) @ \
            (visual / np.linalg.norm(visual, axis=1, keepdims=True)).T                     # Eq. 4
        weights = out["motion_weights"][b].flatten()[kept[b]].double().numpy()
        a, b_marginal = np.full(len(text), 1 / len(text)), weights / weights.sum()
        expected = reference_sinkhorn(cost, a, b_marginal, model.epsilon, 300)             # Eq. 5
        plan = out["plan"][b][:, kept[b]].double().numpy()
        np.testing.assert_allclose(plan[: len(text)], expected, atol=2e-6)
        assert (out["plan"][b][:, ~kept[b]] == 0).all() and (out["plan"][b][len(text):] == 0).all()
        # the salient tokens are those of largest motion weight
        assert set(torch.nonzero(kept[b]).flatten().tolist()) == \
            set(out["motion_weights"][b].flatten().topk(4).indices.tolist())


def test_cosine_and_cross_attention_matchings_against_plain_formulas():
    inputs = region_inputs(2.0, batch=2)
    for matching in ("cosine", "cross_attention"):
        model = features_grace(matching=matching, keep_tokens=1.0)
        with torch.no_grad():
            out = model(**inputs)
            text, visual = out["shared_text"], out["shared_visual"]
            b = out["visual_marginal"] / out["visual_marginal"].sum(1, keepdim=True)
            for s in range(2):
                expected = torch.zeros(5, 8)
                for i in range(5):
                    for j in range(8):
                        if matching == "cosine":
                            logit = lambda jj: (b[s, jj] * torch.exp(  # noqa: E731
                                -(1 - F.cosine_similarity(text[s, i], visual[s, jj], dim=0)) / model.epsilon))
                            expected[i, j] = logit(j) / sum(logit(jj) for jj in range(8)) / 5
                        else:
                            heads = model.cross_attention.heads
                            q = model.cross_attention.query(text[s, i]).reshape(heads, -1)
                            k = model.cross_attention.key(visual[s]).reshape(8, heads, -1)
                            share = 0.0
                            for h in range(heads):
                                scores = torch.stack([q[h] @ k[jj, h] / math.sqrt(q.shape[1]) + torch.log(b[s, jj])
                                                      for jj in range(8)])
                                share += scores.softmax(0)[j] / heads
                            expected[i, j] = share / 5
                torch.testing.assert_close(out["plan"][s], expected, atol=1e-5, rtol=1e-4)


# ---- fusion, key segments (Fig. 6) and the classifier input ------------------------------------------------------

def test_key_segments_and_pooling_follow_the_transported_affinity():
    model = features_grace(keep_tokens=0.75, key_frames=2)          # tubelet 2: one key segment of two
    inputs = region_inputs(2.0, batch=3)
    with torch.no_grad():
        out = model(**inputs)
        for b in range(3):
            kept = torch.nonzero(out["kept"][b]).flatten().tolist()
            cost = {j: 1 - F.cosine_similarity(out["shared_text"][b], out["shared_visual"][b, n][None], dim=1)
                    for n, j in enumerate(kept)}
            plan = out["plan"][b]
            affinity = {j: float((plan[:, j] * (1 - cost[j] / 2)).sum()) for j in kept}
            scores = [sum(r for j, r in affinity.items() if j // 4 == t) for t in range(2)]
            np.testing.assert_allclose(out["segment_scores"][b].numpy(), scores, rtol=1e-5)
            key = int(np.argmax(scores))
            assert out["key_segments"][b].tolist() == [t == key for t in range(2)]
            # embedding = affinity-weighted mean over the key segment's kept tokens of fuse([x_j, text sent to j])
            total, weight = torch.zeros(16), 0.0
            for n, j in enumerate(kept):
                if j // 4 != key:
                    continue
                sent = sum(plan[i, j] * out["shared_text"][b, i] for i in range(5)) / plan[:, j].sum()
                total += affinity[j] * model.fuse(torch.cat([out["shared_visual"][b, n], sent]))
                weight += affinity[j]
            torch.testing.assert_close(out["embedding"][b], total / weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out["logits"][b], model.head(out["embedding"][b]))


def test_the_text_side_decides_the_key_segments():
    # Same clip, different captions: with fixed marginals every segment carries its motion share of the mass, so
    # only the affinity (what the text matches) can change which segment is key.
    model = features_grace(keep_tokens=1.0, key_frames=2)
    visual = region_inputs(0.0)["visual_tokens"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        chosen = {tuple(model(visual_tokens=visual, text_tokens=torch.randn(1, 5, 12, generator=generator) * 3
                              )["key_segments"][0].tolist()) for _ in range(20)}
    assert len(chosen) == 2


# ---- sentence-level text (Table III) -----------------------------------------------------------------------------

def test_sentence_groups_map_tokens_to_their_sentence():
    texts = ["The brows draw inward. The lips press together!", "Eyes widen."]
    tokenizer = tiny_tokenizer()
    encoded = tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    groups = sentence_groups(texts, encoded["offset_mapping"])
    for b, text in enumerate(texts):
        spans = caption_sentences(text)
        for i, (start, end) in enumerate(encoded["offset_mapping"][b].tolist()):
            expected = -1 if end == start else next(s for s, (x, y) in enumerate(spans) if x <= start < y)
            assert groups[b, i] == expected
    assert groups[0].max() == 1 and groups[1].max() == 0


def test_sentence_level_aligns_one_token_per_sentence():
    model = tiny_grace(text_level="sentence").eval()
    texts = ["The brows draw inward. The lips press together. The jaw drops.", "Eyes widen. Mouth opens."]
    batch = {"frames": torch.randn(2, 4, 3, 32, 32), "texts": texts}
    inputs = model.batch_inputs(batch)
    with torch.no_grad():
        out = model(**inputs)
        tokens, mask = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        refined = model.text_refiner(tokens)
    assert out["plan"].shape[1] == 3 and out["text_mask"].tolist() == [[True] * 3, [True, True, False]]
    for b in range(2):
        for s in range(int(out["text_mask"][b].sum())):
            members = inputs["text_groups"][b] == s
            torch.testing.assert_close(out["shared_text"][b, s], refined[b, members].mean(0))
    with pytest.raises(ValueError, match="sentence"):
        tiny_grace(text_level="sentence", text_features=True, text_dim=12)


# ---- the contrastive alignment weighted by T* (III-D c, Eq. 7) ---------------------------------------------------

@pytest.mark.parametrize("matching", ["ot", "cross_attention"])
def test_pair_similarity_weights_token_pairs_by_each_pairs_plan(matching):
    model = features_grace(matching=matching)
    out = model(**region_inputs(2.0, batch=3))
    similarity = model.pair_similarity(out)
    for v in range(3):
        for u in range(3):
            text, visual = out["shared_text"][u:u + 1], out["shared_visual"][v:v + 1]
            cost = 1 - F.cosine_similarity(text[0][:, None], visual[0][None], dim=-1)[None]
            with torch.no_grad():
                plan = model._plan(text, out["text_mask"][u:u + 1], visual, out["visual_marginal"][v:v + 1], cost)
            torch.testing.assert_close(similarity[v, u], (plan * (1 - cost)).sum(), atol=1e-5, rtol=1e-5)
    # The diagonal re-solves the forward's own plans.
    torch.testing.assert_close(similarity.diagonal().detach(), (out["plan"].gather(
        2, torch.nonzero(out["kept"])[:, 1].reshape(3, 1, -1).expand(-1, 5, -1)) * (1 - torch.stack(
            [1 - F.cosine_similarity(out["shared_text"][b][:, None], out["shared_visual"][b][None], dim=-1)
             for b in range(3)]))).sum((1, 2)).detach(), atol=1e-5, rtol=1e-5)
    similarity.sum().backward()           # gradients reach the features through the cosines
    assert model.visual_proj.weight.grad.abs().sum() > 0 and model.text_refiner.project.weight.grad.abs().sum() > 0


def reference_supcon(similarity: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    n = len(similarity)
    losses = []
    for i in range(n):
        denominator = sum(math.exp(similarity[i, j] / temperature) for j in range(n) if j != i)
        weights = [labels[i] @ labels[p] if p != i else 0.0 for p in range(n)]
        if sum(weights) == 0:
            continue
        losses.append(-sum(w * (similarity[i, p] / temperature - math.log(denominator))
                           for p, w in enumerate(weights) if w) / sum(weights))
    return float(np.mean(losses)) if losses else 0.0


def test_supervised_contrastive_loss_is_eq_7():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.rand(6, 6, generator=generator, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    one_hot = F.one_hot(labels, 4).double().numpy()
    loss = supervised_contrastive_loss(similarity, labels, temperature=0.1)
    assert loss.item() == pytest.approx(reference_supcon(similarity.numpy(), one_hot, 0.1), rel=1e-5)
    # Mixup: 2N pairs, the mixed ones' similarities and labels bilinear / linear in the originals.
    torch.manual_seed(5)
    mixed = supervised_contrastive_loss(similarity, labels, temperature=0.1, mixup_alpha=0.4)
    torch.manual_seed(5)
    lam = torch.distributions.Beta(0.4, 0.4).sample().item()
    partner = torch.randperm(6).numpy()
    mixing = np.concatenate([np.eye(6), lam * np.eye(6) + (1 - lam) * np.eye(6)[partner]])
    expected = reference_supcon(mixing @ similarity.numpy() @ mixing.T, mixing @ one_hot, 0.1)
    assert mixed.item() == pytest.approx(expected, rel=1e-5)
    # Mixing similarities is mixing the features of both sides (a similarity is bilinear).
    visual, text = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    m = torch.from_numpy(mixing)
    torch.testing.assert_close(m @ (visual @ text.T) @ m.T, (m @ visual) @ (m @ text).T)
    assert supervised_contrastive_loss(similarity[:4, :4], torch.arange(4)) == 0   # no positives


def test_clustered_pairs_give_a_lower_contrastive_loss():
    model = features_grace()
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(2)
    out = model(**region_inputs(2.0, batch=6))
    similarity = model.pair_similarity(out).detach()
    by_class = torch.where(labels[:, None] == labels[None], 1.0, -1.0)
    assert supervised_contrastive_loss(by_class, labels) < supervised_contrastive_loss(
        by_class, labels[torch.randperm(6, generator=generator)])
    assert torch.isfinite(supervised_contrastive_loss(similarity, labels, mixup_alpha=0.2))


# ---- Eqs. 6, 8, 9 -----------------------------------------------------------------------------------------------

def test_focal_loss_is_eq_6():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (8,), generator=generator)
    weights = inverse_sqrt_class_weights([50, 10, 5, 20]).double()
    expected, norm = 0.0, 0.0
    for i in range(8):
        p = torch.softmax(logits[i], 0)
        c = int(targets[i])
        expected += -weights[c] * (1 - p[c]) ** 2 * math.log(p[c])
        norm += weights[c]
    assert focal_loss(logits, targets, weights, gamma=2.0).item() == pytest.approx(float(expected / norm), rel=1e-6)
    torch.testing.assert_close(focal_loss(logits, targets, weights.float(), gamma=0.0).double(),
                               F.cross_entropy(logits, targets, weight=weights), atol=1e-6, rtol=1e-6)


def test_auxiliary_loss_is_eq_8_and_the_total_is_eq_9():
    generator = torch.Generator().manual_seed(0)
    text_logits = torch.randn(5, 3, generator=generator)
    labels = torch.tensor([0, 2, 1, 1, 0])
    expected = -np.mean([np.log(np.exp(row) / np.exp(row).sum())[c] for row, c in zip(text_logits.numpy(), labels)])
    assert auxiliary_text_loss(text_logits, labels).item() == pytest.approx(expected, rel=1e-5)
    model = tiny_grace(num_classes=3).train()
    outputs = model(**model.example_inputs(batch_size=4))
    labels = torch.tensor([0, 1, 0, 2])
    weights = inverse_sqrt_class_weights([10, 5, 1])
    similarity = model.pair_similarity(outputs)
    torch.manual_seed(0)
    total, parts = grace_loss(outputs, similarity, labels, weights, lambdas=(1.0, 0.5, 0.25))
    assert set(parts) == {"focal", "supcon", "aux"}
    torch.testing.assert_close(total.detach(), parts["focal"] + 0.5 * parts["supcon"] + 0.25 * parts["aux"])


def test_the_tiny_model_trains():
    model = tiny_grace(num_classes=3).train()
    inputs = model.example_inputs(batch_size=4)
    batches = {"expression": {"labels": torch.tensor([0, 1, 0, 2])}}
    optimizer = torch.optim.AdamW(model.param_groups(lr=1e-2))
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model.loss({"expression": model(**inputs)}, batches)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_inverse_sqrt_class_weights():
    weights = inverse_sqrt_class_weights([100, 25, 4])
    raw = torch.tensor([1 / 10, 1 / 5, 1 / 2])
    torch.testing.assert_close(weights, raw / raw.mean())
    torch.testing.assert_close(inverse_sqrt_class_weights([16, 0, 4]), torch.tensor([2 / 3, 0.0, 4 / 3]))
    with pytest.raises(ValueError, match="non-negative"):
        inverse_sqrt_class_weights([3, -1])


# ---- the LGI-Former ----------------------------------------------------------------------------------------------

def test_sinusoid_table_is_videomaes():
    positions, dim = 7, 6
    expected = np.array([[p / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for p in range(positions)])
    expected[:, 0::2], expected[:, 1::2] = np.sin(expected[:, 0::2]), np.cos(expected[:, 1::2])
    np.testing.assert_allclose(sinusoid_table(positions, dim).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_regions_are_contiguous_token_blocks_and_round_trip():
    config = TINY_LGI.__class__(**{**TINY_LGI.__dict__, "image_size": 64, "num_frames": 4, "region_size": (1, 2, 2)})
    model = LGIFormer(config)
    t, h, w = config.token_grid                              # 2 x 4 x 4
    index = torch.arange(t * h * w, dtype=torch.float32)[None, :, None]
    regions = model._to_regions(index)[0, :, :, 0]
    nt, nh, nw = config.region_grid
    for r in range(nt * nh * nw):
        rt, rh, rw = r // (nh * nw), (r // nw) % nh, r % nw
        expected = [(rt + dt) * h * w + (rh * 2 + dh) * w + rw * 2 + dw
                    for dt in range(1) for dh in range(2) for dw in range(2)]
        assert regions[r].tolist() == expected
    torch.testing.assert_close(model._from_regions(model._to_regions(index)), index)


def reference_attention(attention, x, context):
    heads = attention.heads
    q = x @ attention.q.weight.T + attention.q_bias
    k = context @ attention.kv.weight[: x.shape[-1]].T
    v = context @ attention.kv.weight[x.shape[-1]:].T + attention.v_bias
    outputs = []
    for h in range(heads):
        size = x.shape[-1] // heads
        qh, kh, vh = (m[:, h * size:(h + 1) * size] for m in (q, k, v))
        outputs.append(torch.softmax(qh @ kh.T / math.sqrt(size), dim=-1) @ vh)
    return attention.proj(torch.cat(outputs, dim=-1))


def test_lgi_block_is_local_then_global_then_local_global_attention():
    torch.manual_seed(0)
    config = TINY_LGI.__class__(**{**TINY_LGI.__dict__, "num_attention_heads": 2})
    block = LGIFormer(config).blocks[0].eval()
    batch, regions, size, dim = 2, 2, 4, 32
    x = torch.randn(batch * regions, 1 + size, dim)
    with torch.no_grad():
        out = block(x, batch)
        for b in range(batch):
            local = [x[b * regions + r] for r in range(regions)]
            local = [s + reference_attention(block.first_attn, block.first_attn_norm0(s), block.first_attn_norm0(s))
                     for s in local]                                                  # (1) within each region
            messengers = torch.stack([s[0] for s in local])
            normed = block.second_attn_norm0(messengers)
            messengers = messengers + reference_attention(block.second_attn, normed, normed)   # (2) global
            tokens = torch.cat([s[1:] for s in local])
            tokens = tokens + reference_attention(block.third_attn, block.third_attn_norm0(tokens),
                                                  block.third_attn_norm1(messengers))   # (3) tokens -> messengers
            for r in range(regions):
                row = torch.cat([messengers[r:r + 1], tokens[r * size:(r + 1) * size]])
                row = row + block.mlp(block.norm2(row))                                 # (4)
                torch.testing.assert_close(out[b * regions + r], row, atol=1e-5, rtol=1e-4)


# ---- MAE-DFER checkpoints by their public names -----------------------------------------------------------------

def mae_dfer_encoder_shapes(depth=2, dim=32, hidden=64, tubelet=2, patch=16, regions=2) -> dict[str, tuple]:
    """The encoder's parameter names and shapes in MAE-DFER's modeling_finetune / modeling_pretrain (LGBlock with
    first_attn_type 'self' and third_attn_type 'cross', qkv_bias=True), written out from the release."""
    shapes = {"patch_embed.proj.weight": (dim, 3, tubelet, patch, patch), "patch_embed.proj.bias": (dim,),
              "lg_region_tokens": (regions, dim)}
    for i in range(depth):
        block = f"blocks.{i}."
        for norm in ("first_attn_norm0", "second_attn_norm0", "third_attn_norm0", "third_attn_norm1", "norm2"):
            shapes.update({f"{block}{norm}.weight": (dim,), f"{block}{norm}.bias": (dim,)})
        for attention in ("first_attn", "second_attn", "third_attn"):
            shapes.update({f"{block}{attention}.q_bias": (dim,), f"{block}{attention}.v_bias": (dim,),
                           f"{block}{attention}.q.weight": (dim, dim), f"{block}{attention}.kv.weight": (2 * dim, dim),
                           f"{block}{attention}.proj.weight": (dim, dim), f"{block}{attention}.proj.bias": (dim,)})
        shapes.update({f"{block}mlp.fc1.weight": (hidden, dim), f"{block}mlp.fc1.bias": (hidden,),
                       f"{block}mlp.fc2.weight": (dim, hidden), f"{block}mlp.fc2.bias": (dim,)})
    return shapes


def mae_decoder_shapes(dim=32, decoder=24, tubelet=2, patch=16) -> dict[str, tuple]:
    """VideoMAE's decoder side of the pre-training release (one block), not part of the encoder."""
    block = "decoder.blocks.0."
    shapes = {f"{block}norm1.weight": (decoder,), f"{block}norm1.bias": (decoder,),
              f"{block}attn.qkv.weight": (3 * decoder, decoder), f"{block}attn.q_bias": (decoder,),
              f"{block}attn.v_bias": (decoder,), f"{block}attn.proj.weight": (decoder, decoder),
              f"{block}attn.proj.bias": (decoder,), f"{block}norm2.weight": (decoder,),
              f"{block}norm2.bias": (decoder,),
              f"{block}mlp.fc1.weight": (4 * decoder, decoder), f"{block}mlp.fc1.bias": (4 * decoder,),
              f"{block}mlp.fc2.weight": (decoder, 4 * decoder), f"{block}mlp.fc2.bias": (decoder,),
              "decoder.norm.weight": (decoder,), "decoder.norm.bias": (decoder,),
              "decoder.head.weight": (3 * tubelet * patch * patch, decoder),
              "decoder.head.bias": (3 * tubelet * patch * patch,),
              "encoder_to_decoder.weight": (decoder, dim), "mask_token": (1, 1, decoder)}
    return shapes


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


def release_args(**values) -> argparse.Namespace:
    """Training args as MAE-DFER's scripts save them (argparse; lg_region_size comes as a list)."""
    return argparse.Namespace(model="pretrain_videomae_base_dim512_no_depth_patch16_160", input_size=32,
                              num_frames=4, sampling_rate=4, lg_region_size=[1, 2, 2], attn_type="local_global",
                              lr=3e-4, **values)


def save_release(path, model_state, args) -> None:
    # utils.save_model's layout: model, optimizer, epoch, scaler, args.
    torch.save({"model": model_state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 49,
                "scaler": {"scale": 65536.0}, "args": args}, path)


def test_the_voxceleb2_pretraining_release_loads_by_its_own_names(tmp_path):
    encoder = random_state(mae_dfer_encoder_shapes())
    state = {"encoder." + k: v for k, v in encoder.items()}
    state.update({"encoder.norm.weight": torch.ones(32) * 1.5, "encoder.norm.bias": torch.zeros(32)})
    state.update(random_state(mae_decoder_shapes(), seed=1))
    path = tmp_path / "checkpoint-49.pth"
    save_release(path, state, release_args(encoder_depth=2, decoder_depth=1))
    from affectprep.models.layers.lgi_former import load_mae_dfer
    loaded, ignored = load_mae_dfer(path)
    assert ignored == sorted(mae_decoder_shapes())        # only the MAE decoder is left out
    mine = loaded.state_dict()
    assert sorted(mine) == sorted([*encoder, "norm.weight", "norm.bias"])   # zero missing, zero unexpected
    for name, value in encoder.items():
        torch.testing.assert_close(mine[name], value, msg=name)
    assert loaded.config.token_grid == (2, 2, 2) and loaded.config.region_size == (1, 2, 2)
    model = tiny_grace(video_encoder=str(path))
    assert model.inputs.image_size == 32 and model.token_grid == (2, 4)
    torch.testing.assert_close(model.video_encoder.norm.weight, torch.ones(32) * 1.5)
    assert torch.isfinite(model(**model.example_inputs(2))["logits"]).all()


def test_a_dfew_finetuned_release_loads_too(tmp_path):
    encoder = random_state(mae_dfer_encoder_shapes())
    state = {**encoder, "fc_norm.weight": torch.full((32,), 2.0), "fc_norm.bias": torch.zeros(32),
             "head.weight": torch.zeros(7, 32), "head.bias": torch.zeros(7)}
    path = tmp_path / "checkpoint-best.pth"
    save_release(path, state, release_args(depth=2, tubelet_size=2, nb_classes=7))
    model = tiny_grace(video_encoder=str(path))
    torch.testing.assert_close(model.video_encoder.norm.weight, torch.full((32,), 2.0))
    for name, value in encoder.items():
        torch.testing.assert_close(model.video_encoder.state_dict()[name], value, msg=name)


def test_a_wrong_video_checkpoint_is_a_one_line_error_naming_the_keys(tmp_path):
    videomae = tmp_path / "videomae.pth"
    torch.save({"model": VideoMAEModel(VideoMAEConfig(**TINY_VIDEO)).state_dict()}, videomae)
    with pytest.raises(ConfigError) as error:
        tiny_grace(video_encoder=str(videomae))
    assert "patch_embed.proj.weight" in str(error.value) and "\n" not in str(error.value)
    shapes = mae_dfer_encoder_shapes()
    state = random_state(shapes)
    state["lg_region_tokens"] = torch.zeros(3, 32)         # regions that do not tile the grid
    del state["blocks.1.third_attn_norm1.weight"]
    state["blocks.1.extra.weight"] = torch.zeros(2)
    wrong = tmp_path / "wrong.pth"
    save_release(wrong, {**state, "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)},
                 release_args(depth=2))
    with pytest.raises(ConfigError) as error:
        tiny_grace(video_encoder=str(wrong))
    message = str(error.value)
    assert "\n" not in message
    for key in ("missing blocks.1.third_attn_norm1.weight", "unexpected blocks.1.extra.weight",
                "lg_region_tokens (3, 32)"):
        assert key in message, message
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": state, "extra": np.zeros(3)}, unsafe)
    with pytest.raises(ConfigError, match="Python objects besides tensors.*state dict alone"):
        tiny_grace(video_encoder=str(unsafe))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint"):
        tiny_grace(video_encoder=str(text))
    with pytest.raises(ConfigError, match="neither a MAE-DFER checkpoint file nor a Hugging Face VideoMAE"):
        tiny_grace(video_encoder=str(tmp_path / "nowhere"))


def test_a_hugging_face_videomae_folder_still_works(tmp_path):
    torch.manual_seed(0)
    VideoMAEModel(VideoMAEConfig(**TINY_VIDEO)).save_pretrained(tmp_path / "videomae")
    model = tiny_grace(video_encoder=str(tmp_path / "videomae")).eval()
    assert isinstance(model.video_encoder, VideoMAEModel) and model.token_grid == (2, 4)
    frames = astronaut_frames(model.video_config)
    assert torch.isfinite(model(frames, **{k: v[:1] for k, v in model.example_inputs(2).items()
                                           if k != "frames"})["logits"]).all()


# ---- VideoCLIP's text tower --------------------------------------------------------------------------------------

def save_tiny_bert(folder):
    torch.manual_seed(1)
    bert = BertModel(BertConfig(**TINY_TEXT))             # with its pooler, as VideoCLIP's BertModel has
    bert.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return bert


def test_a_videoclip_checkpoint_gives_its_text_tower(tmp_path):
    base = tmp_path / "bert"
    bert = save_tiny_bert(base)
    torch.manual_seed(2)
    tower = {k: v + 0.01 * torch.randn_like(v) for k, v in bert.state_dict().items()}   # "fine-tuned" weights
    state = {f"mmmodel.text_encoder.{k}": v for k, v in tower.items()}
    state["mmmodel.text_encoder.embeddings.position_ids"] = torch.arange(256)[None]   # older transformers' buffer
    state["mmmodel.video_encoder.embeddings.word_embeddings.weight"] = torch.zeros(4, 24)
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"model": state, "args": argparse.Namespace(arch="mmarch"), "cfg": {"task": {"_name": "mmtask"}},
                "optimizer_history": [{"criterion_name": "MMCriterion", "num_updates": 10}]}, path)
    model = tiny_grace(text_encoder=str(path), text_base=str(base))
    loaded = model.text_encoder.state_dict()
    assert model.text_encoder.pooler is None
    for name, value in tower.items():
        if not name.startswith("pooler."):
            torch.testing.assert_close(loaded[name], value, msg=name)
    # Fine-tuned by default (the paper's setting), frozen on request.
    model.train()
    model.loss({"expression": model(**model.example_inputs(3))}, {"expression": {"labels": torch.tensor([0, 1, 0])}}
               )["loss"].backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    frozen = tiny_grace(text_encoder=str(path), text_base=str(base), finetune_text=False).train()
    assert not frozen.text_encoder.training
    assert not any(p.requires_grad for p in frozen.text_encoder.parameters())
    lost = tmp_path / "video_only.pt"
    torch.save({"model": {"mmmodel.video_encoder.x": torch.zeros(1)}}, lost)
    with pytest.raises(ConfigError, match="no text tower.*mmmodel"):
        tiny_grace(text_encoder=str(lost), text_base=str(base))


def test_a_hugging_face_text_folder_loads_without_its_pooler(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert")
    model = tiny_grace(text_encoder=str(tmp_path / "bert"))
    assert model.text_encoder.pooler is None
    torch.testing.assert_close(model.text_encoder.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)


# ---- encoders, ablations, groups --------------------------------------------------------------------------------

def test_outputs_have_the_documented_shapes():
    model = tiny_grace(num_classes=7)
    out = model(**model.example_inputs(batch_size=2))
    assert model.token_grid == (2, 4) and model.inputs.image_size == 32 and model.inputs.text == "caption"
    assert out["logits"].shape == out["text_logits"].shape == (2, 7)
    assert out["plan"].shape == (2, 6, 8) and out["kept"].sum(1).tolist() == [4, 4]
    assert out["motion_weights"].shape == (2, 2, 4) and out["segment_scores"].shape == (2, 2)
    assert out["key_segments"].sum(1).tolist() == [1, 1]                    # key_frames 2 = one tubelet
    assert out["embedding"].shape == out["text_embedding"].shape == (2, 16)


def test_the_vision_only_baseline_has_no_text_side():
    model = tiny_grace(use_text=False)
    assert model.text_encoder is None and model.inputs.text is None
    assert not any(name.startswith(("text_", "fuse")) for name, _ in model.named_parameters())
    inputs = model.example_inputs(3)
    assert set(inputs) == {"frames"}
    out = model(**inputs)
    batch = model.batch_inputs({"frames": inputs["frames"], "texts": ["ignored"] * 3})
    assert set(batch) == {"frames"}
    parts = model.loss({"expression": out}, {"expression": {"labels": torch.tensor([0, 1, 0])}})
    assert parts["supcon"] == 0 and parts["aux"] == 0 and parts["loss"] == parts["focal"]
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_features_path_equals_frames_path_on_the_encoders_own_tokens():
    model = tiny_grace().eval()
    frames = astronaut_frames(model.video_config)
    text = {"input_ids": torch.tensor([[2, 17, 42, 9, 77, 3]]), "attention_mask": torch.tensor([[1] * 6])}
    with torch.no_grad():
        tokens = model.encode_video(frames)
        from_frames = model(frames, **text)
        from_tokens = model(visual_tokens=tokens, **text)
        text_tokens, text_mask = model.encode_text(**text)
        from_both = model(visual_tokens=tokens, text_tokens=text_tokens, text_mask=text_mask)
    assert tokens.shape == (1, 2, 4, 32)
    for key in ("logits", "text_logits", "plan", "motion_weights", "segment_scores"):
        torch.testing.assert_close(from_frames[key], from_tokens[key])
        torch.testing.assert_close(from_frames[key], from_both[key])
    assert not torch.allclose(from_frames["motion_weights"], torch.ones_like(from_frames["motion_weights"]))


def test_bad_inputs_raise_clear_errors():
    model = tiny_grace()
    inputs = model.example_inputs(2)
    with pytest.raises(ValueError, match="frames of shape"):
        model(inputs["frames"][:, :3], input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="exactly one of frames or visual_tokens"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"samples \[1\] have no text tokens"):
        model(inputs["frames"], input_ids=inputs["input_ids"], attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    for options, message in (({"motion": "optical-flow"}, "motion must be one of"),
                             ({"keep_tokens": 0}, "keep_tokens"), ({"key_frames": 0}, "key_frames"),
                             ({"drop_path_rate": 1.0}, "drop_path_rate")):
        with pytest.raises(ValueError, match=message):
            tiny_grace(**options)


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = tiny_grace(drop_path_rate=0.9)
    frames = astronaut_frames(model.video_config).expand(8, -1, -1, -1, -1)
    model.eval()
    with torch.no_grad():
        evaluated = model.encode_video(frames)
        torch.testing.assert_close(model.encode_video(frames), evaluated)
        model.train()
        torch.manual_seed(1)
        trained = model.encode_video(frames)
    assert not torch.allclose(trained, evaluated)


def test_layer_decay_groups_follow_mae_dfer():
    model = tiny_grace(finetune_text=False)
    groups = model.param_groups(lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)

    def group_of(parameter):
        return next(g for g in groups if any(p is parameter for p in g["params"]))

    depth = model.video_config.num_hidden_layers
    encoder = model.video_encoder
    assert group_of(encoder.patch_embed.proj.weight)["lr"] == pytest.approx(1e-3 * 0.75 ** (depth + 1))
    assert group_of(encoder.blocks[0].first_attn.q.weight)["lr"] == pytest.approx(1e-3 * 0.75 ** depth)
    assert group_of(encoder.lg_region_tokens)["lr"] == pytest.approx(1e-3)
    assert group_of(encoder.lg_region_tokens)["weight_decay"] == 0.0          # MAE-DFER's skip list
    assert group_of(model.head[1].weight)["weight_decay"] == 0.05 and group_of(model.head[1].bias)["weight_decay"] == 0
    torch.optim.AdamW(groups)
    # A fine-tuned text encoder decays over its own depth.
    tuned = tiny_grace()
    text_groups = tuned.param_groups(lr=1e-3, layer_decay=0.5)
    embeddings = tuned.text_encoder.embeddings.word_embeddings.weight
    lr = next(g["lr"] for g in text_groups if any(p is embeddings for p in g["params"]))
    assert lr == pytest.approx(1e-3 * 0.5 ** (TINY_TEXT["num_hidden_layers"] + 1))


def test_every_ablation_table_is_registered_with_options_the_builder_takes():
    ablations = model_ablations("grace")
    counts = {}
    for a in ablations:
        counts[a.table] = counts.get(a.table, 0) + 1
    assert counts == {"Table I": 4, "Table II": 5, "Table III": 6, "Table IV": 3, "Table V": 4}
    assert len({(a.table, a.row) for a in ablations}) == len(ablations)
    accepted = set(inspect.signature(model_builder("grace")).parameters) | set(inspect.signature(Grace).parameters)
    from affectprep.pipeline.stages.cate import CateConfig
    cate_fields = set(CateConfig.__dataclass_fields__)
    for ablation in ablations:
        for key in ablation.set:
            kind, _, name = key.partition(".")
            assert (kind == "model" and name in accepted) or (key.startswith("stages.cate.")
                                                              and key.split(".")[2] in cate_fields), (ablation, key)
        options = {k[len("model."):]: v for k, v in ablation.set.items() if k.startswith("model.")}
        model = tiny_grace(**options)
        assert torch.isfinite(model(**model.example_inputs(2))["logits"]).all(), ablation
    rows = {(a.table, a.row): a.set for a in ablations}
    assert rows[("Table II", "Baseline")] == {"model.use_text": False, "model.motion": "none"}
    assert rows[("Table III", "Cross-Attention Matching / Sentence-level token")] == \
        {"model.matching": "cross_attention", "model.text_level": "sentence"}
    assert rows[("Table IV", "w/o Top-3 labels guidance")] == {"stages.cate.label_guidance": False}
    assert rows[("Table V", "Spatial + Temporal (Full Model)")] == {}
