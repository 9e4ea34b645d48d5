"""SSM (Li et al., "Bidirectional Learning of Facial Action Units and Expressions via Structured Semantic Mapping
across Heterogeneous Datasets"): one model learns expressions from clip-level FE data and AUs from frame-level AU
data, both read against FACS text prototypes that a learnable prior mapping ties together.

Forward pass (paper §III and supplementary §E):
  E_v   CLIP ViT-B/16 vision encoder whose last 6 FFNs are mixtures of experts (Eq. S1, S2):
        y = E_s(x~) + gamma * sum_{j in TopK(g)} g^_j E_j(x~),  g = softmax(R x~),  x~ = LN(x),
        E_s the pretrained FFN (kept, under CLIP's own parameter names, so checkpoints load unchanged), E_j four
        private FFNs (768 -> 512 -> 768), top-2 gates re-normalised to sum to 1, gamma a learnable vector. CLIP's
        block already applies LN before its FFN, so the MoE module replaces `mlp` and receives x~ directly. The
        frames' projected CLIP embeddings f_1..f_n (Eqs. 1, 2) feed two 1-layer temporal transformers:
  Phi   expression: a class token over the clip -> Z^exp (Eq. 3); AU: every frame attends to every other and the
        centre frame t = floor(n/2) is kept -> Z^au (Eqs. 4, 5).
  TSP   K expression and M AU FACS texts, each prefixed by c = 8 learnable context tokens per task (CoOp; Eqs.
        17, 18), through the frozen CLIP text encoder -> T^exp (K, d), T^au (M, d) (Eq. 11), L2-normalised as CLIP
        embeddings are. Text forms (Table VIII): "compound" (the AU descriptions of Table S4), "standalone"
        ("a facial expression of happiness"), "words" ("happiness"); AU texts are their FACS description in every
        form. Logits are cosine similarities over a temperature tau = 0.01 (Eqs. 12, 13, 25).
  DPM   W^{au->exp} (K, M) and W^{exp->au} (M, K), both initialised from the row-normalised FACS prior P (Eq. 19;
        the reverse from its transpose, Eq. 20) and learnt independently:
        T~exp = softmax_row(W^{au->exp} / tau_m) T^au,  T~au = softmax_row(W^{exp->au} / tau_m) T^exp  (Eqs. 21, 22)
        T^exp <- T^exp + alpha T~exp,  T^au <- T^au + beta T~au,  alpha = beta = 0.1 learnable  (Eqs. 23, 24).
Loss (Eq. 14): 1/(1+lambda) L_dfe + lambda/(1+lambda) L_au, lambda = 2; L_dfe class-weighted cross-entropy over
the expression batch, L_au binary cross-entropy over the AU batch's known labels (NaN = unknown), optionally
weighted per AU. Each term keeps its Eq. 14 weight when it comes alone: the trainer forwards and backpropagates
the expression batch and the AU batch in separate calls, and the two calls add up to Eq. 14.

Ablations: Table V `tsp` / `dpm` (without TSP there is no text encoder and two linear heads read Z^exp and Z^au,
the paper's Baseline, Eq. 6; DPM needs TSP); Table VI `dpm_init` = "prior" | "random" (a random row-normalised
matrix) and `dpm_mode` = "dual" | "transposed" (one K x M matrix, used transposed for expression -> AU); Table VIII
`text_form`; Table IX `context_tokens`; `moe_layers=0` gives the plain CLIP encoder (for the MoE cost bench).

Choices the paper leaves open, taken from the authors' public code: each private expert has a GELU between its
two layers (Eq. S1 prints none), the router starts small (Xavier gain 0.1) and gamma at 0.1 so training starts
close to the pretrained encoder; the temporal transformers work on the 512-d projected embeddings (8 heads, MLP
1024) and are pre-norm with a final LayerNorm. The paper keeps private experts "separately for each task"; the
public code, followed here, shares one pool of 4 between both tasks, so a forward pass needs no task flag. The
public code's extras beyond the paper (linear heads summed with the text logits, a sigmoid-gated alpha/beta, a
pinned neutral row, router noise, unnormalised top-2 gates, class-specific contexts, AU predictions for every
frame, EMA and loss normalisation) are left out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                          CLIPVisionModelWithProjection, PreTrainedTokenizerBase)
from transformers.masking_utils import create_causal_mask

from .layers.optim import parameter_groups
from .losses import labelled_cross_entropy
from .registry import CLIP_MEAN, CLIP_STD, ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer

TEXT_FORMS = ("words", "standalone", "compound")
DPM_INITS = ("prior", "random")
DPM_MODES = ("dual", "transposed")

# CLIP ViT-B/16 (OpenAI). The text tower is CLIPTextConfig's default, the ViT-B/16 one.
BASE_VISION = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, projection_dim=512)
BASE_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77, projection_dim=512)
TINY_VISION = dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, projection_dim=16)
# 128 positions hold the longest FACS prompt tokenised by characters (8 context tokens + about 100 characters).
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=128, projection_dim=16)
BASE_OPTIONS = dict(num_frames=16, moe_layers=6, expert_hidden=512, temporal_heads=8, temporal_mlp=1024)
TINY_OPTIONS = dict(num_frames=4, moe_layers=1, expert_hidden=16, temporal_heads=2, temporal_mlp=32)

# The asset's prior values (pipeline/facs.py PRIOR_LINKED / PRIOR_OTHER), for the synthetic tiny prior.
_LINKED, _OTHER = 1.0, 0.02
# CoOp's placeholder word: the prompt is tokenised as "X X ... X <text>" and the X embeddings are replaced.
_PLACEHOLDER = "X"


class MoEFeedForward(nn.Module):
    """A CLIP FFN turned into a shared expert plus top-k routed private experts (Eq. S2).

    The shared expert keeps CLIPMLP's attribute names (fc1, fc2), so a CLIP state dict loads into the patched
    encoder unchanged; the router, private experts and gamma are the only new parameters.
    """

    def __init__(self, mlp: nn.Module, num_experts: int = 4, top_k: int = 2, expert_hidden: int = 512,
                 gamma: float = 0.1):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, {num_experts}], got {top_k}")
        self.fc1, self.fc2, self.activation_fn = mlp.fc1, mlp.fc2, mlp.activation_fn
        dim = self.fc1.in_features
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, expert_hidden), nn.GELU(), nn.Linear(expert_hidden, dim))
            for _ in range(num_experts))
        self.gamma = nn.Parameter(torch.full((dim,), gamma))
        nn.init.xavier_uniform_(self.router.weight, gain=0.1)
        nn.init.zeros_(self.router.bias)
        for expert in self.experts:
            for layer in (expert[0], expert[2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def shared(self, hidden: Tensor) -> Tensor:
        """E_s: the pretrained CLIP FFN."""
        return self.fc2(self.activation_fn(self.fc1(hidden)))

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (N, D) -> the top-k gate weights re-normalised to sum to 1 (N, k) and their experts (N, k)."""
        gates = self.router(tokens).softmax(dim=-1)
        weights, experts = gates.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, hidden: Tensor) -> Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        weights, chosen = self.route(tokens)
        private = torch.zeros_like(tokens)
        # Each expert runs only on the tokens routed to it (sparse compute), scattered back weighted.
        for index, expert in enumerate(self.experts):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            if token.numel():
                routed = expert(tokens[token]) * weights[token, slot, None]
                private.index_add_(0, token, routed.to(private.dtype))   # experts may run in lower precision
        return self.shared(hidden) + self.gamma * private.view_as(hidden)


def add_moe(vision: CLIPVisionModelWithProjection, layers: int, **options) -> None:
    """Replace the FFNs of the last `layers` blocks of a CLIP vision encoder by MoEFeedForward, in place."""
    blocks = vision.vision_model.encoder.layers
    if not 0 <= layers <= len(blocks):
        raise ValueError(f"moe_layers must lie in [0, {len(blocks)}], got {layers}")
    for block in blocks[len(blocks) - layers:]:
        block.mlp = MoEFeedForward(block.mlp, **options)


class TemporalTransformer(nn.Module):
    """Phi: one pre-norm transformer layer over the frame embeddings (B, T, D), with learnt positions.

    pool="cls": a class token summarises the clip -> (B, D) (expressions); pool="centre": the temporally enhanced
    centre frame floor(T/2) -> (B, D) (AUs).
    """

    def __init__(self, dim: int, frames: int, pool: str, heads: int = 8, mlp_dim: int = 1024, layers: int = 1):
        super().__init__()
        if pool not in ("cls", "centre"):
            raise ValueError(f"pool must be 'cls' or 'centre', got {pool!r}")
        self.pool, self.frames = pool, frames
        tokens = frames + (pool == "cls")
        self.positions = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: Tensor) -> Tensor:
        if self.cls_token is not None:
            frames = torch.cat([self.cls_token.expand(frames.shape[0], -1, -1), frames], dim=1)
        encoded = self.norm(self.transformer(frames + self.positions))
        return encoded[:, 0] if self.pool == "cls" else encoded[:, self.frames // 2]


class DynamicPriorMapping(nn.Module):
    """DPM: learnable AU -> expression (K, M) and expression -> AU (M, K) maps over the text prototypes."""

    def __init__(self, prior: Tensor, init: str = "prior", mode: str = "dual", tau: float = 0.01,
                 alpha: float = 0.1, beta: float = 0.1):
        super().__init__()
        if init not in DPM_INITS:
            raise ValueError(f"dpm_init must be one of {DPM_INITS}, got {init!r}")
        if mode not in DPM_MODES:
            raise ValueError(f"dpm_mode must be one of {DPM_MODES}, got {mode!r}")
        start = prior if init == "prior" else torch.rand(prior.shape)
        start = start / start.sum(dim=1, keepdim=True)                          # Eq. 19
        self.tau, self.mode = tau, mode
        self.au_to_expression = nn.Parameter(start.clone())
        self.expression_to_au = nn.Parameter(start.T.clone()) if mode == "dual" else None   # Eq. 20
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def maps(self) -> tuple[Tensor, Tensor]:
        """The row-softmax maps actually applied: AU -> expression (K, M) and expression -> AU (M, K)."""
        reverse = self.au_to_expression.T if self.expression_to_au is None else self.expression_to_au
        return (self.au_to_expression / self.tau).softmax(dim=1), (reverse / self.tau).softmax(dim=1)

    def forward(self, expression_texts: Tensor, au_texts: Tensor) -> tuple[Tensor, Tensor]:
        au_to_expression, expression_to_au = self.maps()
        mapped_expression = au_to_expression @ au_texts                          # Eq. 21
        mapped_au = expression_to_au @ expression_texts                          # Eq. 22
        return expression_texts + self.alpha * mapped_expression, au_texts + self.beta * mapped_au   # Eqs. 23, 24


class SSM(nn.Module):
    """SSM for joint expression recognition and AU detection. Build it with `create_model("ssm", ...)`; see the
    module docstring for the design."""

    tasks = ("expression", "au")

    def __init__(self, vision: CLIPVisionModelWithProjection, text_encoder: CLIPTextModelWithProjection | None,
                 tokenizer: PreTrainedTokenizerBase | None, *, expression_names: Sequence[str],
                 expression_texts: Sequence[str], au_names: Sequence[str], au_texts: Sequence[str], prior: Tensor,
                 num_frames: int = 16, tsp: bool = True, dpm: bool = True, dpm_init: str = "prior",
                 dpm_mode: str = "dual", context_tokens: int = 8, tau: float = 0.01, tau_m: float = 0.01,
                 alpha: float = 0.1, beta: float = 0.1, lam: float = 2.0, moe_layers: int = 6,
                 num_experts: int = 4, top_k: int = 2, expert_hidden: int = 512, gamma: float = 0.1,
                 temporal_heads: int = 8, temporal_mlp: int = 1024, au_weights: Sequence[float] | None = None,
                 backbone_lr_scale: float = 1.0):
        super().__init__()
        num_classes, num_aus = len(expression_names), len(au_names)
        if num_classes < 2 or num_aus < 1:
            raise ValueError(f"SSM needs at least 2 expression classes and 1 AU, got {num_classes} and {num_aus}")
        if (len(expression_texts), len(au_texts)) != (num_classes, num_aus):
            raise ValueError(f"{len(expression_texts)} expression texts for {num_classes} classes, "
                             f"{len(au_texts)} AU texts for {num_aus} AUs")
        if tuple(prior.shape) != (num_classes, num_aus):
            raise ValueError(f"the prior must be K x M = {num_classes} x {num_aus}, got {tuple(prior.shape)}")
        if dpm and not tsp:
            raise ValueError("DPM maps the TSP text prototypes: dpm=True needs tsp=True")
        if tsp and (text_encoder is None or tokenizer is None):
            raise ValueError("tsp=True needs a CLIP text encoder and its tokenizer")
        if lam < 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        self.expression_names, self.au_names = list(expression_names), list(au_names)
        self.num_classes, self.num_aus, self.num_frames = num_classes, num_aus, num_frames
        self.tsp, self.tau, self.lam, self.backbone_lr_scale = tsp, tau, lam, backbone_lr_scale
        config = vision.config
        self.inputs = ModelInputs(frames=num_frames, image_size=config.image_size, mean=CLIP_MEAN, std=CLIP_STD)

        self.vision = vision
        add_moe(vision, moe_layers, num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden, gamma=gamma)
        dim = config.projection_dim
        self.expression_temporal = TemporalTransformer(dim, num_frames, "cls", temporal_heads, temporal_mlp)
        self.au_temporal = TemporalTransformer(dim, num_frames, "centre", temporal_heads, temporal_mlp)
        self.register_buffer("prior", prior / prior.sum(dim=1, keepdim=True))
        self.register_buffer("au_weights", torch.ones(num_aus) if au_weights is None
                             else torch.as_tensor(au_weights, dtype=torch.float32))
        if tuple(self.au_weights.shape) != (num_aus,) or (self.au_weights < 0).any():
            raise ValueError(f"au_weights must be {num_aus} non-negative values, got {au_weights}")

        self.text_encoder = text_encoder if tsp else None
        self.dpm = DynamicPriorMapping(self.prior, dpm_init, dpm_mode, tau_m, alpha, beta) if dpm else None
        if tsp:
            if text_encoder.config.projection_dim != dim:
                raise ValueError(f"text and vision projections differ: {text_encoder.config.projection_dim} vs {dim}")
            text_encoder.requires_grad_(False)
            width = text_encoder.config.hidden_size
            self.expression_context = nn.Parameter(torch.randn(context_tokens, width) * 0.02)
            self.au_context = nn.Parameter(torch.randn(context_tokens, width) * 0.02)
            ids, eos = _prompt_ids(tokenizer, [*expression_texts, *au_texts], context_tokens,
                                   text_encoder.config.max_position_embeddings)
            # Derived from the texts at build time, so not saved with the weights.
            self.register_buffer("prompt_ids", ids, persistent=False)
            self.register_buffer("prompt_eos", eos, persistent=False)
        else:
            self.expression_head = nn.Linear(dim, num_classes)
            self.au_head = nn.Linear(dim, num_aus)

    def train(self, mode: bool = True) -> "SSM":
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()   # frozen: its dropout stays off
        return self

    # ----- encoders -------------------------------------------------------------------------------------------

    def encode_frames(self, frames: Tensor) -> Tensor:
        """Frames (B, T, 3, S, S), CLIP-normalised -> projected CLIP frame embeddings f_1..f_T (B, T, d)."""
        size = self.vision.config.image_size
        expected = (self.num_frames, 3, size, size)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"SSM expects frames of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")
        embeddings = self.vision(pixel_values=frames.flatten(0, 1)).image_embeds
        return embeddings.view(*frames.shape[:2], -1)

    def encode_prompts(self) -> tuple[Tensor, Tensor]:
        """TSP: the K expression and M AU prompts, context tokens spliced in after BOS, through the frozen text
        encoder -> T^exp (K, d), T^au (M, d). Follows CLIPTextModel.forward, which takes no input embeddings."""
        text = self.text_encoder.text_model
        ids = self.prompt_ids
        context = torch.cat([self.expression_context.expand(self.num_classes, -1, -1),
                             self.au_context.expand(self.num_aus, -1, -1)])
        tokens = text.embeddings.token_embedding(ids)
        tokens = torch.cat([tokens[:, :1], context.to(tokens.dtype), tokens[:, 1 + context.shape[1]:]], dim=1)
        hidden = text.embeddings(inputs_embeds=tokens)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        pooled = text.final_layer_norm(hidden)[torch.arange(ids.shape[0], device=ids.device), self.prompt_eos]
        prototypes = self.text_encoder.text_projection(pooled)
        return prototypes[:self.num_classes], prototypes[self.num_classes:]

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """The classifier weights: T^exp (K, d) and T^au (M, d), normalised, after DPM when it is on."""
        expression, au = (F.normalize(t, dim=-1) for t in self.encode_prompts())
        return (expression, au) if self.dpm is None else self.dpm(expression, au)

    # ----- forward --------------------------------------------------------------------------------------------

    def forward(self, frames: Tensor) -> dict[str, Tensor]:
        """Frames (B, T, 3, S, S) -> "logits" (B, K) from the whole clip and "au_logits" (B, M) for its centre
        frame."""
        per_frame = self.encode_frames(frames)
        expression = self.expression_temporal(per_frame)
        au = self.au_temporal(per_frame)
        if not self.tsp:
            logits, au_logits = self.expression_head(expression), self.au_head(au)   # Eq. 6
        else:
            expression_texts, au_texts = self.prototypes()
            logits = F.normalize(expression, dim=-1) @ F.normalize(expression_texts, dim=-1).T / self.tau
            au_logits = F.normalize(au, dim=-1) @ F.normalize(au_texts, dim=-1).T / self.tau
        return {"logits": logits, "au_logits": au_logits}

    # ----- objective ------------------------------------------------------------------------------------------

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Eq. 14 over an expression batch and/or an AU batch, each term at its own weight 1/(1+lambda) or
        lambda/(1+lambda) whether or not the other is there. Returns "loss" and the detached parts "dfe" and "au"
        that were computed; a batch without a single label adds nothing (a zero loss, still on the graph)."""
        parts, shares = {}, {"dfe": 1.0 / (1.0 + self.lam), "au": self.lam / (1.0 + self.lam)}
        if "expression" in outputs:
            logits = outputs["expression"]["logits"]
            labels = torch.as_tensor(batches["expression"]["labels"], device=logits.device)
            if (labels >= 0).any():
                parts["dfe"] = labelled_cross_entropy(logits, labels, class_weights)   # Eq. 12
        if "au" in outputs:
            logits = outputs["au"]["au_logits"]
            targets = torch.as_tensor(batches["au"]["au"], dtype=torch.float32, device=logits.device)
            known = ~torch.isnan(targets)
            if known.any():
                parts["au"] = self._au_loss(logits, targets, known)                 # Eq. 13
        # The zero keeps every output on the graph, so distributed backward sees the same parameters each call.
        total = sum(output.float().sum() for task in outputs.values() for output in task.values()) * 0.0
        total = total + sum(parts[name] * shares[name] for name in parts)
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def _au_loss(self, logits: Tensor, targets: Tensor, known: Tensor) -> Tensor:
        """BCE averaged over the known (sample, AU) pairs, each weighted by its AU's weight."""
        # NaN targets are zeroed before the BCE: a NaN would poison the sum even where its weight is 0.
        per_label = F.binary_cross_entropy_with_logits(logits.float(), torch.where(known, targets, 0.0),
                                                       reduction="none")
        weights = known * self.au_weights
        return (per_label * weights).sum() / weights.sum().clamp_min(1e-12)

    # ----- optimisation ---------------------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float = 0.05) -> list[dict]:
        """AdamW groups: the pretrained CLIP vision weights at lr * backbone_lr_scale (the paper gives no separate
        rate; the public code trains the whole encoder at 1e-6 against 1e-4), every new part (MoE routers,
        experts and gamma, temporal models, context tokens, DPM, heads) at lr. No weight decay on 1-D parameters,
        nor on the DPM maps, where decay would pull every row towards uniform and erase the prior."""
        moe = [module for module in self.vision.modules() if isinstance(module, MoEFeedForward)]
        new_in_backbone = {id(p) for module in moe
                           for p in (*module.router.parameters(), *module.experts.parameters(), module.gamma)}
        no_decay = set() if self.dpm is None else {id(p) for p in self.dpm.parameters()}
        pretrained = {name for name, p in self.named_parameters()
                      if name.startswith("vision.") and id(p) not in new_in_backbone}
        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay,
                                group_of=lambda name: "visual_encoder" if name in pretrained else "new",
                                lr_scale_of=lambda name: self.backbone_lr_scale if name in pretrained else 1.0,
                                no_decay=lambda name, p: id(p) in no_decay)

    # ----- registry convention --------------------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        size = self.vision.config.image_size
        frames = torch.randn(batch_size, self.num_frames, 3, size, size, generator=generator)
        return {"frames": frames.to(self.prior.device)}

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        return {"frames": batch["frames"].to(self.prior.device)}

    # ----- explanation ----------------------------------------------------------------------------------------

    def explain(self, batch: dict | None, out_dir: str | Path) -> list[Path]:
        """Draw the learnt DPM maps beside the maps the FACS prior gives (both as applied: row softmax over
        tau_m), AU -> expression on top, expression -> AU below, in one PNG. The maps do not depend on the input;
        `batch` is taken for the common explain signature."""
        if self.dpm is None:
            raise ValueError("this SSM has no DPM (dpm=False): there are no mapping matrices to draw")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        with torch.no_grad():
            learnt = [m.float().cpu().numpy() for m in self.dpm.maps()]
            prior = self.prior.float().cpu()
            from_prior = [(prior / self.dpm.tau).softmax(dim=1).numpy(),
                          (prior.T / self.dpm.tau).softmax(dim=1).numpy()]
        rows = (("AU -> expression", self.expression_names, self.au_names),
                ("expression -> AU", self.au_names, self.expression_names))
        width = 2 + 0.3 * (self.num_classes + self.num_aus)
        # A bare Figure on the Agg canvas: no pyplot global state, works headless and in worker threads.
        figure = Figure(figsize=(2 * width, 1.6 * width))
        FigureCanvasAgg(figure)
        grid = figure.subplots(2, 2)
        for row, (title, row_names, column_names) in enumerate(rows):
            for column, (kind, matrix) in enumerate((("FACS prior", from_prior[row]), ("learnt", learnt[row]))):
                axes = grid[row, column]
                image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
                axes.set_xticks(range(len(column_names)), column_names, rotation=45, ha="right", fontsize=8)
                axes.set_yticks(range(len(row_names)), row_names, fontsize=8)
                axes.set_title(f"{title}: {kind}")
                figure.colorbar(image, ax=axes)
        figure.tight_layout()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "ssm_dpm_maps.png"
        figure.savefig(path, format="png", dpi=100)
        return [path]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], context_tokens: int,
                max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids of "X * c + text" per text (N, L), padded, and each prompt's EOS position (N,).

    The X positions 1..c are where the context vectors go. The encoder pools at the first EOS, as CLIP does (its
    tokenizer pads with EOS too); a BERT-style tokenizer (the tiny one) ends with [SEP] instead.
    """
    placeholder = tokenizer(_PLACEHOLDER, add_special_tokens=False).input_ids
    if len(placeholder) != 1:
        raise ValueError(f"the tokenizer splits the context placeholder {_PLACEHOLDER!r} into {placeholder}")
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prompts = [" ".join([_PLACEHOLDER] * context_tokens + [text]) for text in texts]
    ids = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").input_ids
    if not (ids[:, 1:1 + context_tokens] == placeholder[0]).all():
        raise ValueError("the tokenizer does not start prompts with one BOS token before the context placeholders")
    is_eos = ids == eos_id
    if not is_eos.any(dim=1).all():
        raise ValueError(f"a prompt has no EOS token (id {eos_id})")
    return ids, is_eos.int().argmax(dim=1)


def _facs_lists(facs: dict, text_form: str, num_classes: int,
                au_names: Sequence[str] | None) -> tuple[list[str], list[str], list[str], list[str], Tensor]:
    """Names, texts in `text_form` and the row-normalised K x M prior from the FACS asset rows, cross-checked."""
    missing = {"expression", "au", "prior"} - set(facs)
    if missing:
        raise ValueError(f"facs must hold the 'expression', 'au' and 'prior' rows; missing {sorted(missing)}")
    expression, au, prior = facs["expression"], facs["au"], facs["prior"]
    if len(expression["names"]) != num_classes:
        raise ValueError(f"num_classes is {num_classes} but the FACS expression set '{expression['asset_id']}' "
                         f"has {len(expression['names'])} classes")
    if au_names is not None and list(au_names) != list(au["names"]):
        raise ValueError(f"AU names {list(au_names)} differ from the FACS AU set '{au['asset_id']}': {au['names']}")
    if (list(prior["names"]), list(prior["au_names"])) != (list(expression["names"]), list(au["names"])):
        raise ValueError(f"the prior row '{prior['asset_id']}' pairs other label sets than "
                         f"'{expression['asset_id']}' and '{au['asset_id']}'")
    return (list(expression["names"]), list(expression[text_form]), list(au["names"]), list(au[text_form]),
            torch.tensor(np.asarray(prior["prior_normalised"], dtype=np.float32)))


def _synthetic_lists(num_classes: int, au_names: Sequence[str] | None) -> tuple[list[str], list[str], list[str],
                                                                                 list[str], Tensor]:
    """Tiny smoke builds without the asset: made-up names and texts, and a fixed random prior in the asset's form."""
    expression_names = [f"class{k}" for k in range(num_classes)]
    au_names = list(au_names) if au_names is not None else ["AU1", "AU2", "AU4", "AU12"]
    linked = torch.rand(num_classes, len(au_names), generator=torch.Generator().manual_seed(0)) < 0.4
    prior = torch.where(linked, _LINKED, _OTHER)
    return (expression_names, [f"facial expression {k}" for k in range(num_classes)], au_names,
            [f"action unit {name}" for name in au_names], prior / prior.sum(dim=1, keepdim=True))


@register_model("ssm")
def ssm(tiny: bool = False, *, num_classes: int = 7, facs: dict | None = None, clip: str | None = None,
        text_form: str = "compound", tsp: bool = True, dpm: bool = True, dpm_init: str = "prior",
        dpm_mode: str = "dual", lam: float = 2.0, au_names: Sequence[str] | None = None, **options) -> SSM:
    """SSM on CLIP ViT-B/16, or the tiny variant (32 px, 4 frames, width 32, MoE in the last of 2 blocks).

    facs: {"expression": row, "au": row, "prior": row} of the FACS asset (affectprep.pipeline.facs.asset_rows());
    the AU row fixes the AUs. None is accepted for tiny builds only: names, texts and a random prior are made up.
    clip: a CLIP checkpoint (folder or cached hub id) whose vision and text towers and tokenizer are loaded with
    `from_pretrained`; None builds random towers, tokenised by characters (`tiny_tokenizer`; real size truncates
    prompts to CLIP's 77 positions). Further options go to `SSM` (context_tokens, tau, tau_m, alpha, beta,
    moe_layers, num_experts, top_k, expert_hidden, gamma, num_frames, temporal_heads, temporal_mlp, au_weights,
    backbone_lr_scale).
    """
    if text_form not in TEXT_FORMS:
        raise ValueError(f"text_form must be one of {TEXT_FORMS}, got {text_form!r}")
    if facs is not None:
        lists = _facs_lists(facs, text_form, num_classes, au_names)
    elif tiny:
        lists = _synthetic_lists(num_classes, au_names)
    else:
        raise ValueError("SSM needs the FACS asset (facs={'expression': row, 'au': row, 'prior': row}) for its "
                         "texts and prior; only tiny builds make them up")
    expression_names, expression_texts, au_list, au_texts, prior = lists
    if clip is not None:
        # The projection width lives on the joint CLIPConfig; the tower configs' own default (512) may differ.
        config = CLIPConfig.from_pretrained(clip)
        config.vision_config.projection_dim = config.text_config.projection_dim = config.projection_dim
        vision = CLIPVisionModelWithProjection.from_pretrained(clip, config=config.vision_config)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(clip, config=config.text_config) if tsp else None
        tokenizer = load_tokenizer(clip) if tsp else None
    else:
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**(TINY_VISION if tiny else BASE_VISION)))
        tokenizer = tiny_tokenizer() if tsp else None
        text_encoder = None
        if tsp:
            # The tokenizer's special ids go into the config so the encoder's own pooling agrees with ours.
            special = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                           pad_token_id=tokenizer.pad_token_id)
            text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**(TINY_TEXT if tiny else BASE_TEXT),
                                                                      **special))
    sizes = {**(TINY_OPTIONS if tiny else BASE_OPTIONS), **options}
    return SSM(vision, text_encoder, tokenizer, expression_names=expression_names, expression_texts=expression_texts,
               au_names=au_list, au_texts=au_texts, prior=prior, tsp=tsp, dpm=dpm, dpm_init=dpm_init,
               dpm_mode=dpm_mode, lam=lam, **sizes)
