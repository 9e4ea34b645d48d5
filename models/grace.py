"""GRACE (Liu et al.): motion-weighted MAE-DFER tokens aligned with CATE caption tokens by entropic OT.

The forward pass is the paper's Eq. 1, y = F(A(M(E_v(V)), P(E_t(D)))):

E_v  MAE-DFER's LGI-Former (layers/lgi_former.py; "VideoMAE pretrained on VoxCeleb2 following MAE-DFER", IV-A3),
     loaded from the public MAE-DFER checkpoints by their own names, or any Hugging Face VideoMAE; visual tokens
     X (B, T', H'W', D). Or tokens cached by the features stage (`--from features`: Hugging Face VideoMAE only).
M    motion-difference weighting (III-C): Delta_t^{h,w} = ||X_t^{h,w} - X_{t-1}^{h,w}||_2 per position (Eq. 2),
     normalised to W (B, T', H'W') and applied as X~ = W . X (Eq. 3). "Normalise" is unspecified: we divide by the
     mean, so W is proportional to the motion, positive and 1 on average (a static clip gets all ones). The first
     segment has no predecessor and takes the change into the second. Table V's variants: "temporal" keeps one
     weight per segment (the mean over positions), "spatial" one per position (the mean over time), "both" the
     full W_t^{h,w}, "none" all ones.
     Salient selection (Sec. VII: "retaining a fixed proportion of top-ranked tokens based on saliency scores"):
     the `keep_tokens` share of visual tokens with the largest W enter the alignment; without motion weighting
     there is no saliency score and every token is kept.
E_t  VideoCLIP's text tower (layers/videoclip_text.py; III-B c and VII: fine-tuned, `finetune_text`), a
     BERT-base; any Hugging Face encoder, or a frozen BERT (`finetune_text=False`), also works.
P    learned text refinement into the shared space (the "text feature enhancement" Eq. 8 guides).
A    token-level entropic OT (III-D): cosine cost C (Eq. 4), plan T* = argmin <T, C> - lambda H(T) over
     Pi(a, b) by Sinkhorn (Eq. 5), a uniform over the real text tokens. Eq. 3's W cannot act through Eq. 4 (a
     cosine is blind to a token's scale), so W is also the visual marginal b (the paper's marginals are
     "typically uniform"; weighting OT by per-sample reliability as in its ref. [41]): a token's plan mass is its
     share of the motion.
F    transport-weighted fusion and key segments (III-D c, Fig. 6): each visual token j is fused with the text
     transported to it (the plan's barycentric projection); its transported affinity r_j = sum_i T*_ij (1 - C_ij
     / 2) is the part of its mass moved at low cost. Segments are ranked by their cumulative r; the top
     `key_frames` frames (key_frames / tubelet segments) are "selected as key temporal segments for
     classification", and within them tokens are pooled with weights r, so "segments with no low-cost match are
     down-weighted". Ranking by plan mass alone would rank by b, i.e. by motion only: with fixed marginals every
     column carries b_j by construction; the affinity is what the text decides.

Losses (III-E, Eq. 9): l1 * weighted focal (Eq. 6) + l2 * supervised contrastive with mixup (Eq. 7) + l3 * the
text branch's CE (Eq. 8). Eq. 7's pair similarity is the plan-weighted token similarity of III-D c, "the aligned
feature pairs (t_i, x_j) weighted by T*_ij are encouraged to be closer for matching pairs and repelled
otherwise": s(v, u) = sum_ij T*_ij(u, v) cos(t_i^u, x_j^v) for every video v and caption u of the batch, T*(u, v)
solved for that pair and held fixed (for the OT value this is its exact gradient, Danskin's theorem).

Ablations (registered below with the paper's rows): `use_text=False` is Table II's vision-only Baseline;
`matching` = "ot" | "cosine" (the same kernel with only the row constraint: a_i b_j K_ij / sum_j b_j K_ij) |
"cross_attention" (learned multi-head attention weights, text queries) (Table III); `text_level` = "token" |
"sentence" (Table III: see below); `motion` (Table V). Table IV and Table II's "+ CATE" are text versions of the
cate stage (`stages.cate.descriptor_phrases`, `stages.cate.label_guidance`; `llm = "template"` with
`label_guidance = false` copies the initial caption, the rows without CATE).

Sentence-level text (Table III): the paper's "sentence-level token" most plausibly means sentence embeddings in
place of word tokens. A caption pooled into ONE vector would make OT meaningless (one row: the plan equals the
visual marginal, i.e. mean pooling), so each sentence of the caption is one text token here (its tokens' mean),
which keeps a real transport problem between sentences and visual tokens.
"""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel, VideoMAEConfig, VideoMAEModel

from affectprep.config import ConfigError

from .figures import displayable, new_figure, prediction_title, write_explanation
from .layers import cosine_cost, sinkhorn
from .layers.lgi_former import MAE_DFER_BASE, LGIFormer, LGIFormerConfig, load_mae_dfer, mae_dfer_config
from .layers.optim import parameter_groups
from .layers.videoclip_text import load_videoclip_text
from .losses import grace_loss
from .registry import Ablation, ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MATCHINGS = ("ot", "cosine", "cross_attention")
TEXT_LEVELS = ("token", "sentence")
MOTIONS = ("both", "spatial", "temporal", "none")

# VideoCLIP's text tower is initialised from (and shaped like) BERT-base uncased, with its tokenizer.
DEFAULT_TEXT_BASE = "bert-base-uncased"

# The tiny LGI-Former: 4 frames of 32 px -> 2 x 2 x 2 tokens in 2 regions; heads = width / 64 (at least 1), the
# rule that reads a checkpoint's head count (see layers/lgi_former.py).
TINY_LGI = LGIFormerConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=1, intermediate_size=64, region_size=(1, 2, 2))
# A tiny Hugging Face VideoMAE (what the features stage caches in the tests).
TINY_VIDEO = dict(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# Positions for a caption of a few dozen words (the tiny tokenizer splits unknown words into letters).
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=256)

# Keeps the L2 norm of Eq. 2 differentiable when nothing moves (a static clip or padding).
_MOTION_EPS = 1e-6
# Elements of the (pairs, L, N) problems solved at once for the batch's pair similarities (bounds the memory).
_PAIR_BUDGET = 1 << 25


def motion_weights(tokens: Tensor, mode: str = "both") -> Tensor:
    """Eqs. 2-3 normalisation: visual tokens (B, T', P, D) -> W (B, T', P), positive, mean 1 per sample.

    Delta_t^p = ||X_t^p - X_{t-1}^p||_2 (Eq. 2), the first segment taking the second's change; "temporal"
    averages it over positions, "spatial" over time; W = Delta / mean(Delta). "none" or one segment: ones.
    """
    if mode not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {mode!r}")
    batch, segments, patches, _ = tokens.shape
    if mode == "none" or segments == 1:
        return tokens.new_ones(batch, segments, patches)
    precise = tokens.to(torch.promote_types(tokens.dtype, torch.float32))   # bfloat16 differences are too coarse
    step = precise[:, 1:] - precise[:, :-1]
    change = torch.sqrt(step.pow(2).sum(-1) + _MOTION_EPS)                          # Eq. 2, (B, T'-1, P)
    change = torch.cat([change[:, :1], change], dim=1)
    if mode == "temporal":
        change = change.mean(dim=2, keepdim=True).expand(-1, -1, patches)
    elif mode == "spatial":
        change = change.mean(dim=1, keepdim=True).expand(-1, segments, -1)
    return (change / change.mean(dim=(1, 2), keepdim=True)).to(tokens.dtype)


def salient_tokens(weights: Tensor, keep: float) -> Tensor:
    """Indices (B, k), ascending, of the round(keep * N) tokens (at least one) with the largest weights (B, N)."""
    k = max(1, round(keep * weights.shape[1]))
    return weights.topk(k, dim=1).indices.sort(dim=1).values


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, L, D) tokens over the real ones (mask (B, L) True) -> (B, D)."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def caption_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of a caption (up to and including . ! or ?)."""
    return [(m.start(), m.end()) for m in re.finditer(r"[^.!?]+[.!?]*", text) if m.group().strip(" .!?\n\t")]


def caption_phrases(text: str) -> list[tuple[int, int, str]]:
    """(start, end, phrase) for each comma-, semicolon- or full-stop-separated phrase of a caption (Fig. 6)."""
    return [(m.start(), m.end(), m.group().strip()) for m in re.finditer(r"[^,;.!?]+", text) if m.group().strip()]


def sentence_groups(texts: list[str], offsets: Tensor) -> Tensor:
    """Sentence index of every token (B, L) from the tokenizer's offsets (B, L, 2); -1 for special tokens and
    padding (empty spans)."""
    groups = torch.full(offsets.shape[:2], -1, dtype=torch.long)
    for b, text in enumerate(texts):
        spans = caption_sentences(text)
        for i, (start, end) in enumerate(offsets[b].tolist()):
            if end > start:
                groups[b, i] = next((s for s, (a, z) in enumerate(spans) if a <= start < z), -1)
    return groups


class _StochasticDepth:
    """Forward hook turning a Hugging Face VideoMAE layer into a residual block dropped per sample (drop path).

    VideoMAE layers keep their residual adds inside; y = x + keep_mask * (layer(x) - x) / keep drops both branches
    of the block together, as stochastic depth drops whole blocks, without renaming any pretrained weight.
    """

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        if not module.training or self.rate == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        keep = 1 - self.rate
        kept = hidden.new_empty(hidden.shape[0], *(1,) * (hidden.dim() - 1)).bernoulli_(keep) / keep
        return hidden + (output - hidden) * kept


class TextRefiner(nn.Module):
    """The text side's learned part P: project encoder tokens into the shared space and refine them per token."""

    def __init__(self, text_dim: int, embed_dim: int):
        super().__init__()
        self.project = nn.Linear(text_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.refine = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))

    def forward(self, tokens: Tensor) -> Tensor:
        projected = self.project(tokens)
        return projected + self.refine(self.norm(projected))


class AttentionMatching(nn.Module):
    """Table III's cross-attention matching: text tokens query the visual tokens; the weights are the per-head
    softmax of q . k / sqrt(d) + log b (b: the visual tokens' motion weights), averaged over the heads."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of attention_heads {heads}")
        self.heads = heads
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, text: Tensor, visual: Tensor, log_b: Tensor) -> Tensor:
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1).transpose(1, 2).float()  # noqa: E731
        q, k = split(self.query(text)), split(self.key(visual))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + log_b[:, None, None]
        return logits.softmax(dim=-1).mean(dim=1)


class Grace(nn.Module):
    """GRACE classifier. Build it with `create_model("grace", ...)`; see the module docstring for the design.

    Either encoder may be absent, for `--from features`: without a video encoder the model takes visual tokens of
    `video_config`'s grid; without a text encoder it takes text tokens of size `text_dim`. use_text=False is the
    vision-only baseline (no text side at all).
    """

    tasks = ("expression",)

    def __init__(self, video_encoder: nn.Module | None, text_encoder: nn.Module | None, *, num_classes: int,
                 video_config: VideoMAEConfig | LGIFormerConfig | None = None, tokenizer=None,
                 max_text_length: int = 512, text_dim: int | None = None, embed_dim: int = 512,
                 use_text: bool = True, matching: str = "ot", text_level: str = "token", motion: str = "both",
                 keep_tokens: float = 0.5, key_frames: int = 8, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 100, finetune_text: bool = True, attention_heads: int = 8,
                 loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0), focal_gamma: float = 2.0,
                 temperature: float = 0.07, mixup_alpha: float = 0.2):
        super().__init__()
        for name, value, allowed in (("matching", matching, MATCHINGS), ("text_level", text_level, TEXT_LEVELS),
                                     ("motion", motion, MOTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 0 < keep_tokens <= 1:
            raise ValueError(f"keep_tokens is the share of visual tokens kept, in (0, 1], got {keep_tokens}")
        if key_frames < 1:
            raise ValueError(f"key_frames must be at least 1, got {key_frames}")
        if video_encoder is None and video_config is None:
            raise ValueError("without a video encoder, video_config (the shape of precomputed tokens) is required")
        if use_text and text_encoder is None and text_dim is None:
            raise ValueError("without a text encoder, text_dim (the size of precomputed text tokens) is required")
        if text_encoder is not None and tokenizer is None:
            raise ValueError("a text encoder needs its tokenizer")
        if use_text and text_encoder is None and text_level == "sentence":
            raise ValueError("text_level='sentence' needs the captions' own tokens (their sentence spans), which "
                             "cached text features do not keep: train --from frames, or use text_level='token'")
        self.video_encoder = video_encoder
        self.video_config = video_encoder.config if video_encoder is not None else video_config
        self.use_text = use_text
        self.tokenizer, self.max_text_length = tokenizer, max_text_length
        self.loss_options = dict(lambdas=tuple(loss_weights), gamma=focal_gamma, temperature=temperature,
                                 mixup_alpha=mixup_alpha)
        self.text_encoder = text_encoder if use_text else None
        self.finetune_text = finetune_text
        if self.text_encoder is not None and not finetune_text:
            self.text_encoder.requires_grad_(False)
        self.matching, self.text_level, self.motion = matching, text_level, motion
        self.keep_tokens, self.key_frames = keep_tokens, key_frames
        self.epsilon, self.sinkhorn_iterations = epsilon, sinkhorn_iterations
        self.num_classes = num_classes

        video = self.video_config
        self.video_dim = video.hidden_size
        self.token_grid = (video.num_frames // video.tubelet_size, (video.image_size // video.patch_size) ** 2)
        self.inputs = ModelInputs(frames=video.num_frames, image_size=video.image_size,
                                  text="caption" if use_text else None)
        # Key frames in frames (Fig. 6 marks 8 of 16), selected as whole tubelets (segments).
        self.key_segments = min(self.token_grid[0], math.ceil(key_frames / video.tubelet_size))

        self.visual_norm = nn.LayerNorm(self.video_dim)
        self.visual_proj = nn.Linear(self.video_dim, embed_dim)
        self.head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        if use_text:
            self.text_dim = text_dim if text_encoder is None else text_encoder.config.hidden_size
            self.text_refiner = TextRefiner(self.text_dim, embed_dim)
            if matching == "cross_attention":
                self.cross_attention = AttentionMatching(embed_dim, attention_heads)
            self.fuse = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU())
            self.text_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))

    def train(self, mode: bool = True) -> "Grace":
        super().train(mode)
        if self.text_encoder is not None and not self.finetune_text:
            self.text_encoder.eval()   # a frozen encoder keeps its dropout off
        return self

    # ----- encoders -------------------------------------------------------------------------------------------

    def encode_video(self, frames: Tensor) -> Tensor:
        """Frames (B, T, 3, H, W), normalised as the encoder expects -> visual tokens X (B, T', H'*W', D) (E_v)."""
        if self.video_encoder is None:
            raise ValueError("this GRACE model has no video encoder: pass precomputed visual_tokens")
        config = self.video_config
        expected = (config.num_frames, config.num_channels, config.image_size, config.image_size)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"GRACE expects frames of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")
        out = self.video_encoder(pixel_values=frames)
        tokens = getattr(out, "last_hidden_state", out)
        return tokens.reshape(frames.shape[0], *self.token_grid, self.video_dim)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) -> text token embeddings (B, L, Dt) (E_t) and the mask of real tokens (B, L)."""
        if self.text_encoder is None:
            raise ValueError("this GRACE model has no text encoder: pass precomputed text_tokens and text_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_text):
            tokens = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, attention_mask.bool()

    # ----- forward --------------------------------------------------------------------------------------------

    def forward(self, frames: Tensor | None = None, *, visual_tokens: Tensor | None = None,
                input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                text_tokens: Tensor | None = None, text_mask: Tensor | None = None,
                text_groups: Tensor | None = None) -> dict[str, Tensor]:
        """Either `frames` or `visual_tokens`; with text, either `input_ids` (+ `attention_mask`) or `text_tokens`
        (+ `text_mask`), and for text_level="sentence" `text_groups` (B, L): each token's sentence, -1 for none.

        Returns logits (B, C); embedding (B, E), the pooled feature the classifier reads; motion_weights W
        (B, T', H'W'). With text also: text_logits (B, C) (Eq. 8); plan (B, L, N), T* over all N = T'H'W' visual
        tokens (zero on those not kept); kept (B, N) bool, the salient tokens; segment_scores (B, T'), the
        cumulative transported affinity, and key_segments (B, T') bool; text_embedding (B, E); text_mask (B, L)
        of the text side (sentences at sentence level); and what the contrastive loss re-aligns: shared_text
        (B, L, E), shared_visual (B, k, E) and visual_marginal (B, k), the kept tokens and their weights b.
        """
        visual = self._visual_tokens(frames, visual_tokens)
        weights = motion_weights(visual, self.motion)                                   # (B, T', P)
        shared = self.visual_proj(self.visual_norm(visual) * weights[..., None]).flatten(1, 2)   # Eq. 3, (B, N, E)
        if not self.use_text:                                                           # Table II's Baseline
            embedding = shared.mean(dim=1)
            return {"logits": self.head(embedding), "embedding": embedding, "motion_weights": weights}

        text, mask = self._text_tokens(input_ids, attention_mask, text_tokens, text_mask)
        if visual.shape[0] != text.shape[0]:
            raise ValueError(f"batch sizes differ: {visual.shape[0]} videos but {text.shape[0]} texts")
        text = self.text_refiner(text)                                                  # P, (B, L, E)
        text_embedding = masked_mean(text, mask)
        if self.text_level == "sentence":
            text, mask = self._sentences(text, text_groups)

        batch, tokens = shared.shape[:2]
        flat_weights = weights.flatten(1).float()
        kept = (salient_tokens(flat_weights, self.keep_tokens) if self.motion != "none" else
                torch.arange(tokens, device=shared.device).expand(batch, -1))           # (B, k)
        salient = shared.gather(1, kept[..., None].expand(-1, -1, shared.shape[-1]))    # (B, k, E)
        marginal = flat_weights.gather(1, kept)                                         # b, (B, k)

        cost = cosine_cost(text, salient)                                               # Eq. 4, (B, L, k)
        plan = self._plan(text, mask, salient, marginal, cost)                          # Eq. 5
        mass = plan.sum(dim=1)                                                          # (B, k)
        affinity = (plan * (1 - cost / 2)).sum(dim=1)                                   # r_j, (B, k)
        segment_of = kept // self.token_grid[1]
        scores = affinity.new_zeros(batch, self.token_grid[0]).scatter_add(1, segment_of, affinity)
        key = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, scores.topk(self.key_segments, dim=1).indices, True)

        transported = torch.bmm(plan.transpose(1, 2), text.float())                    # sum_i T*_ij t_i
        transported = (transported / mass.clamp_min(1e-12)[..., None]).to(text.dtype)
        fused = self.fuse(torch.cat([salient, transported], dim=-1))                    # (B, k, E)
        pool = affinity * key.gather(1, segment_of)
        embedding = (fused * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp_min(1e-12)

        full_plan = plan.new_zeros(batch, plan.shape[1], tokens).scatter(
            2, kept[:, None].expand(-1, plan.shape[1], -1), plan)
        kept_mask = torch.zeros(batch, tokens, dtype=torch.bool, device=kept.device).scatter(1, kept, True)
        return {"logits": self.head(embedding), "embedding": embedding, "text_logits": self.text_head(text_embedding),
                "plan": full_plan, "kept": kept_mask, "motion_weights": weights, "segment_scores": scores,
                "key_segments": key, "text_embedding": text_embedding, "text_mask": mask,
                "shared_text": text, "shared_visual": salient, "visual_marginal": marginal}

    def _visual_tokens(self, frames: Tensor | None, visual_tokens: Tensor | None) -> Tensor:
        if (frames is None) == (visual_tokens is None):
            raise ValueError("pass exactly one of frames or visual_tokens")
        if frames is not None:
            return self.encode_video(frames)
        if visual_tokens.dim() != 4 or tuple(visual_tokens.shape[1:]) != (*self.token_grid, self.video_dim):
            raise ValueError(f"visual_tokens must have shape (B, {self.token_grid[0]}, {self.token_grid[1]}, "
                             f"{self.video_dim}), got {tuple(visual_tokens.shape)}")
        return visual_tokens

    def _text_tokens(self, input_ids: Tensor | None, attention_mask: Tensor | None, text_tokens: Tensor | None,
                     text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if (input_ids is None) == (text_tokens is None):
            raise ValueError("pass exactly one of input_ids or text_tokens")
        if input_ids is not None:
            tokens, mask = self.encode_text(input_ids, attention_mask)
        else:
            if text_tokens.dim() != 3 or text_tokens.shape[-1] != self.text_dim:
                raise ValueError(f"text_tokens must have shape (B, L, {self.text_dim}), got {tuple(text_tokens.shape)}")
            tokens = text_tokens
            mask = (torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=text_tokens.device)
                    if text_mask is None else text_mask.bool())
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"text_mask must have shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
        _check_not_empty(mask, "text tokens")
        return tokens, mask

    def _sentences(self, text: Tensor, groups: Tensor | None) -> tuple[Tensor, Tensor]:
        """Token features (B, L, E) -> one per sentence, the mean of its tokens (B, S, E), and their mask (B, S)."""
        if groups is None or groups.shape != text.shape[:2]:
            raise ValueError(f"text_level='sentence' needs text_groups of shape {tuple(text.shape[:2])} (each "
                             f"token's sentence), got {None if groups is None else tuple(groups.shape)}")
        count = int(groups.max().item()) + 1 if groups.numel() else 0
        member = torch.nn.functional.one_hot((groups + 1).clamp_min(0), count + 1)[..., 1:].to(text.dtype)
        sizes = member.sum(dim=1)                                                     # (B, S)
        sentences = torch.einsum("bls,ble->bse", member, text) / sizes.clamp_min(1)[..., None]
        mask = sizes > 0
        _check_not_empty(mask, "sentences")
        return sentences, mask

    def _plan(self, text: Tensor, mask: Tensor, visual: Tensor, marginal: Tensor, cost: Tensor) -> Tensor:
        """Alignment (B, L, k) between text tokens (mask (B, L)) and kept visual tokens with weights b (B, k): each
        real text token's row carries 1/L of the mass. OT: Sinkhorn with marginals (a uniform, b) (Eq. 5)."""
        if self.matching == "ot":
            return sinkhorn(cost, b=marginal, epsilon=self.epsilon, iterations=self.sinkhorn_iterations, mask_a=mask)
        row_mass = mask.float() / mask.sum(dim=1, keepdim=True)
        log_b = torch.log(marginal / marginal.sum(dim=1, keepdim=True))
        if self.matching == "cosine":
            weights = (-cost / self.epsilon + log_b[:, None]).softmax(dim=-1)
        else:
            weights = self.cross_attention(text, visual, log_b)
        return weights * row_mass[..., None]

    def pair_similarity(self, outputs: dict[str, Tensor]) -> Tensor:
        """s(v, u) (B videos x B captions): the plan-weighted token similarity sum_ij T*_ij cos(t_i^u, x_j^v) of
        III-D c, each pair's plan solved with this model's matching and held fixed; gradients flow through the
        cosines. Chunks of videos bound the memory."""
        text, mask = outputs["shared_text"], outputs["text_mask"]
        visual, marginal = outputs["shared_visual"], outputs["visual_marginal"]
        batch, length, kept = text.shape[0], text.shape[1], visual.shape[1]
        chunk = max(1, _PAIR_BUDGET // max(1, batch * length * kept))
        rows = []
        for start in range(0, batch, chunk):
            videos = min(chunk, batch - start)
            pair_visual = visual[start:start + videos].repeat_interleave(batch, dim=0)
            pair_text, pair_mask = text.repeat(videos, 1, 1), mask.repeat(videos, 1)
            cost = cosine_cost(pair_text, pair_visual)
            with torch.no_grad():
                plan = self._plan(pair_text, pair_mask, pair_visual,
                                  marginal[start:start + videos].repeat_interleave(batch, dim=0), cost)
            rows.append((plan * (1 - cost)).sum(dim=(1, 2)).reshape(videos, batch))
        return torch.cat(rows)

    # ----- training -------------------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        """A collated batch -> forward kwargs: frames or cached visual tokens; the captions tokenised (with their
        sentence spans at sentence level), or cached text tokens."""
        device = next(self.parameters()).device
        inputs = ({"visual_tokens": batch["visual_tokens"]} if "visual_tokens" in batch
                  else {"frames": batch["frames"]})
        if self.use_text and "text_tokens" in batch:
            inputs.update(text_tokens=batch["text_tokens"], text_mask=batch["text_mask"])
        elif self.use_text:
            texts = list(batch["texts"])
            sentence = self.text_level == "sentence"
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_length,
                                     return_tensors="pt", return_offsets_mapping=sentence)
            inputs.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
            if sentence:
                inputs["text_groups"] = sentence_groups(texts, encoded["offset_mapping"])
        return {name: value.to(device) for name, value in inputs.items()}

    def loss(self, outputs: dict[str, dict], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Eq. 9: l1 * weighted focal + l2 * supervised contrastive (plan-weighted pairs, mixup) + l3 * text CE."""
        out = outputs["expression"]
        labels = batches["expression"]["labels"].to(out["logits"].device)
        similarity = self.pair_similarity(out) if self.use_text else None
        total, parts = grace_loss(out, similarity, labels, class_weights, **self.loss_options)
        return {"loss": total, **parts}

    # ----- explanation (Fig. 6) -------------------------------------------------------------------------------

    def explain(self, batch: dict, outputs: dict[str, Tensor], out_dir: Path, label_names: list[str]) -> list[Path]:
        """Fig. 6 for the first sample: the plan aggregated to caption phrases x frames, as a PNG and a JSON.

        Phrases are the caption's comma / full-stop separated spans, each the BERT tokens whose character offsets
        fall inside it (at sentence level, the sentences the model aligned); a frame gets its tubelet's mass split
        evenly over the frames the tubelet covers. Each phrase has a colour: its row in the stacked bars and a box
        on its best frame. The key frames, those of the segments the classifier read (ranked by cumulative
        transported affinity), are marked with a diamond. Frames are labelled by their source frame numbers
        (`frame_indices` of the faces store) when the batch carries them.
        """
        if not self.use_text:
            raise ValueError("the vision-only baseline aligns no text: there is no transport plan to draw")
        if self.tokenizer is None:
            raise ValueError("explaining needs the text encoder's tokenizer; this model reads cached text tokens")
        text, sample = batch["texts"][0], batch["sample_ids"][0]
        tubelet = self.video_config.tubelet_size
        segments, patches = self.token_grid
        plan = outputs["plan"][0].float().cpu()                                         # (L, N)
        per_frame = plan.reshape(plan.shape[0], segments, patches).sum(-1).repeat_interleave(tubelet, 1) / tubelet
        if self.text_level == "sentence":
            names = [text[a:b].strip() for a, b in caption_sentences(text)][: per_frame.shape[0]]
            matrix = per_frame[: len(names)]
        else:
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_text_length,
                                     return_offsets_mapping=True)
            phrases = caption_phrases(text)
            owner = [_phrase_of(start, end, phrases) for start, end in encoded["offset_mapping"]]
            used = sorted({o for o in owner if o is not None})
            matrix = torch.stack([per_frame[[i for i, o in enumerate(owner) if o == p]].sum(0) for p in used])
            names = [phrases[p][2] for p in used]
        frames = segments * tubelet
        numbers = (batch["frame_indices"][0].tolist() if "frame_indices" in batch else list(range(frames)))
        scores = outputs["segment_scores"][0].float().cpu().repeat_interleave(tubelet) / tubelet
        key = outputs["key_segments"][0].cpu().repeat_interleave(tubelet).tolist()
        best = matrix.argmax(dim=1).tolist()
        probabilities = outputs["logits"][0].float().softmax(-1).cpu()
        title = prediction_title(sample, probabilities, label_names, int(batch["labels"][0]))
        clip = batch["frames"][0] if "frames" in batch else None
        figure = _plot_transport(matrix.numpy(), names, best, key, numbers, title, clip, self.inputs)
        return write_explanation(figure, {
            "text": text, "phrases": names, "colors": _colours(len(names)),
            "frame_indices": numbers, "mass": matrix.tolist(), "frame_mass": matrix.sum(0).tolist(),
            "frame_scores": scores.tolist(), "key_frames": [n for n, k in zip(numbers, key) if k],
            "best_frame": {name: numbers[b] for name, b in zip(names, best)},
            "predicted": label_names[int(probabilities.argmax())]}, out_dir, "transport", sample)

    # ----- optimisation ---------------------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict]:
        """AdamW parameter groups with layer-wise lr decay over the encoders' layers (MAE-DFER's rule).

        Embeddings sit at depth 0, layer i at depth i + 1, everything else (the heads, the LGI-Former's region
        tokens) at depth + 1 with the full lr; each group's lr is lr * layer_decay ** (depth + 1 - its depth).
        Biases, norm weights (1-D tensors) and the region tokens get no weight decay (MAE-DFER's skip list).
        Frozen parameters are left out.
        """
        def scale(name: str) -> float:
            layer, depth = self._layer_position(name)
            return layer_decay ** (depth + 1 - layer)

        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay, lr_scale_of=scale,
                                no_decay=lambda name, p: name.endswith("lg_region_tokens"))

    def _layer_position(self, name: str) -> tuple[int, int]:
        """(layer depth, encoder depth) of a parameter; parameters outside both encoders rank as the head."""
        depth = self.video_config.num_hidden_layers
        for prefix, encoder in (("video_encoder.", self.video_encoder), ("text_encoder.", self.text_encoder)):
            if encoder is None or not name.startswith(prefix):
                continue
            depth = encoder.config.num_hidden_layers
            inner = name[len(prefix):]
            if inner.startswith(("embeddings.", "patch_embed.")):
                return 0, depth
            for layers in ("encoder.layer.", "blocks."):
                if inner.startswith(layers):
                    return int(inner[len(layers):].split(".")[0]) + 1, depth
            return depth + 1, depth
        return depth + 1, depth

    # ----- registry convention --------------------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random inputs of the right shapes: frames, and token ids (or text tokens) with the last sample padded;
        at sentence level two sentences per caption."""
        config = self.video_config
        device = next(self.parameters()).device
        if self.video_encoder is None:
            visual = {"visual_tokens": torch.randn(batch_size, *self.token_grid, self.video_dim,
                                                   generator=generator).to(device)}
        else:
            visual = {"frames": torch.randn(batch_size, config.num_frames, config.num_channels, config.image_size,
                                            config.image_size, generator=generator).to(device)}
        if not self.use_text:
            return visual
        length = 6
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[-1, length // 2:] = 0
        if self.text_encoder is None:
            text = {"text_tokens": torch.randn(batch_size, length, self.text_dim, generator=generator).to(device),
                    "text_mask": mask.bool().to(device)}
        else:
            ids = torch.randint(0, self.text_encoder.config.vocab_size, (batch_size, length), generator=generator)
            text = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.text_level == "sentence":
            groups = torch.tensor([-1, 0, 0, 1, 1, -1]).repeat(batch_size, 1)
            groups[-1, length // 2 - 1:] = -1
            text["text_groups"] = groups.to(device)
        return {**visual, **text}


def _check_not_empty(mask: Tensor, what: str) -> None:
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"samples {torch.nonzero(empty).flatten().tolist()} have no {what}")


def _phrase_of(start: int, end: int, phrases: list[tuple[int, int, str]]) -> int | None:
    if start == end:   # special tokens ([CLS], [SEP]) cover no text
        return None
    return next((i for i, (a, b, _) in enumerate(phrases) if a <= start < b), None)


def _colours(count: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [to_hex(palette(i % palette.N)) for i in range(count)]


def _plot_transport(matrix: np.ndarray, phrases: list[str], best: list[int], key: list[bool], numbers: list[int],
                    title: str, frames: Tensor | None, inputs: ModelInputs) -> "Figure":
    """Fig. 6: the clip's frames (a box in each phrase's colour on its best frame, a diamond on the key frames)
    above the stacked bars of each frame's transport mass, one colour per phrase."""
    from matplotlib.patches import Rectangle

    rows, columns = matrix.shape
    colours = _colours(rows)
    figure = new_figure(2.5 + 0.7 * columns, 4.0 + 0.22 * rows)
    grid = figure.add_gridspec(2, 1, height_ratios=[1.0, 2.2], hspace=0.25)
    labels = [f"{n}\u25c6" if k else str(n) for n, k in zip(numbers, key)]
    if frames is not None:
        strip = figure.add_subplot(grid[0])
        images = displayable(frames, inputs.mean, inputs.std)
        strip.imshow(np.concatenate(list(images), axis=1), aspect="auto")
        width, height = images.shape[2], images.shape[1]
        for row, frame in enumerate(best):
            inset = 1 + 2 * (row % 3)   # phrases sharing a best frame get nested boxes
            strip.add_patch(Rectangle((frame * width + inset, inset), width - 2 * inset, height - 2 * inset,
                                      fill=False, color=colours[row], linewidth=2))
        strip.set_xticks([(t + 0.5) * width for t in range(columns)], labels, fontsize=7)
        strip.set_yticks([])
        strip.set_title(title, fontsize=9)
    bars = figure.add_subplot(grid[1])
    bottom = np.zeros(columns)
    for row in range(rows):
        bars.bar(range(columns), matrix[row], bottom=bottom, color=colours[row],
                 label=textwrap.shorten(phrases[row], 45))
        bottom += matrix[row]
    bars.set_xticks(range(columns), labels, fontsize=7)
    bars.set_xlabel("source frame (\u25c6 = key frame used for classification)")
    bars.set_ylabel("transport mass")
    bars.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


# ---- building -----------------------------------------------------------------------------------------------------

def _video_encoder(spec: str | None, tiny: bool, config_only: bool,
                   drop_path_rate: float) -> tuple[nn.Module | None, VideoMAEConfig | LGIFormerConfig]:
    """(encoder or None, its config) for model.video_encoder: None (a random LGI-Former: MAE-DFER's base, or the
    tiny one), a MAE-DFER checkpoint file, or a Hugging Face VideoMAE folder / hub id."""
    if spec is None:
        config = TINY_LGI if tiny else MAE_DFER_BASE
        return (None if config_only else LGIFormer(config, drop_path_rate)), config
    if Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        if config_only:
            return None, mae_dfer_config(path)
        encoder, _ = load_mae_dfer(path, drop_path_rate)
        return encoder, encoder.config
    try:
        config = VideoMAEConfig.from_pretrained(spec)
        encoder = None if config_only else VideoMAEModel.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.video_encoder '{spec}' is neither a MAE-DFER checkpoint file nor a Hugging Face "
                          f"VideoMAE folder or cached hub id ({str(e).splitlines()[0]})") from None
    if encoder is not None:
        depth = config.num_hidden_layers
        for index, layer in enumerate(encoder.encoder.layer):
            # Linearly rising drop rates over depth, as in timm / MAE-DFER.
            layer.register_forward_hook(_StochasticDepth(drop_path_rate * index / max(depth - 1, 1)),
                                        with_kwargs=True)
    return encoder, config


def _text_encoder(spec: str | None, base: str, tiny: bool) -> tuple[nn.Module, object]:
    """(encoder, tokenizer) for model.text_encoder: None (BERT `base`, VideoCLIP's initialisation; tiny: a random
    tiny BERT), a VideoCLIP checkpoint file (its text tower, shaped like `base`), or a Hugging Face folder / id."""
    if spec is None and tiny:
        return BertModel(BertConfig(**TINY_TEXT), add_pooling_layer=False), tiny_tokenizer()
    if spec is not None and Path(spec).expanduser().is_file():
        encoder, tokenizer, _ = load_videoclip_text(Path(spec).expanduser(), base)
        return encoder, tokenizer
    name = spec or base
    try:
        encoder, tokenizer = AutoModel.from_pretrained(name), load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text_encoder '{name}' is neither a VideoCLIP checkpoint file nor a Hugging Face "
                          f"folder or cached hub id ({str(e).splitlines()[0]})") from None
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None   # GRACE reads the token states; an unused pooler would get no gradient
    return encoder, tokenizer


def _ablations() -> list[Ablation]:
    """Every row of the paper's ablation tables as the options that reproduce it ({} = the full model)."""
    without_cate = {"stages.cate.llm": "template", "stages.cate.label_guidance": False}   # the initial caption
    no_motion = {"model.motion": "none"}
    rows = [Ablation("Table II", "Baseline", {"model.use_text": False, **no_motion}),
            Ablation("Table II", "Baseline + OT Alignment", {**no_motion, **without_cate}),
            Ablation("Table II", "Baseline + OT + CATE", no_motion),
            Ablation("Table II", "Baseline + OT + Visual Enhancement", without_cate),
            Ablation("Table II", "Full Model (GRACE)", {})]
    # Table I's GRACE rows are Table II's from OT on (*: OT, dagger: + CATE, double dagger: + MotionDiff), per dataset.
    marks = ("GRACE*", "GRACE*\u2020", "GRACE*\u2021", "GRACE*\u2020\u2021")
    rows += [Ablation("Table I", name, row.set) for name, row in zip(marks, rows[1:])]
    for matching, label in (("cosine", "Cosine Similarity Matching"), ("cross_attention", "Cross-Attention Matching"),
                            ("ot", "OT Alignment (Full Model)")):
        for level, text in (("sentence", "Sentence-level token"), ("token", "Fine-grained token")):
            options = {**({"model.matching": matching} if matching != "ot" else {}),
                       **({"model.text_level": level} if level != "token" else {})}
            rows.append(Ablation("Table III", f"{label} / {text}", options))
    rows += [Ablation("Table IV", "w/o emotion-descriptor phrase", {"stages.cate.descriptor_phrases": False}),
             Ablation("Table IV", "w/o Top-3 labels guidance", {"stages.cate.label_guidance": False}),
             Ablation("Table IV", "Full Model", {})]
    rows += [Ablation("Table V", "w/o Motion Difference Module", no_motion),
             Ablation("Table V", "Spatial Difference Only", {"model.motion": "spatial"}),
             Ablation("Table V", "Temporal Difference Only", {"model.motion": "temporal"}),
             Ablation("Table V", "Spatial + Temporal (Full Model)", {})]
    return rows


@register_model("grace", ablations=_ablations(), needs=("video_features", "layer_decay"))
def grace(tiny: bool = False, *, num_classes: int = 7, video_encoder: str | None = None,
          text_encoder: str | None = None, text_base: str = DEFAULT_TEXT_BASE, use_text: bool = True,
          video_features: bool = False, text_features: bool = False, text_dim: int = 768,
          embed_dim: int | None = None, drop_path_rate: float = 0.1, **options) -> Grace:
    """GRACE on MAE-DFER's LGI-Former, or the tiny variant (32 px, 4 frames, width 32, random tiny BERT).

    video_encoder: a MAE-DFER checkpoint file (the VoxCeleb2 pre-training release or a fine-tuned one, loaded by
    its own parameter names), or a Hugging Face VideoMAE folder / hub id; None keeps a random LGI-Former.
    text_encoder: a VideoCLIP checkpoint file (checkpoint_best.pt: its text tower, shaped like text_base), or a
    Hugging Face encoder folder / hub id; None gives text_base itself (BERT-base uncased, VideoCLIP's
    initialisation; tiny: a random tiny BERT with a word tokenizer). text_base: the BERT a VideoCLIP checkpoint's
    text tower was initialised from (its config and tokenizer). finetune_text (default True, the paper's setting)
    trains the text encoder with the rest; False freezes it. use_text=False: Table II's vision-only baseline.
    video_features / text_features=True build no video / text encoder: the model then takes the features stage's
    cached tokens (Hugging Face VideoMAE only; `video_encoder` is read for its config) / text tokens of size
    text_dim. Further options go to `Grace` (matching, text_level, motion, keep_tokens, key_frames, epsilon,
    sinkhorn_iterations, finetune_text, attention_heads, loss_weights, focal_gamma, temperature, mixup_alpha,
    max_text_length).
    """
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
    encoder, video_config = _video_encoder(video_encoder, tiny, video_features, drop_path_rate)
    text_model, tokenizer = None, None
    if use_text and not text_features:
        text_model, tokenizer = _text_encoder(text_encoder, text_base, tiny)
    if tiny:
        options.setdefault("attention_heads", 2)
        options.setdefault("max_text_length", TINY_TEXT["max_position_embeddings"])
        options.setdefault("key_frames", 2)
    return Grace(encoder, text_model, num_classes=num_classes, video_config=video_config, tokenizer=tokenizer,
                 text_dim=text_dim, embed_dim=embed_dim or (16 if tiny else 512), use_text=use_text, **options)
