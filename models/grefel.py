"""GReFEL (Wasi et al., ECCV-W 2024): geometry-aware reliability balancing over a window-based cross-attention ViT.

Feature extraction (Sec. 3.1, Eqs. 1-8; GReFEL builds on POSTER++, whose code fills in what the paper leaves out):
  image   IR-50 (face.evoLVe, MS-Celeb-1M; models/layers/ir50.py) on the face resized to half (224 -> 112 px,
          as POSTER++), the outputs of its first three stages (56, 28, 14 px), each through a stride-2 3x3 conv
          (POSTER++'s conv1-3): X_img at 28x28x64, 14x14x128 and 7x7x256. `image_backbone="resnet50"` keeps a
          transformers ResNet-50 instead (stages 2-4 of the 224 px face, 1x1 convs to the same widths): any
          transformers ResNet checkpoint loads through `from_pretrained`.
  marks   MobileFaceNet, a 68-point landmark detector (models/layers/mobilefacenet.py), on the same 112 px face:
          X_lm = its conv_3, conv_4 and conv_6_sep maps (28x28x64, 14x14x128, 7x7x512 -> 3x3 conv to 256, POSTER++'s
          last_face_conv). With the detector POSTER++ releases (`landmark_weights`), it is frozen, as POSTER++
          freezes it. Without it (nothing can be downloaded here), the detector is trained here as a landmark
          detector: its head regresses the faces stage's 68 landmarks (loss part "landmarks", mean squared error in
          crop units), and its maps enter the attention detached, so only the landmarks shape them, as in a frozen
          pre-trained detector. That is our choice, and it is why the landmarks must be real (FAN or dlib): on the
          haar backend's mean-shape template (landmark_source "template") the detector would learn one fixed shape
          and the geometry would be void, so training refuses such a faces store unless
          `allow_template_landmarks=True` (recorded in the run's config).
  OCA     window cross-attention at each scale (Eqs. 1-3): both maps are cut into the same non-overlapping w x w
          windows (M = w^2 tokens); q = z_lm w_q, k = z_img w_k, v = z_img w_v; softmax(q k^T / sqrt(d) + b) v per
          head, merged by w_o. b is the learnable relative position table (Swin/POSTER++: (2w-1)^2 entries per
          head, indexed by the offset between a landmark token and an image token). Windows (28, 14, 7) are
          POSTER++'s: one window per scale at 224 px; smaller windows give several.
  block   X'_img = OCA + X_img (Eq. 4), X_img_o = MLP(Norm(X'_img)) + X'_img (Eq. 5); the residual is the image
          stream's, so the output keeps the image map's grid.
  fusion  each scale's map is brought to the coarsest grid and to the embedding width by stride-2 3x3 convs (1x1 at
          the coarsest; POSTER++'s embed_q/k/v), the tokens are concatenated (Eq. 6) with a learned position
          embedding (POSTER++'s ViT has one; without it the tokens lose their place), then blocks as written:
          X_o' = MHSA(X_o) + X_o (Eq. 7), X_oout = MLP(Norm(X_o)) + X_o' (Eq. 8: the MLP reads the block's input,
          a parallel block). Depth 2, width 768, 8 heads: POSTER++'s ViT, whose parameter count (43.7M) is the one
          Table 2 gives for GReFEL without reliability balancing (43.6M).
  e       the paper makes X_oout "equal to" the embedding e; it is a token sequence, so e is its mean over tokens,
          layer-normalised without affine parameters: zero mean and unit variance over its D features, norm sqrt(D)
          (our choice; see "Scale" below).

Reliability balancing (Secs. 3.2-3.3, Eqs. 9-19):
  l       primary distribution (Eq. 9): an MLP with two hidden layers of 64, each followed by ReLU, dropout 0.5 and
          BatchNorm (Sec. 4), softmax. The BatchNorm normalises a one-sample training batch with its running
          statistics (models/layers/batchnorm.py) instead of failing on it.
  C_f     confidence 1 - H(p) / log(N_cls) (Eqs. 10-11): Eq. 11 prints a division by N_cls, but the text requires
          H = 1 for a uniform distribution (confidence 0), which only log(N_cls) gives.
  t_g     geometric correction (Eqs. 12-15): K anchors per class with one-hot labels m; s = softmax over all
          anchors of -||e - a|| / delta, delta = 1; t_g = sum s m (the summed similarity of each class's anchors).
  t_a     attentive correction (Eqs. 16-17): MHSA with d_Q = d_K = d_V = 64 (Sec. 4). The paper feeds it the
          embedding e of one sample alone; attention over a single token is a plain linear map (its weight is 1),
          so here it runs over that sample's fused tokens X_oout (never across the batch), is mean-pooled and
          projected to the classes: t_a = softmax(.).
  final   t = (c_g t_g + c_a t_a) / (c_g + c_a) (Eq. 18), L_final = (c_l l + c_t t) / (c_l + c_t) (Eq. 19).
          "logits" are log L_final, so softmax(logits) = L_final.

Scale: e and the anchors live on one sphere, the anchors being the same layer normalisation of free parameters, so
distances are those delta = 1 was chosen for at this width (an embedding at its anchor is at distance 0, other
anchors up to 2 sqrt(D)), and the anchor loss, maximised without bound in the paper, has a finite optimum.
K: the paper leaves the number of anchors per class open; default 10 (tiny 3). Table 2's +0.14M parameters for
the anchors would mean K ~ 23 at D = 768 with AffWild2's 8 classes, but the same table's +0.2M for the MHSA does
not fit D = 768 either (4 D^2 = 2.4M), so we do not derive K from it.

Loss (Sec. 3.4, Eqs. 20-23): L_cls = NLL of L_final, unweighted (Eq. 20 has no class weights: the paper balances
with its data refinement, Sec. 4); L_a = -mean over anchor pairs of ||a - a'||^2 / D (the paper's "normalised"
sum); L_c = mean over samples of min_k ||e - a_{y,k}||^2 / D. The paper gives no lambdas; defaults (1, 0.1, 0.1).

Ablations (registered with the model, see ABLATIONS): `balancing` (Table 2) = "both" | "anchors" (t = t_g) |
"attention" (t = t_a) | "none" (L_final = l); `losses` (Table 3) = any non-empty subset of ("cls", "anchor",
"center"); the anchor and center losses need the anchors, so they require balancing "both" or "anchors".

Sec. 4's data refinement (N_pg = 512 images per video or face group, then B = 500 per expression per epoch) and
heavy augmentation are the trainer's and loader's business. `metrics.cluster_scores` gives the Davies-Bouldin and
Calinski-Harabasz scores of the embeddings (Fig. 5). `explain` draws the landmark attention over the face and the
reliability correction (primary against corrected distribution).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers.batchnorm import BatchNorm1d
from .layers.ir50 import IRBackbone, load_ir50_checkpoint
from .layers.mobilefacenet import MobileFaceNet, load_mobilefacenet_checkpoint
from .losses import labelled_cross_entropy
from .registry import Ablation, ModelInputs, register_model
from .figures import displayable, new_figure, prediction_title, write_explanation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BALANCINGS = ("both", "anchors", "attention", "none")
LOSSES = ("cls", "anchor", "center")
IMAGE_BACKBONES = ("ir50", "resnet50")
SCALES = 3                     # strides 8, 16, 32 of the input face: 28, 14, 7 at 224 px
RESNET_STAGES = ["stage2", "stage3", "stage4"]

BASE_DIMS = dict(dims=(64, 128, 256), heads=(2, 4, 8), windows=(28, 14, 7), embed_dim=768, fusion_depth=2,
                 fusion_heads=8, correction_head_dim=64, anchors_per_class=10, hidden=64)
# Tiny: 64 px faces, backbones at 32 px, maps 8, 4, 2 cut into 4, 4 and 1 windows.
TINY_DIMS = dict(dims=(8, 16, 32), heads=(1, 2, 2), windows=(4, 2, 2), embed_dim=32, fusion_depth=1,
                 fusion_heads=2, correction_head_dim=16, anchors_per_class=3, hidden=16)
TINY_IR = dict(widths=(8, 16, 32), units=(1, 1, 1))
TINY_MOBILEFACENET = dict(widths=(8, 16, 64), expansions=(16, 32, 32, 32), units=(1, 1, 1))
TINY_RESNET = dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic")

_CONFIDENCE_EPS = 1e-6   # keeps the confidence-weighted means defined when both confidences are 0
_LOG_EPS = 1e-12

ABLATIONS = (
    Ablation("Table 2", "Without reliability balancing", {"model.balancing": "none", "model.losses": ["cls"]}),
    Ablation("Table 2", "Reliability balancing with only Anchors", {"model.balancing": "anchors"}),
    Ablation("Table 2", "Reliability balancing with only MHSA", {"model.balancing": "attention",
                                                                  "model.losses": ["cls"]}),
    Ablation("Table 2", "Reliability balancing with both strategies", {"model.balancing": "both"}),
    Ablation("Table 3", "Class Distribution Loss (L_cls)", {"model.losses": ["cls"]}),
    Ablation("Table 3", "Anchor Loss (L_a)", {"model.losses": ["anchor"]}),
    Ablation("Table 3", "Center Loss (L_c)", {"model.losses": ["center"]}),
    Ablation("Table 3", "Class Distribution and Anchor Loss (L_cls + L_a)", {"model.losses": ["cls", "anchor"]}),
    Ablation("Table 3", "All Loss Function (L_cls + L_a + L_c)", {"model.losses": ["cls", "anchor", "center"]}),
)


# ---- reliability balancing (Eqs. 10-15, 18-19) --------------------------------------------------------------------

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


# ---- feature extraction (Eqs. 1-8) --------------------------------------------------------------------------------

def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, D) -> (B, windows, window^2, D), windows in row-major order, tokens row-major inside."""
    batch, height, width, dim = x.shape
    x = x.view(batch, height // window, window, width // window, window, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, dim)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """The inverse of `window_partition`: (B, windows, window^2, ...) -> (B, H, W, ...)."""
    batch, rest = windows.shape[0], windows.shape[3:]
    x = windows.view(batch, height // window, width // window, window, window, *rest)
    return x.permute(0, 1, 3, 2, 4, *range(5, x.dim())).reshape(batch, height, width, *rest)


def relative_position_index(window: int) -> Tensor:
    """(M, M) index into a ((2w-1)^2)-row table of the offset (dy, dx) from token j to token i of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)     # (M, M, 2) in [0, 2w-2]
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


class WindowCrossAttention(nn.Module):
    """Landmark-feature queries attend to the image tokens of the same window (Eqs. 1-3), with a learnable relative
    position bias table b (one entry per head for each of the (2w-1)^2 offsets within a window)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"a scale's width {dim} is not a multiple of its heads {heads}")
        self.heads, self.window = heads, window
        self.query = nn.Linear(dim, dim)             # w_q
        self.key_value = nn.Linear(dim, 2 * dim)     # w_k, w_v
        self.out = nn.Linear(dim, dim)               # w_o
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> Tensor:
        """b as (heads, M, M): the bias added to query token i's score for key token j."""
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        return bias.view(*self.relative_position_index.shape, self.heads).permute(2, 0, 1)

    def forward(self, landmark_map: Tensor, image_map: Tensor) -> tuple[Tensor, Tensor]:
        """Maps (B, H, W, D), the same grid -> OCA (B, H, W, D) and the attention (B, windows, heads, M, M)."""
        batch, height, width, dim = image_map.shape
        if landmark_map.shape != image_map.shape or height % self.window or width % self.window:
            raise ValueError(f"window cross-attention: landmark map {tuple(landmark_map.shape)} and image map "
                             f"{tuple(image_map.shape)} must match and divide into {self.window}x{self.window} windows")
        head_dim = dim // self.heads
        z_lm, z_img = window_partition(landmark_map, self.window), window_partition(image_map, self.window)
        q = self.query(z_lm).unflatten(-1, (self.heads, head_dim)).transpose(2, 3)        # (B, nW, h, M, d)
        k, v = self.key_value(z_img).unflatten(-1, (2, self.heads, head_dim)).permute(3, 0, 1, 4, 2, 5)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + self.position_bias()
        attention = scores.softmax(dim=-1)
        merged = (attention @ v).transpose(2, 3).flatten(3)                                 # (B, nW, M, D)
        return window_reverse(self.out(merged), self.window, height, width), attention


def _mlp(dim: int, ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class CrossFusionBlock(nn.Module):
    """One scale: X'_img = OCA + X_img (Eq. 4), X_img_o = MLP(Norm(X'_img)) + X'_img (Eq. 5)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.attention = WindowCrossAttention(dim, heads, window)
        self.norm = nn.LayerNorm(dim)
        self.mlp = _mlp(dim)

    def forward(self, landmark_map: Tensor, image_map: Tensor) -> tuple[Tensor, Tensor]:
        attended, attention = self.attention(landmark_map, image_map)
        combined = attended + image_map
        return self.mlp(self.norm(combined)) + combined, attention


class FusionBlock(nn.Module):
    """Multi-scale fusion as Eqs. 7-8 print it: X_o' = MHSA(X_o) + X_o, X_oout = MLP(Norm(X_o)) + X_o'."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = _mlp(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        attended = self.attention(tokens, tokens, tokens, need_weights=False)[0] + tokens
        return self.mlp(self.norm(tokens)) + attended


def _to_grid(in_channels: int, out_channels: int, halvings: int) -> nn.Module:
    """`halvings` stride-2 3x3 convs (the first to out_channels), or a 1x1 conv when none (POSTER++'s embed_q/k/v)."""
    if halvings == 0:
        return nn.Conv2d(in_channels, out_channels, 1)
    return nn.Sequential(*(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, 2, 1)
                           for i in range(halvings)))


class IRImageStream(nn.Module):
    """IR-50 on the half-size face; its stage maps through stride-2 3x3 convs (POSTER++'s conv1-3)."""

    def __init__(self, backbone: IRBackbone, dims: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.downsample = nn.ModuleList(nn.Conv2d(w, d, 3, 2, 1) for w, d in zip(backbone.widths, dims))
        self.half_size = True

    def forward(self, faces: Tensor) -> list[Tensor]:
        return [down(x) for down, x in zip(self.downsample, self.backbone(faces))]


class ResNetImageStream(nn.Module):
    """A transformers ResNet on the full-size face; stages 2-4 through 1x1 convs to the scale widths."""

    def __init__(self, backbone: nn.Module, dims: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.downsample = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in zip(backbone.channels, dims))
        self.half_size = False

    def forward(self, faces: Tensor) -> list[Tensor]:
        maps = self.backbone(pixel_values=faces).feature_maps
        return [down(x) for down, x in zip(self.downsample, maps)]


class GReFEL(nn.Module):
    """GReFEL classifier. Build it with `create_model("grefel", ...)`; see the module docstring for the design."""

    tasks = ("expression",)

    def __init__(self, image_stream: nn.Module, landmark_detector: MobileFaceNet, *, num_classes: int = 7,
                 image_size: int = 224, dims: Sequence[int] = BASE_DIMS["dims"],
                 heads: Sequence[int] = BASE_DIMS["heads"], windows: Sequence[int] = BASE_DIMS["windows"],
                 embed_dim: int = 768, fusion_depth: int = 2, fusion_heads: int = 8, correction_head_dim: int = 64,
                 anchors_per_class: int = 10, hidden: int = 64, dropout: float = 0.5, delta: float = 1.0,
                 balancing: str = "both", losses: Sequence[str] = LOSSES,
                 lambdas: Sequence[float] = (1.0, 0.1, 0.1), train_landmark_detector: bool = True,
                 allow_template_landmarks: bool = False):
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
        if len(lambdas) != len(LOSSES):
            raise ValueError(f"lambdas are (cls, anchor, center), got {tuple(lambdas)}")
        if not all(len(v) == SCALES for v in (dims, heads, windows)):
            raise ValueError(f"dims, heads and windows give one value per scale ({SCALES}), got {dims}, {heads}, "
                             f"{windows}")
        sizes = [image_size // 2 ** (3 + i) for i in range(SCALES)]
        if image_size % 2 ** (2 + SCALES) or any(size % w for size, w in zip(sizes, windows)):
            raise ValueError(f"image_size {image_size} gives maps of {sizes}, which windows {tuple(windows)} must "
                             f"divide (image_size a multiple of 32)")
        if embed_dim % correction_head_dim:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of correction_head_dim {correction_head_dim}")
        self.num_classes, self.balancing, self.losses = num_classes, balancing, losses
        self.delta, self.lambdas = delta, dict(zip(LOSSES, lambdas))
        self.sizes, self.windows = sizes, tuple(windows)
        self.trains_landmark_detector = train_landmark_detector
        # The faces stage's landmarks are the detector's training target; a loaded, frozen detector needs none.
        self.inputs = ModelInputs(frames=1, image_size=image_size, landmarks=train_landmark_detector,
                                  real_landmarks=train_landmark_detector and not allow_template_landmarks)

        self.image_stream = image_stream
        self.landmark_detector = landmark_detector
        if not train_landmark_detector:
            self.landmark_detector.requires_grad_(False).eval()
        self.landmark_projections = nn.ModuleList(
            nn.Identity() if c == d else nn.Conv2d(c, d, 3, padding=1)        # POSTER++'s last_face_conv
            for c, d in zip(landmark_detector.channels, dims))
        self.scale_blocks = nn.ModuleList(CrossFusionBlock(d, h, w) for d, h, w in zip(dims, heads, windows))
        self.to_tokens = nn.ModuleList(_to_grid(d, embed_dim, SCALES - 1 - i) for i, d in enumerate(dims))
        tokens = SCALES * sizes[-1] ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, tokens, embed_dim))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.fusion = nn.Sequential(*(FusionBlock(embed_dim, fusion_heads) for _ in range(fusion_depth)))

        self.head = nn.Sequential(                                                   # f, Eq. 9 and Sec. 4
            nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout), BatchNorm1d(hidden),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), BatchNorm1d(hidden),
            nn.Linear(hidden, num_classes))
        if self.uses_anchors:
            self.anchor_parameters = nn.Parameter(torch.randn(num_classes, anchors_per_class, embed_dim))
        if balancing in ("both", "attention"):
            self.correction_attention = nn.MultiheadAttention(embed_dim, embed_dim // correction_head_dim,
                                                              batch_first=True)
            self.correction_head = nn.Linear(embed_dim, num_classes)

    def train(self, mode: bool = True) -> "GReFEL":
        super().train(mode)
        if not self.trains_landmark_detector:   # a loaded detector stays frozen, its BatchNorm statistics too
            self.landmark_detector.eval()
        return self

    @property
    def anchors(self) -> Tensor:
        """The anchors a^{ij} (C, K, D), on the embedding's sphere (see "Scale" in the module docstring)."""
        return F.layer_norm(self.anchor_parameters, self.anchor_parameters.shape[-1:])

    def extract(self, frames: Tensor, keep_attention: bool = False) -> dict[str, Tensor | list[Tensor]]:
        """frames (B, 1, 3, S, S) -> "tokens" X_oout (B, N, D), "landmarks" the detector's 68 points (B, 68, 2) in
        [0, 1] of the face, and with keep_attention the cross-attention weights per scale (B, windows, heads, M, M)."""
        size = self.inputs.image_size
        if frames.dim() != 5 or tuple(frames.shape[1:]) != (1, 3, size, size):
            raise ValueError(f"GReFEL expects still frames of shape (B, 1, 3, {size}, {size}), "
                             f"got {tuple(frames.shape)}")
        faces = frames[:, 0]
        # Both face networks run at half the crop size, as in POSTER++ (224 -> 112 px); antialiased (a choice:
        # POSTER++ takes the nearest pixel, which aliases).
        half = F.interpolate(faces, size=size // 2, mode="bilinear", antialias=True, align_corners=False)
        image_maps = self.image_stream(half if self.image_stream.half_size else faces)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_landmark_detector):
            landmark_maps, landmarks = self.landmark_detector(half)
        scale_tokens, attentions = [], []
        for scale, (image_map, landmark_map) in enumerate(zip(image_maps, landmark_maps)):
            # Detached: the landmark stream is shaped by its landmarks only (module docstring).
            queries = self.landmark_projections[scale](landmark_map.detach()).permute(0, 2, 3, 1)
            fused, attention = self.scale_blocks[scale](queries, image_map.permute(0, 2, 3, 1))
            scale_tokens.append(self.to_tokens[scale](fused.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
            if keep_attention:
                attentions.append(attention)
        tokens = self.fusion(torch.cat(scale_tokens, dim=1) + self.position_embedding)      # Eqs. 6-8
        out = {"tokens": tokens, "landmarks": landmarks}
        if keep_attention:
            out["attention"] = attentions
        return out

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        """Returns logits = log L_final (B, C), probabilities L_final, primary l, geometric t_g, attentive t_a and
        their combination t ("correction"; those the balancing uses), confidence C_f(L_final) (B,), embedding e
        (B, D) and the landmark detector's points (B, 68, 2)."""
        extracted = self.extract(frames)
        tokens = extracted["tokens"]
        embedding = F.layer_norm(tokens.mean(dim=1), tokens.shape[-1:])
        primary = self.head(embedding).softmax(dim=-1)
        outputs = {"primary": primary, "embedding": embedding, "landmarks": extracted["landmarks"]}
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
            outputs["correction"] = correction
            final = confidence_weighted(primary, correction)                                    # Eq. 19
        outputs.update(probabilities=final, logits=final.clamp_min(_LOG_EPS).log(), confidence=confidence(final))
        return outputs

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """sum of lambda * part over the enabled parts "cls", "anchor", "center" (Eq. 23), plus "landmarks" when the
        detector is trained here; parts detached. class_weights are not used: Eq. 20 has none."""
        output, batch = outputs["expression"], batches["expression"]
        all_labels = batch["labels"].to(output["logits"].device)
        labelled = all_labels >= 0
        embedding, labels = output["embedding"][labelled], all_labels[labelled]
        parts = {}
        if "cls" in self.losses:
            # NLL of the final, corrected distribution: its logits are log-probabilities, which the softmax of
            # the shared labelled cross-entropy leaves as they are, so this is Eq. 20 exactly.
            parts["cls"] = labelled_cross_entropy(output["logits"], all_labels)
        if "anchor" in self.losses:
            parts["anchor"] = anchor_loss(self.anchors)
        if "center" in self.losses:
            parts["center"] = center_loss(embedding, labels, self.anchors) if labels.numel() else embedding.sum() * 0
        total = sum(self.lambdas[name] * value for name, value in parts.items())
        if "cls" not in parts:
            # Table 3's rows without L_cls leave the heads out of the loss; a zero on their output keeps them on the
            # graph, so distributed training reduces the same parameters on every step.
            total = total + output["logits"].sum() * 0
        if self.trains_landmark_detector:
            if "landmarks" not in batch:
                raise ValueError("GReFEL trains its landmark detector on the batch's landmarks, and this batch has "
                                 "none")
            target = batch["landmarks"][:, 0].to(output["landmarks"])
            parts["landmarks"] = F.mse_loss(output["landmarks"], target)
            total = total + parts["landmarks"]
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    # ----- explanation ------------------------------------------------------------------------------------------

    def explain(self, batch: dict, outputs: dict[str, Tensor], out_dir: Path, label_names: list[str]) -> list[Path]:
        """For the batch's first sample: where the landmark queries attend on the face at each scale, and the
        reliability correction (primary l, the corrections, the final L_final with their confidences); each a PNG
        and a JSON named <sample_id>-landmark-attention / <sample_id>-reliability."""
        sample_id = batch["sample_ids"][0]
        with torch.no_grad():
            attentions = self.extract(batch["frames"][:1], keep_attention=True)["attention"]
        maps = [attention_received(a, w, size, size)[0].float().cpu().numpy()
                for a, w, size in zip(attentions, self.windows, self.sizes)]
        face = displayable(batch["frames"][0, 0], self.inputs.mean, self.inputs.std)
        detected = outputs["landmarks"][0].float().cpu().numpy()
        given = batch["landmarks"][0, 0].float().cpu().numpy() if "landmarks" in batch else None
        distributions = {name: outputs[name][0].float().cpu().numpy()
                         for name in ("primary", "geometric", "attentive", "correction", "probabilities")
                         if name in outputs}
        final = torch.from_numpy(distributions["probabilities"])
        predicted = label_names[int(final.argmax())]
        label = int(batch["labels"][0])
        title = prediction_title(sample_id, final, label_names, label)
        attention = write_explanation(_plot_attention(face, maps, self.windows, detected, given, title), {
            "predicted": predicted,
            "scales": [{"size": size, "window": w, "attention_received": m.tolist()}
                       for size, w, m in zip(self.sizes, self.windows, maps)],
            "detected_landmarks": detected.tolist(), "faces_stage_landmarks": None if given is None else given.tolist(),
        }, out_dir, "landmark-attention", sample_id)
        confidences = {name: float(confidence(torch.from_numpy(p))) for name, p in distributions.items()}
        reliability = write_explanation(_plot_reliability(distributions, confidences, label_names, title), {
            "predicted": predicted, "label": label_names[label] if label >= 0 else None,
            "classes": list(label_names), "balancing": self.balancing,
            "distributions": {name: p.tolist() for name, p in distributions.items()},
            "confidences": confidences}, out_dir, "reliability", sample_id)
        return attention + reliability

    # ----- registry convention --------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        return {"frames": batch["frames"]}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        device = self.position_embedding.device
        size = self.inputs.image_size
        return {"frames": torch.randn(batch_size, 1, 3, size, size, generator=generator).to(device)}


def attention_received(attention: Tensor, window: int, height: int, width: int) -> Tensor:
    """How much of the landmark queries' attention each image token receives (B, H, W), averaged over heads and
    normalised to sum to 1 per sample, from the weights (B, windows, heads, M, M)."""
    received = attention.mean(dim=2).sum(dim=2)                                     # (B, windows, M)
    grid = window_reverse(received[..., None], window, height, width)[..., 0]
    return grid / grid.flatten(1).sum(-1)[:, None, None]


def _plot_attention(face: np.ndarray, maps: list[np.ndarray], windows: Sequence[int], detected: np.ndarray,
                    given: np.ndarray | None, title: str) -> "Figure":
    """The face with its landmarks, then one panel per scale: the attention each region receives, over the face."""
    figure = new_figure(3.0 * (1 + len(maps)), 3.4)
    side = face.shape[0]
    axes = figure.add_subplot(1, 1 + len(maps), 1)
    axes.imshow(face)
    axes.scatter(detected[:, 0] * side, detected[:, 1] * side, s=6, c="red", label="landmark detector")
    if given is not None:
        axes.scatter(given[:, 0] * side, given[:, 1] * side, s=6, c="lime", label="faces stage")
    axes.set_xlim(0, side)
    axes.set_ylim(side, 0)
    axes.legend(loc="lower center", fontsize=6, framealpha=0.6)
    axes.set_title("face and landmarks", fontsize=8)
    axes.set_axis_off()
    for i, (grid, window) in enumerate(zip(maps, windows)):
        axes = figure.add_subplot(1, 1 + len(maps), 2 + i)
        axes.imshow(face)
        axes.imshow(grid, cmap="inferno", alpha=0.6, extent=(0, side, side, 0), interpolation="nearest")
        cells = grid.shape[0] // window
        for line in range(1, cells):     # window borders: attention never crosses them
            axes.axhline(line * side / cells, color="white", linewidth=0.6)
            axes.axvline(line * side / cells, color="white", linewidth=0.6)
        axes.set_title(f"scale {i + 1}: {grid.shape[0]}x{grid.shape[1]} tokens, {cells * cells} window(s)",
                       fontsize=8)
        axes.set_axis_off()
    figure.suptitle(f"{title}\nattention the landmark queries give each image region", fontsize=9)
    return figure


_DISTRIBUTION_NAMES = {"primary": "primary l", "geometric": "anchors t_g", "attentive": "attention t_a",
                       "correction": "correction t", "probabilities": "final L_final"}


def _plot_reliability(distributions: dict[str, np.ndarray], confidences: dict[str, float], label_names: list[str],
                      title: str) -> "Figure":
    """Grouped bars per class: the primary distribution, the corrections and the final corrected distribution."""
    classes = len(label_names)
    figure = new_figure(2.0 + 0.9 * classes, 3.4)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(distributions)
    for i, (name, values) in enumerate(distributions.items()):
        axes.bar(np.arange(classes) + (i - (len(distributions) - 1) / 2) * width, values, width,
                 label=f"{_DISTRIBUTION_NAMES[name]} (C_f {confidences[name]:.2f})")
    axes.set_xticks(range(classes), label_names, fontsize=8, rotation=30)
    axes.set_ylabel("probability")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7)
    axes.set_title(f"{title}\nreliability balancing: primary against corrected distribution", fontsize=9)
    return figure


@register_model("grefel", ablations=ABLATIONS)
def grefel(tiny: bool = False, *, num_classes: int = 7, image_backbone: str = "ir50",
           image_weights: str | None = None, landmark_weights: str | None = None,
           anchors_per_class: int | None = None, image_size: int | None = None, **options) -> GReFEL:
    """GReFEL at 224 px (IR-50 and MobileFaceNet at 112 px), or the tiny variant (64 px, tiny backbones, width 32).

    image_backbone: "ir50" (the paper's) or "resnet50" (a transformers ResNet). image_weights: for ir50 a released
    IR-50 file (face.evoLVe's backbone_ir50_ms1m_epoch120.pth, POSTER/POSTER++'s ir50.pth); for resnet50 a path or
    hub id of a transformers ResNet checkpoint (microsoft/resnet-50); None keeps a random one.
    landmark_weights: POSTER++'s MobileFaceNet landmark detector (mobilefacenet_model_best.pth.tar), loaded and
    frozen; None trains the detector here on the faces stage's landmarks, which must then be real unless
    allow_template_landmarks=True. anchors_per_class is K (module docstring: 10, tiny 3). Further options go to
    `GReFEL` (dims, heads, windows, embed_dim, fusion_depth, fusion_heads, correction_head_dim, hidden, dropout,
    delta, balancing, losses, lambdas, allow_template_landmarks).
    """
    if image_backbone not in IMAGE_BACKBONES:
        raise ValueError(f"image_backbone must be one of {IMAGE_BACKBONES}, got {image_backbone!r}")
    dims = {**(TINY_DIMS if tiny else BASE_DIMS), **options}
    if anchors_per_class is not None:
        dims["anchors_per_class"] = anchors_per_class
    size = image_size or (64 if tiny else 224)
    if image_backbone == "ir50":
        network = IRBackbone(**(TINY_IR if tiny else {}))
        if image_weights is not None:
            load_ir50_checkpoint(network, image_weights)
        stream = IRImageStream(network, dims["dims"])
    else:
        from transformers import ResNetBackbone, ResNetConfig

        network = (ResNetBackbone.from_pretrained(image_weights, out_features=RESNET_STAGES) if image_weights
                   else ResNetBackbone(ResNetConfig(**(TINY_RESNET if tiny else {}), out_features=RESNET_STAGES)))
        stream = ResNetImageStream(network, dims["dims"])
    detector = MobileFaceNet(size // 2, **(TINY_MOBILEFACENET if tiny else {}))
    if landmark_weights is not None:
        load_mobilefacenet_checkpoint(detector, landmark_weights)
    else:
        # A fresh detector's head ends in a BatchNorm whose output starts as N(0, 1), far outside the crop's [0, 1]
        # coordinates: start it at the crop's centre with a small spread instead (a choice; the release is trained).
        nn.init.constant_(detector.output_layer.bn.bias, 0.5)
        nn.init.constant_(detector.output_layer.bn.weight, 0.1)
    return GReFEL(stream, detector, num_classes=num_classes, image_size=size,
                  train_landmark_detector=landmark_weights is None, **dims)
