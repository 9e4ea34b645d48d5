"""GReFEL (Wasi et al., ECCV-W 2024): geometry-aware reliability balancing over a landmark-image cross-attention ViT.

Feature extraction (Sec. 3.1, Eqs. 1-8):
  image  a ResNet (transformers `ResNetBackbone`, ResNet-50 by default) gives feature maps at strides 8, 16, 32:
         28x28, 14x14 and 7x7 for a 224 px face, the three scales of the paper. The paper's IR50 (face.evoLve) is
         not a transformers architecture; ResNet-50 is the loadable network closest to it (IR50 is a ResNet-50
         with improved residual units), and any ResNet checkpoint loads through `from_pretrained`.
  marks  the paper's queries are feature maps of a MobileFaceNet landmark detector. We have the landmarks
         themselves (the faces stage's 68 points), so each landmark becomes one query token per scale: an MLP
         embedding of its (x, y), a learned embedding of its identity (which of the 68 points it is), and the
         scale's image feature bilinearly sampled at its position.
  OCA    window cross-attention (Eqs. 1-3): the feature map is cut into non-overlapping windows of w x w tokens;
         a landmark query attends to the image tokens (keys, values) of the window it lies in. The relative
         position bias b is continuous here, an MLP of the offset between a token's centre and the landmark (in
         window units), one value per head, since landmarks do not sit on the token grid. With w = 7 the 28x28
         map has 4x4 windows, the 14x14 map 2x2 and the 7x7 map one: local to global, as in the paper.
  block  X' = OCA + X, X_o = MLP(Norm(X')) + X' (Eqs. 4-5), on the landmark stream (the query stream is the
         one whose positions the output has).
  fusion the three scales' tokens are concatenated (Eq. 6) with a learned scale embedding and passed through
         pre-norm transformer blocks (MHSA + MLP, Eqs. 7-8); a final LayerNorm without affine parameters, then
         the mean over tokens, is the embedding e.

Reliability balancing (Secs. 3.2-3.3, Eqs. 9-19):
  l      primary distribution: an MLP with two hidden layers of 64 (Linear, ReLU, dropout 0.5, BatchNorm), softmax.
  C_f    confidence 1 - H(p) / log(N_cls): the paper's Eq. 11 divides by N_cls, but its own text requires the
         normalised entropy to be 1 for a uniform distribution, which only log(N_cls) gives.
  t_g    geometric correction: K anchors per class; s = softmax over all anchors of -||e - a|| / delta, delta = 1;
         t_g = the anchors' one-hot labels weighted by s (= the summed similarity of each class's anchors).
  t_a    attentive correction: the paper applies MHSA to one sample's embedding alone; here it runs over that
         sample's fused landmark tokens (never across the batch), is mean-pooled and projected to the classes,
         softmax -> t_a, so that attention can pick the facial regions that matter for each class.
  final  t = (c_g t_g + c_a t_a) / (c_g + c_a), L_final = (c_l l + c_t t) / (c_l + c_t).
  "logits" are log L_final, so softmax(logits) = L_final.

Anchors live where embeddings live: e is layer-normalised without affine parameters (zero mean, unit variance
over its D features), and the anchors are the same normalisation of free parameters. Distances are then bounded,
which gives the anchor loss, maximised without bound in the paper, a finite optimum.

Loss (Sec. 3.4, Eqs. 20-23): L_cls = NLL of L_final; L_a = -mean over anchor pairs of ||a - a'||^2 / D (the
paper's "normalised" sum); L_c = mean over samples of min_k ||e - a_{y,k}||^2 / D. The paper gives no values for
the lambdas; defaults are (1, 0.1, 0.1).

Ablations: `balancing` (Table 2) = "both" | "anchors" (t = t_g) | "attention" (t = t_a) | "none" (L_final = l);
`losses` (Table 3) = any non-empty subset of ("cls", "anchor", "center"); the anchor and center losses need the
anchors, so they require balancing "both" or "anchors".

The paper's class-balanced batch selection and heavy augmentation are the trainer's and loader's business.
`metrics.cluster_scores` gives the Davies-Bouldin and Calinski-Harabasz scores of embeddings (Fig. 5).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import ResNetBackbone, ResNetConfig

from affectprep.schema import NUM_LANDMARKS

from .losses import labelled_cross_entropy
from .registry import ModelInputs, register_model

BALANCINGS = ("both", "anchors", "attention", "none")
LOSSES = ("cls", "anchor", "center")
STAGES = ["stage2", "stage3", "stage4"]   # strides 8, 16, 32

# Layer widths of the tiny ResNet: 64 px faces give 8x8, 4x4 and 2x2 maps.
TINY_BACKBONE = dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic")
BASE_DIMS = dict(embed_dim=512, heads=8, window=7, fusion_depth=1, anchors_per_class=10, hidden=64)
TINY_DIMS = dict(embed_dim=32, heads=2, window=2, fusion_depth=1, anchors_per_class=3, hidden=16)

_CONFIDENCE_EPS = 1e-6   # keeps the confidence-weighted means defined when both confidences are 0
_LOG_EPS = 1e-12


def confidence(distribution: Tensor) -> Tensor:
    """C_f(p) = 1 - H(p) / log(N) for distributions (..., N): 1 for one-hot, 0 for uniform (Eqs. 10-11)."""
    entropy = -(distribution * distribution.clamp_min(_LOG_EPS).log()).sum(-1)
    return 1 - entropy / math.log(distribution.shape[-1])


def confidence_weighted(first: Tensor, second: Tensor) -> Tensor:
    """(c1 p1 + c2 p2) / (c1 + c2) with c = C_f (Eqs. 18-19); equal weights when neither is confident."""
    first_weight = confidence(first)[..., None] + _CONFIDENCE_EPS
    second_weight = confidence(second)[..., None] + _CONFIDENCE_EPS
    return (first_weight * first + second_weight * second) / (first_weight + second_weight)


def geometric_correction(embeddings: Tensor, anchors: Tensor, delta: float = 1.0) -> Tensor:
    """t_g (B, C): softmax over all anchors (C, K, D) of -||e - a|| / delta, summed per class (Eqs. 13-15)."""
    distances = torch.cdist(embeddings, anchors.flatten(0, 1))
    similarity = (-distances / delta).softmax(dim=-1)
    return similarity.unflatten(-1, anchors.shape[:2]).sum(-1)


def _mlp(dim: int, ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class WindowCrossAttention(nn.Module):
    """Landmark queries attend to the image tokens of their own window, with a relative position bias (Eqs. 1-3)."""

    def __init__(self, dim: int, heads: int, window: int, bias_hidden: int = 16):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of heads {heads}")
        self.heads, self.window = heads, window
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.position_bias = nn.Sequential(nn.Linear(2, bias_hidden), nn.ReLU(), nn.Linear(bias_hidden, heads))

    def forward(self, queries: Tensor, points: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, P, D) at points (B, P, 2) in [0, 1] (x, y); tokens (B, H, W, D). Returns the output
        (B, P, D) and the attention (B, heads, P, H*W)."""
        batch, height, width, dim = tokens.shape
        rows = (torch.arange(height, device=tokens.device, dtype=points.dtype) + 0.5) / height
        cols = (torch.arange(width, device=tokens.device, dtype=points.dtype) + 0.5) / width
        centres = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1).reshape(-1, 2)   # (HW, 2) x, y

        grid = torch.tensor([width, height], device=tokens.device, dtype=points.dtype)
        token_window = torch.div((centres * grid).floor(), self.window, rounding_mode="floor")        # (HW, 2)
        point_cell = (points.clamp(0, 1) * grid).floor().clamp(max=grid - 1)
        point_window = torch.div(point_cell, self.window, rounding_mode="floor")                      # (B, P, 2)
        same_window = (point_window[:, :, None] == token_window[None, None]).all(-1)                 # (B, P, HW)

        offsets = (centres[None, None] - points[:, :, None]) * grid / self.window
        bias = self.position_bias(offsets).permute(0, 3, 1, 2)                                      # (B, h, P, HW)

        head_dim = dim // self.heads
        q = self.query(queries).unflatten(-1, (self.heads, head_dim)).transpose(1, 2)
        k, v = self.key_value(tokens.flatten(1, 2)).unflatten(-1, (2, self.heads, head_dim)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias
        attention = scores.masked_fill(~same_window[:, None], -torch.inf).softmax(dim=-1)
        output = (attention @ v).transpose(1, 2).flatten(2)
        return self.out(output), attention


class LandmarkImageBlock(nn.Module):
    """One scale: X' = OCA(X) + X, X_o = MLP(Norm(X')) + X' on the landmark tokens (Eqs. 4-5)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.query_norm, self.token_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = WindowCrossAttention(dim, heads, window)
        self.mlp = _mlp(dim)

    def forward(self, queries: Tensor, points: Tensor, tokens: Tensor) -> Tensor:
        attended, _ = self.attention(self.query_norm(queries), points, self.token_norm(tokens))
        queries = queries + attended
        return queries + self.mlp(self.mlp_norm(queries))


class FusionBlock(nn.Module):
    """Pre-norm transformer block over the multi-scale tokens (Eqs. 7-8)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = _mlp(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        normed = self.attention_norm(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens + self.mlp(self.mlp_norm(tokens))


class GReFEL(nn.Module):
    """GReFEL classifier. Build it with `create_model("grefel", ...)`; see the module docstring for the design."""

    tasks = ("expression",)

    def __init__(self, backbone: ResNetBackbone, *, num_classes: int = 7, image_size: int = 224,
                 embed_dim: int = 512, heads: int = 8, window: int = 7, fusion_depth: int = 1,
                 anchors_per_class: int = 10, hidden: int = 64, dropout: float = 0.5, delta: float = 1.0,
                 balancing: str = "both", losses: Sequence[str] = LOSSES,
                 lambdas: tuple[float, float, float] = (1.0, 0.1, 0.1)):
        super().__init__()
        losses = tuple(losses)
        if balancing not in BALANCINGS:
            raise ValueError(f"balancing must be one of {BALANCINGS}, got {balancing!r}")
        if not losses or not set(losses) <= set(LOSSES):
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {losses}")
        self.uses_anchors = balancing in ("both", "anchors")
        if not self.uses_anchors and {"anchor", "center"} & set(losses):
            raise ValueError(f"the anchor and center losses need anchors, which balancing={balancing!r} has none of")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.balancing, self.losses = num_classes, balancing, losses
        self.delta, self.lambdas = delta, dict(zip(LOSSES, lambdas))
        self.inputs = ModelInputs(frames=1, image_size=image_size, landmarks=True)

        self.backbone = backbone
        self.token_projections = nn.ModuleList(nn.Linear(channels, embed_dim) for channels in backbone.channels)
        self.point_embedding = nn.Sequential(nn.Linear(2, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.landmark_embedding = nn.Parameter(torch.randn(NUM_LANDMARKS, embed_dim) * 0.02)
        self.scale_embedding = nn.Parameter(torch.randn(len(backbone.channels), embed_dim) * 0.02)
        self.scale_blocks = nn.ModuleList(LandmarkImageBlock(embed_dim, heads, window) for _ in backbone.channels)
        self.fusion = nn.Sequential(*(FusionBlock(embed_dim, heads) for _ in range(fusion_depth)))
        self.embedding_norm = nn.LayerNorm(embed_dim, elementwise_affine=False)

        self.head = nn.Sequential(                                                   # f, Eq. 9
            nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.BatchNorm1d(hidden),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.BatchNorm1d(hidden),
            nn.Linear(hidden, num_classes))
        if self.uses_anchors:
            self.anchor_parameters = nn.Parameter(torch.randn(num_classes, anchors_per_class, embed_dim))
        if balancing in ("both", "attention"):
            self.correction_attention = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
            self.correction_head = nn.Linear(embed_dim, num_classes)

    @property
    def anchors(self) -> Tensor:
        """The anchors a^{ij} (C, K, D), in the embedding's normalised space."""
        return F.layer_norm(self.anchor_parameters, self.anchor_parameters.shape[-1:])

    def encode(self, frames: Tensor, landmarks: Tensor) -> Tensor:
        """frames (B, 1, 3, S, S), landmarks (B, 1, 68, 2) in [0, 1] -> fused tokens (B, scales * 68, D)."""
        size = self.inputs.image_size
        if frames.dim() != 5 or tuple(frames.shape[1:]) != (1, 3, size, size):
            raise ValueError(f"GReFEL expects still frames of shape (B, 1, 3, {size}, {size}), "
                             f"got {tuple(frames.shape)}")
        if tuple(landmarks.shape) != (frames.shape[0], 1, NUM_LANDMARKS, 2):
            raise ValueError(f"landmarks must have shape ({frames.shape[0]}, 1, {NUM_LANDMARKS}, 2), "
                             f"got {tuple(landmarks.shape)}")
        points = landmarks[:, 0].to(frames.dtype)
        feature_maps = self.backbone(pixel_values=frames[:, 0]).feature_maps
        base_queries = self.point_embedding(points) + self.landmark_embedding
        scale_tokens = []
        for scale, (feature_map, projection, block) in enumerate(
                zip(feature_maps, self.token_projections, self.scale_blocks)):
            tokens = projection(feature_map.permute(0, 2, 3, 1))                                 # (B, H, W, D)
            sampled = F.grid_sample(tokens.permute(0, 3, 1, 2), points[:, :, None] * 2 - 1, align_corners=False)
            queries = base_queries + sampled[..., 0].transpose(1, 2)
            scale_tokens.append(block(queries, points, tokens) + self.scale_embedding[scale])
        return self.fusion(torch.cat(scale_tokens, dim=1))

    def forward(self, frames: Tensor, landmarks: Tensor) -> dict[str, Tensor]:
        """Returns logits = log L_final (B, C), probabilities L_final, primary l, geometric t_g and attentive t_a
        (those the balancing uses), confidence C_f(L_final) (B,), embedding e (B, D)."""
        tokens = self.encode(frames, landmarks)
        embedding = self.embedding_norm(tokens).mean(dim=1)
        primary = self.head(embedding).softmax(dim=-1)
        outputs = {"primary": primary, "embedding": embedding}
        corrections = []
        if self.uses_anchors:
            outputs["geometric"] = geometric_correction(embedding, self.anchors, self.delta)
            corrections.append(outputs["geometric"])
        if self.balancing in ("both", "attention"):
            attended = self.correction_attention(tokens, tokens, tokens, need_weights=False)[0]
            outputs["attentive"] = self.correction_head(attended.mean(dim=1)).softmax(dim=-1)   # Eqs. 16-17
            corrections.append(outputs["attentive"])
        final = primary
        if corrections:
            correction = corrections[0] if len(corrections) == 1 else confidence_weighted(*corrections)  # Eq. 18
            final = confidence_weighted(primary, correction)                                    # Eq. 19
        outputs.update(probabilities=final, logits=final.clamp_min(_LOG_EPS).log(), confidence=confidence(final))
        return outputs

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """sum of lambda * part over the enabled parts "cls", "anchor", "center" (Eq. 23); parts detached."""
        output = outputs["expression"]
        all_labels = batches["expression"]["labels"].to(output["logits"].device)
        labelled = all_labels >= 0
        embedding, labels = output["embedding"][labelled], all_labels[labelled]
        parts = {}
        if "cls" in self.losses:
            # The logits are log-probabilities of a distribution (log-softmax leaves them as they are), so this is
            # the NLL of the final, corrected distribution.
            parts["cls"] = labelled_cross_entropy(output["logits"], all_labels, class_weights)
        if "anchor" in self.losses:
            parts["anchor"] = anchor_loss(self.anchors)
        if "center" in self.losses:
            parts["center"] = center_loss(embedding, labels, self.anchors) if labels.numel() else embedding.sum() * 0
        total = sum(self.lambdas[name] * value for name, value in parts.items())
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    # ----- registry convention --------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        return {"frames": batch["frames"], "landmarks": batch["landmarks"]}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        device = self.landmark_embedding.device
        size = self.inputs.image_size
        return {"frames": torch.randn(batch_size, 1, 3, size, size, generator=generator).to(device),
                "landmarks": torch.rand(batch_size, 1, NUM_LANDMARKS, 2, generator=generator).to(device)}


def anchor_loss(anchors: Tensor) -> Tensor:
    """L_a = -mean over distinct anchor pairs of ||a - a'||^2 / D (Eq. 21), anchors (C, K, D)."""
    flat = anchors.flatten(0, 1)
    squared = torch.cdist(flat, flat).pow(2)
    pairs = flat.shape[0] * (flat.shape[0] - 1)
    return -squared.sum() / max(pairs, 1) / flat.shape[-1]


def center_loss(embeddings: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
    """L_c = mean over samples of min_k ||e - a_{y,k}||^2 / D (Eq. 22)."""
    own = anchors[labels]                                                                   # (B, K, D)
    squared = (embeddings[:, None] - own).pow(2).sum(-1)
    return squared.min(dim=1).values.mean() / embeddings.shape[-1]


@register_model("grefel")
def grefel(tiny: bool = False, *, num_classes: int = 7, backbone: str | None = None,
           anchors_per_class: int | None = None, image_size: int | None = None, **options) -> GReFEL:
    """GReFEL on a ResNet-50 backbone at 224 px, or the tiny variant (64 px, tiny ResNet, width 32).

    backbone: path or hub id of a transformers ResNet checkpoint (e.g. microsoft/resnet-50, or a face-trained
    ResNet converted to transformers), loaded with `from_pretrained`; None keeps a random one. anchors_per_class
    is K (the paper leaves it open: 10, tiny 3). Further options go to `GReFEL` (embed_dim, heads, window,
    fusion_depth, hidden, dropout, delta, balancing, losses, lambdas).
    """
    if backbone is not None:
        network = ResNetBackbone.from_pretrained(backbone, out_features=STAGES)
    else:
        network = ResNetBackbone(ResNetConfig(**(TINY_BACKBONE if tiny else {}), out_features=STAGES))
    dims = {**(TINY_DIMS if tiny else BASE_DIMS), **options}
    if anchors_per_class is not None:
        dims["anchors_per_class"] = anchors_per_class
    return GReFEL(network, num_classes=num_classes, image_size=image_size or (64 if tiny else 224), **dims)
