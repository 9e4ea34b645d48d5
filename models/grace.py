"""GRACE (Liu et al.): motion-weighted VideoMAE tokens aligned with CATE caption tokens by entropic OT.

Forward pass, as in the paper's Eq. 1:
  E_v  VideoMAE encoder -> visual tokens X (B, T', H'W', D); or precomputed tokens (`--from features`).
  M    motion-difference weighting: Delta_t = ||X_t - X_{t-1}||_2 per position (Eq. 2), turned into temporal weights
       (one per segment) and spatial weights (one per patch), each a softmax over the standardised scores scaled
       to mean 1, multiplied into X (Eq. 3). The paper only says "normalised"; softmax keeps every weight positive
       and differentiable, and standardising first makes it independent of the feature scale.
  E_t  text encoder over the caption (the paper uses VideoCLIP's text encoder, a BERT-base; any Hugging Face
       encoder with `last_hidden_state` works, frozen by default), or precomputed text token embeddings.
  P    learned text refinement into the shared space (the "text feature enhancement" the auxiliary loss guides).
  A    token-level entropic OT between text tokens and visual tokens: cosine cost (Eq. 4), uniform marginals over
       the real tokens (Eq. 5), solved by Sinkhorn.
  F    transport-weighted fusion: each text token gathers the visual tokens it transports to (barycentric
       projection of the plan), is fused with them, and the fused tokens are pooled into the classifier.

Ablations (Tables II, III, V): `matching` = "ot" | "cosine" (row softmax of the same kernel, no column
constraint) | "cross_attention" (learned multi-head attention, text queries); `text_level` = "token" |
"sentence" (the caption pooled into one token); `motion` = "both" | "spatial" | "temporal" | "none". CATE versus
template text (Table IV) is a data choice: feed the CATE caption or the template "an emotion of [class]".

Note: the cosine cost is blind to a token's scale, so the motion weights shape the plan only through the biased
projection into the shared space; they act fully on the fused features the classifier reads.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel, VideoMAEConfig, VideoMAEModel

from .layers import cosine_cost, sinkhorn
from .layers.optim import parameter_groups
from .losses import grace_loss
from .registry import ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer

MATCHINGS = ("ot", "cosine", "cross_attention")
TEXT_LEVELS = ("token", "sentence")
MOTIONS = ("both", "spatial", "temporal", "none")

# The paper's text encoder is VideoCLIP's, itself initialised from BERT-base uncased.
DEFAULT_TEXT_ENCODER = "bert-base-uncased"

# VideoMAE-base as in MAE-DFER: 16 frames of 224 px, 16 px patches, tubelets of 2 -> 8 x 14 x 14 = 1568 tokens.
BASE_VIDEO = dict(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=768,
                  num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY_VIDEO = dict(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# Positions for a character-level caption of a few dozen words (the tiny tokenizer splits words into letters).
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=48, max_position_embeddings=256)

# Keeps the standardisation and the L2 norm differentiable when nothing moves (a static clip or padding).
_MOTION_EPS = 1e-6


def motion_weights(tokens: Tensor, mode: str = "both") -> Tensor:
    """Motion-difference weights for visual tokens (B, T', N, D) -> (B, T', N), positive, mean 1 per axis used.

    "temporal": one weight per segment from the mean change of its patches; "spatial": one weight per patch from
    its mean change over time; "both": their product; "none": all ones. The first segment has no predecessor and
    takes the change into the second, so it is not suppressed for being first. A clip with no motion gets ones.
    """
    if mode not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {mode!r}")
    batch, segments, patches, _ = tokens.shape
    ones = tokens.new_ones(batch, segments, patches)
    if mode == "none" or segments == 1:
        return ones
    step = tokens[:, 1:] - tokens[:, :-1]
    change = torch.sqrt(step.pow(2).sum(-1) + _MOTION_EPS)                    # Eq. 2, (B, T'-1, N)
    change = torch.cat([change[:, :1], change], dim=1)
    weights = ones
    if mode in ("temporal", "both"):
        weights = weights * _mean_one_softmax(change.mean(dim=2))[:, :, None]
    if mode in ("spatial", "both"):
        weights = weights * _mean_one_softmax(change.mean(dim=1))[:, None, :]
    return weights


def _mean_one_softmax(scores: Tensor) -> Tensor:
    standardised = (scores - scores.mean(-1, keepdim=True)) / torch.sqrt(scores.var(-1, keepdim=True,
                                                                                    unbiased=False) + _MOTION_EPS)
    return standardised.softmax(dim=-1) * scores.shape[-1]


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, L, D) tokens over the real ones (mask (B, L) True) -> (B, D)."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class _StochasticDepth:
    """Forward hook turning a VideoMAE layer into a residual block dropped per sample (drop path) in training.

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
    """The text side's learned part: project encoder tokens into the shared space and refine them per token."""

    def __init__(self, text_dim: int, embed_dim: int):
        super().__init__()
        self.project = nn.Linear(text_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.refine = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))

    def forward(self, tokens: Tensor) -> Tensor:
        projected = self.project(tokens)
        return projected + self.refine(self.norm(projected))


class Grace(nn.Module):
    """GRACE classifier. Build it with `create_model("grace", ...)`; see the module docstring for the design.

    Either encoder may be absent, for `--from features`: without a video encoder the model takes VideoMAE tokens
    of `video_config`'s shape; without a text encoder it takes text tokens of size `text_dim`.
    """

    tasks = ("expression",)

    def __init__(self, video_encoder: VideoMAEModel | None, text_encoder: nn.Module | None, *, num_classes: int,
                 video_config: VideoMAEConfig | None = None, tokenizer=None, max_text_length: int = 512,
                 text_dim: int | None = None, embed_dim: int = 512, matching: str = "ot",
                 text_level: str = "token", motion: str = "both", epsilon: float = 0.05,
                 sinkhorn_iterations: int = 100, drop_path_rate: float = 0.1, freeze_text_encoder: bool = True,
                 attention_heads: int = 8, loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 focal_gamma: float = 2.0, temperature: float = 0.07, mixup_alpha: float = 0.2):
        super().__init__()
        for name, value, allowed in (("matching", matching, MATCHINGS), ("text_level", text_level, TEXT_LEVELS),
                                     ("motion", motion, MOTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if text_encoder is None and text_dim is None:
            raise ValueError("without a text encoder, text_dim (the size of precomputed text tokens) is required")
        if text_encoder is not None and tokenizer is None:
            raise ValueError("a text encoder needs its tokenizer")
        if video_encoder is None and video_config is None:
            raise ValueError("without a video encoder, video_config (the shape of precomputed tokens) is required")
        self.video_encoder = video_encoder
        self.video_config = video_encoder.config if video_encoder is not None else video_config
        self.tokenizer, self.max_text_length = tokenizer, max_text_length
        self.loss_options = dict(lambdas=tuple(loss_weights), gamma=focal_gamma, temperature=temperature,
                                 mixup_alpha=mixup_alpha)
        self.text_encoder = text_encoder
        self.freeze_text_encoder = freeze_text_encoder and text_encoder is not None
        if self.freeze_text_encoder:
            text_encoder.requires_grad_(False)
        self.matching, self.text_level, self.motion = matching, text_level, motion
        self.epsilon, self.sinkhorn_iterations = epsilon, sinkhorn_iterations
        self.num_classes = num_classes

        video = self.video_config
        self.video_dim = video.hidden_size
        self.text_dim = text_dim if text_encoder is None else text_encoder.config.hidden_size
        self.token_grid = (video.num_frames // video.tubelet_size, (video.image_size // video.patch_size) ** 2)
        self.inputs = ModelInputs(frames=video.num_frames, image_size=video.image_size, text="caption")
        depth = video.num_hidden_layers
        for index, layer in enumerate(video_encoder.encoder.layer if video_encoder is not None else []):
            # Linearly rising drop rates over depth, as in timm / MAE-DFER.
            rate = drop_path_rate * index / max(depth - 1, 1)
            layer.register_forward_hook(_StochasticDepth(rate), with_kwargs=True)

        self.visual_norm = nn.LayerNorm(self.video_dim)
        self.visual_proj = nn.Linear(self.video_dim, embed_dim)
        self.text_refiner = TextRefiner(self.text_dim, embed_dim)
        if matching == "cross_attention":
            self.cross_attention = nn.MultiheadAttention(embed_dim, attention_heads, batch_first=True)
        self.fuse = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU())
        self.head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        self.text_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))

    def train(self, mode: bool = True) -> "Grace":
        super().train(mode)
        if self.freeze_text_encoder:
            self.text_encoder.eval()   # a frozen encoder keeps its dropout off
        return self

    # ----- encoders -------------------------------------------------------------------------------------------

    def encode_video(self, frames: Tensor) -> Tensor:
        """Frames (B, T, 3, H, W), normalised as VideoMAE expects -> visual tokens (B, T', H'*W', D)."""
        if self.video_encoder is None:
            raise ValueError("this GRACE model has no video encoder: pass precomputed visual_tokens")
        config = self.video_config
        expected = (config.num_frames, config.num_channels, config.image_size, config.image_size)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"GRACE expects frames of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")
        tokens = self.video_encoder(pixel_values=frames).last_hidden_state
        return tokens.reshape(frames.shape[0], *self.token_grid, self.video_dim)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) -> text token embeddings (B, L, Dt) and the mask of real tokens (B, L)."""
        if self.text_encoder is None:
            raise ValueError("this GRACE model has no text encoder: pass precomputed text_tokens and text_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_text_encoder):
            tokens = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, attention_mask.bool()

    # ----- forward --------------------------------------------------------------------------------------------

    def forward(self, frames: Tensor | None = None, *, visual_tokens: Tensor | None = None,
                input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                text_tokens: Tensor | None = None, text_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Either `frames` or `visual_tokens`, and either `input_ids` (+ `attention_mask`) or `text_tokens`
        (+ `text_mask`). Returns logits (B, C), text_logits (B, C) for the auxiliary loss, plan (B, L, N) — the
        transport plan between text tokens and the N = T'*H'*W' visual tokens, for `explain` — motion_weights
        (B, T', H'*W'), visual_embedding and text_embedding (B, E) for the contrastive loss, and text_mask (B, L).
        """
        visual = self._visual_tokens(frames, visual_tokens)
        text, mask = self._text_tokens(input_ids, attention_mask, text_tokens, text_mask)
        if visual.shape[0] != text.shape[0]:
            raise ValueError(f"batch sizes differ: {visual.shape[0]} videos but {text.shape[0]} texts")

        visual = self.visual_norm(visual)
        weights = motion_weights(visual, self.motion)
        visual = self.visual_proj((visual * weights[..., None]).flatten(1, 2))       # (B, N, E)

        text = self.text_refiner(text)                                              # (B, L, E)
        text_embedding = masked_mean(text, mask)
        if self.text_level == "sentence":
            text, mask = text_embedding[:, None], mask.new_ones(mask.shape[0], 1)

        plan, aligned = self._match(text, mask, visual)
        fused = masked_mean(self.fuse(torch.cat([text, aligned], dim=-1)), mask)
        return {"logits": self.head(fused), "text_logits": self.text_head(text_embedding), "plan": plan,
                "motion_weights": weights, "visual_embedding": visual.mean(dim=1),
                "text_embedding": text_embedding, "text_mask": mask}

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
        empty = ~mask.any(dim=1)
        if empty.any():
            raise ValueError(f"samples {torch.nonzero(empty).flatten().tolist()} have no text tokens")
        return tokens, mask

    def _match(self, text: Tensor, mask: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """Plan (B, L, N) with rows summing to 1/L over real text tokens (0 on padding), and for each text token
        the visual feature it is matched with (B, L, E): the plan's barycentric projection, or the attention
        output for cross-attention."""
        row_mass = mask.float() / mask.sum(dim=1, keepdim=True)
        if self.matching == "ot":
            plan = sinkhorn(cosine_cost(text, visual), epsilon=self.epsilon, iterations=self.sinkhorn_iterations,
                            mask_a=mask)
        elif self.matching == "cosine":
            plan = (-cosine_cost(text, visual) / self.epsilon).softmax(dim=-1) * row_mass[..., None]
        else:
            aligned, attention = self.cross_attention(text, visual, visual, need_weights=True)
            return attention.float() * row_mass[..., None], aligned
        rows = plan.sum(dim=-1, keepdim=True)
        aligned = torch.bmm(plan / torch.where(rows > 0, rows, 1.0), visual.float()).to(visual.dtype)
        return plan, aligned

    # ----- training -------------------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        """A collated batch -> forward kwargs: frames or cached visual tokens; the captions tokenised, or cached
        text tokens."""
        device = next(self.parameters()).device
        inputs = ({"visual_tokens": batch["visual_tokens"]} if "visual_tokens" in batch
                  else {"frames": batch["frames"]})
        if "text_tokens" in batch:
            inputs.update(text_tokens=batch["text_tokens"], text_mask=batch["text_mask"])
        else:
            encoded = self.tokenizer(list(batch["texts"]), padding=True, truncation=True,
                                     max_length=self.max_text_length, return_tensors="pt")
            inputs.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        return {name: value.to(device) for name, value in inputs.items()}

    def loss(self, outputs: dict[str, dict], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Eq. 9: l1 * weighted focal + l2 * supervised contrastive with mixup + l3 * auxiliary text CE."""
        out, labels = outputs["expression"], batches["expression"]["labels"].to(outputs["expression"]["logits"].device)
        total, parts = grace_loss(out, labels, class_weights, **self.loss_options)
        return {"loss": total, **parts}

    # ----- explanation (Fig. 6) -------------------------------------------------------------------------------

    def explain(self, batch: dict, outputs: dict[str, Tensor], out_dir: Path, label_names: list[str],
                top_frames: int = 3) -> list[Path]:
        """The first sample's transport plan aggregated to caption phrases x frames, as a PNG and a JSON.

        Token rows are summed into the phrases (comma / full-stop separated) they belong to; patch columns into
        their tubelet, whose mass is spread evenly over the frames it covers. Frames with the largest cumulative
        transport are marked.
        """
        if self.tokenizer is None:
            raise ValueError("explaining needs the text encoder's tokenizer; this model reads cached text tokens")
        text = batch["texts"][0]
        plan = outputs["plan"][0].float().cpu()                                         # (L, N)
        segments, patches = self.token_grid
        per_frame = (plan.reshape(plan.shape[0], segments, patches).sum(-1)
                     .repeat_interleave(self.video_config.tubelet_size, dim=1) / self.video_config.tubelet_size)
        phrases = caption_phrases(text)
        if self.text_level == "sentence":
            names, matrix = ["(whole caption)"], per_frame[:1]
        else:
            encoded = self.tokenizer(text, truncation=True, max_length=self.max_text_length,
                                     return_offsets_mapping=True)
            owner = [_phrase_of(start, end, phrases) for start, end in encoded["offset_mapping"]]
            used = sorted({o for o in owner if o is not None})
            matrix = torch.stack([per_frame[[i for i, o in enumerate(owner) if o == p]].sum(0) for p in used])
            names = [phrases[p][2] for p in used]
        totals = matrix.sum(0)
        top = totals.topk(min(top_frames, totals.numel())).indices.sort().values.tolist()
        probabilities = outputs["logits"][0].float().softmax(-1)
        predicted = label_names[int(probabilities.argmax())]
        label = int(batch["labels"][0])
        title = (f"{batch['sample_ids'][0]}: predicted {predicted} ({float(probabilities.max()):.2f})"
                 + (f", true {label_names[label]}" if label >= 0 else ""))
        stem = out_dir / f"{batch['sample_ids'][0].replace('/', '_')}-transport"
        frames = batch["frames"][0] if "frames" in batch else None
        _plot_transport(matrix.numpy(), names, top, title, frames, self.inputs, stem.with_suffix(".png"))
        stem.with_suffix(".json").write_text(json.dumps(
            {"sample_id": batch["sample_ids"][0], "text": text, "phrases": names, "plan": matrix.tolist(),
             "frame_totals": totals.tolist(), "top_frames": top, "predicted": predicted}, indent=2))
        return [stem.with_suffix(".png"), stem.with_suffix(".json")]

    # ----- optimisation ---------------------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict]:
        """AdamW parameter groups with layer-wise lr decay over the encoders' layers.

        Embeddings sit at depth 0, layer i at depth i + 1, everything after the encoder at depth + 1 with the full
        lr; each group's lr is lr * layer_decay ** (depth + 1 - its depth) (also given as "lr_scale" for
        schedulers). Biases and norm weights (1-D tensors) get no weight decay. Frozen parameters are left out.
        """
        def scale(name: str) -> float:
            layer, depth = self._layer_position(name)
            return layer_decay ** (depth + 1 - layer)

        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay, lr_scale_of=scale)

    def _layer_position(self, name: str) -> tuple[int, int]:
        """(layer depth, encoder depth) of a parameter; parameters outside both encoders rank as the head."""
        depth = self.video_config.num_hidden_layers
        for prefix, encoder in (("video_encoder.", self.video_encoder), ("text_encoder.", self.text_encoder)):
            if encoder is None or not name.startswith(prefix):
                continue
            depth = encoder.config.num_hidden_layers
            inner = name[len(prefix):]
            if inner.startswith("embeddings."):
                return 0, depth
            if inner.startswith("encoder.layer."):
                return int(inner.split(".")[2]) + 1, depth
            return depth + 1, depth
        return depth + 1, depth

    # ----- registry convention --------------------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random inputs of the right shapes: frames, and token ids (or text tokens) with the last sample padded."""
        config = self.video_config
        device = next(self.parameters()).device
        if self.video_encoder is None:
            visual = {"visual_tokens": torch.randn(batch_size, *self.token_grid, self.video_dim,
                                                   generator=generator).to(device)}
        else:
            visual = {"frames": torch.randn(batch_size, config.num_frames, config.num_channels, config.image_size,
                                            config.image_size, generator=generator).to(device)}
        length = 6
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[-1, length // 2:] = 0
        if self.text_encoder is None:
            return {**visual, "text_tokens": torch.randn(batch_size, length, self.text_dim,
                                                         generator=generator).to(device),
                    "text_mask": mask.bool().to(device)}
        ids = torch.randint(0, self.text_encoder.config.vocab_size, (batch_size, length), generator=generator)
        return {**visual, "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def caption_phrases(text: str) -> list[tuple[int, int, str]]:
    """(start, end, phrase) for each comma-, semicolon- or full-stop-separated phrase of a caption."""
    return [(m.start(), m.end(), m.group().strip()) for m in re.finditer(r"[^,;.]+", text) if m.group().strip()]


def _phrase_of(start: int, end: int, phrases: list[tuple[int, int, str]]) -> int | None:
    if start == end:   # special tokens ([CLS], [SEP]) cover no text
        return None
    return next((i for i, (a, b, _) in enumerate(phrases) if a <= start < b), None)


def _plot_transport(matrix: np.ndarray, phrases: list[str], top: list[int], title: str, frames: Tensor | None,
                    inputs: ModelInputs, path: Path) -> None:
    """Heat map of phrases x frames with the clip's frames above it; the top frames boxed in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, columns = matrix.shape
    figure = Figure(figsize=(2.5 + 0.7 * columns, 1.6 + 0.45 * rows))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 1, height_ratios=[1.0, max(rows, 1) * 0.45], hspace=0.05)
    if frames is not None:
        strip = figure.add_subplot(grid[0])
        mean, std = torch.tensor(inputs.mean)[:, None, None], torch.tensor(inputs.std)[:, None, None]
        images = ((frames.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy())
        strip.imshow(np.concatenate(list(images), axis=1), aspect="auto")
        strip.set_axis_off()
        width = images.shape[2]
        for t in top:
            strip.add_patch(Rectangle((t * width, 0), width - 1, images.shape[1] - 1, fill=False, color="red",
                                      linewidth=2))
        strip.set_title(title, fontsize=9)
    axes = figure.add_subplot(grid[1])
    axes.imshow(matrix, aspect="auto", cmap="viridis")
    axes.set_yticks(range(rows), [textwrap.shorten(p, 40) for p in phrases], fontsize=7)
    axes.set_xticks(range(columns), [f"{t}*" if t in top else str(t) for t in range(columns)], fontsize=7)
    axes.set_xlabel("frame (* = top cumulative transport)")
    figure.savefig(path, dpi=110, bbox_inches="tight")


@register_model("grace")
def grace(tiny: bool = False, *, num_classes: int = 7, pretrained: str | None = None,
          text_encoder: str | None = None, video_features: bool = False, text_features: bool = False,
          text_dim: int = 768, embed_dim: int | None = None, drop_path_rate: float = 0.1, **options) -> Grace:
    """GRACE on VideoMAE-base, or the tiny variant (32 px, 4 frames, width 32, random tiny BERT).

    pretrained: path or hub id of VideoMAE weights (e.g. MAE-DFER's VoxCeleb2 encoder converted to Hugging Face
    format), loaded with `from_pretrained`; None keeps a random encoder. text_encoder: path or hub id of the text
    encoder and its tokenizer; None gives BERT-base uncased (tiny: a random tiny BERT with a character tokenizer).
    video_features / text_features=True build no video / text encoder: the model then takes precomputed VideoMAE
    tokens (of the configured encoder's shape; `pretrained` is read for its config only) / text tokens of size
    text_dim. Further options go to `Grace` (matching, text_level, motion, epsilon, sinkhorn_iterations,
    freeze_text_encoder, attention_heads, loss_weights, focal_gamma, temperature, mixup_alpha, max_text_length).
    """
    if pretrained is not None:
        video_config = VideoMAEConfig.from_pretrained(pretrained)
        video_encoder = None if video_features else VideoMAEModel.from_pretrained(pretrained)
    else:
        video_config = VideoMAEConfig(**(TINY_VIDEO if tiny else BASE_VIDEO))
        video_encoder = None if video_features else VideoMAEModel(video_config)
    tokenizer = None
    if text_features:
        text_model = None
    elif text_encoder is not None:
        text_model, tokenizer = AutoModel.from_pretrained(text_encoder), load_tokenizer(text_encoder)
    elif tiny:
        text_model, tokenizer = BertModel(BertConfig(**TINY_TEXT), add_pooling_layer=False), tiny_tokenizer()
    else:
        text_model = AutoModel.from_pretrained(DEFAULT_TEXT_ENCODER, add_pooling_layer=False)
        tokenizer = load_tokenizer(DEFAULT_TEXT_ENCODER)
    if tiny:
        options.setdefault("attention_heads", 2)
        options.setdefault("max_text_length", TINY_TEXT["max_position_embeddings"])
    return Grace(video_encoder, text_model, num_classes=num_classes, video_config=video_config,
                 tokenizer=tokenizer, text_dim=text_dim, embed_dim=embed_dim or (16 if tiny else 512),
                 drop_path_rate=drop_path_rate, **options)
