"""SSM (Li et al., "Bidirectional Learning of Facial Action Units and Expressions via Structured Semantic Mapping
across Heterogeneous Datasets"): one model learns expressions from clip-level FE data and AUs from frame-level AU
data, both read against FACS text prototypes that a learnable prior mapping ties together.

Forward pass of one batch of one task (paper §III and supplementary §E):
  E_v   CLIP ViT-B/16 vision encoder whose last 6 FFNs are mixtures of experts (Eqs. S1, S2; layers/moe.py): the
        pretrained FFN as the shared expert, and per task a router and 4 private experts (768 -> 512 -> 768),
        top-2, gamma learnable. The batch's task picks the private experts ("maintained separately for each
        task"). The frames' projected CLIP embeddings f_1..f_n (Eqs. 1, 2) feed the task's temporal model:
  Phi   1-layer transformers: expression, a class token over the clip -> Z^exp (Eq. 3); AU, every frame attends
        to every other and the centre frame t = floor(n/2), the labelled one, is kept -> Z^au (Eqs. 4, 5).
  TSP   K expression and M AU FACS texts, each prefixed by c = 8 learnable context tokens per task (CoOp; Eqs.
        17, 18), through the frozen CLIP text encoder -> T^exp (K, d), T^au (M, d) (Eq. 11), L2-normalised as CLIP
        embeddings are. Text forms (Table VIII): "compound" (the AU descriptions of Table S4), "standalone"
        ("a facial expression of happiness"), "words" ("happiness"); AU texts are their FACS description in every
        form. Logits are cosine similarities over a temperature tau = 0.01 (Eqs. 12, 13, 25).
  DPM   W^{au->exp} (K, M) and W^{exp->au} (M, K), both initialised from the row-normalised FACS prior P (Eq. 19;
        the reverse from its transpose, Eq. 20) and learnt independently:
        T~exp = softmax_row(W^{au->exp} / tau_m) T^au,  T~au = softmax_row(W^{exp->au} / tau_m) T^exp  (Eqs. 21, 22)
        T^exp <- T^exp + alpha T~exp,  T^au <- T^au + beta T~au,  alpha = beta = 0.1 learnable  (Eqs. 23, 24).
        At tau_m = 0.01 the row softmax of the prior is saturated: the FACS-linked entries share almost all of
        their row's mass, and the gradient reaching an unlinked entry is 1e-9 of a linked one's or less, so
        training moves the linked entries (and every entry of a row without links, neutral's) and leaves the rest
        where the prior put them. The paper's tau_m is the default; `tau_m` changes it.
Loss: Eq. 14, 1/(1+lambda) L_dfe + lambda/(1+lambda) L_au with lambda = 2, over an expression batch and an AU batch
forwarded in separate calls (the trainer backpropagates each; the two calls add up to Eq. 14). L_dfe (Eq. 12) is
the cross-entropy averaged over the batch's labelled clips (class-weighted if the trainer passes weights). L_au
(Eq. 13) sums the binary cross-entropy over the M AUs and averages over the batch's samples; an AU whose label is
unknown (NaN) adds nothing, and a sample with no known AU does not count in B. A single-task model (`tasks`) has
one term, unweighted.

A batch is an AU batch when it carries AU labels ("au"; the BP4D and DISFA adapters give every sample one,
expression datasets none), else an expression batch: `batch_inputs` passes the task to forward.

Ablations (the paper's tables, registered below as `Ablation` rows):
  Table V    `tsp` / `dpm`: without TSP there is no text encoder and linear heads read Z^exp and Z^au (the paper's
             Baseline, Eq. 6); DPM needs TSP. STL (§IV-B): one task (`tasks`), the standard CLIP encoder
             (`moe_layers=0`) and a linear head.
  Table VI   `dpm_init` = "prior" | "random" (a random row-normalised matrix); `dpm_mode` = "dual" (two matrices)
             | "transposed" (one K x M matrix, used transposed for expression -> AU).
  Table VII  `dpm_mode` = "linear" | "mlp" (the mapping replaced by a learnable linear map or a two-layer MLP over
             the label axis) | "frozen" (the DPM matrices fixed at their `dpm_init` values).
  Table VIII `text_form`; Table IX `context_tokens`; Table S3 `alpha`, `beta` (initial values); Tables S1/S2 the
             trainer's `expression_fraction` / `au_fraction`; Table XI the trainer's `fold` / `au_fold`.
  `moe_layers=0` also gives the plain CLIP encoder for the MoE cost bench.

Choices the paper leaves open, taken from the authors' public code: the private experts' GELU (see
layers/moe.py), router and gamma initialisation; the temporal transformers work on the 512-d projected embeddings
(8 heads, MLP 1024) and are pre-norm with a final LayerNorm. The public code shares one pool of private experts
between the tasks; the paper keeps them per task, and so do we. The public code's extras beyond the paper (linear
heads summed with the text logits, a sigmoid-gated alpha/beta, a pinned neutral row, router noise, un-normalised
top-2 gates, class-specific contexts, AU predictions for every frame, EMA and loss normalisation) are left out.
Its BP4D prior links disgust to AU17 where Table S4 says AU15; the FACS asset follows Table S4.
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

from .layers.moe import add_moe, routed_to
from .layers.optim import parameter_groups
from .losses import labelled_cross_entropy
from .registry import CLIP_MEAN, CLIP_STD, Ablation, ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer
from .figures import new_figure, write_explanation

TASKS = ("expression", "au")
TEXT_FORMS = ("words", "standalone", "compound")
DPM_INITS = ("prior", "random")
MATRIX_MODES = ("dual", "transposed", "frozen")     # the paper's DPM matrices (Table VI; frozen: Table VII)
REPLACEMENT_MODES = ("linear", "mlp")               # Table VII: the mapping replaced
DPM_MODES = MATRIX_MODES + REPLACEMENT_MODES

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


class TemporalTransformer(nn.Module):
    """Phi: one pre-norm transformer layer over the frame embeddings (B, T, D), with learnt positions.

    pool="cls": a class token summarises the clip -> (B, D) (expressions, Eq. 3); pool="centre": the temporally
    enhanced centre frame floor(T/2) -> (B, D) (AUs, Eqs. 4-5).
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


class CrossTaskMapping(nn.Module):
    """The residual update of both prototype sets by their mapped counterparts (Eqs. 23, 24), alpha and beta
    learnable; subclasses say how T~exp and T~au are made from T^au and T^exp."""

    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def mapped(self, expression_texts: Tensor, au_texts: Tensor) -> tuple[Tensor, Tensor]:
        """T^exp (K, d), T^au (M, d) -> T~exp (K, d), T~au (M, d)."""
        raise NotImplementedError

    def forward(self, expression_texts: Tensor, au_texts: Tensor) -> tuple[Tensor, Tensor]:
        mapped_expression, mapped_au = self.mapped(expression_texts, au_texts)
        return expression_texts + self.alpha * mapped_expression, au_texts + self.beta * mapped_au   # Eqs. 23, 24


class DynamicPriorMapping(CrossTaskMapping):
    """DPM (§III-D): AU -> expression (K, M) and expression -> AU (M, K) matrices over the text prototypes.

    init "prior": the row-normalised FACS prior (Eq. 19), the reverse its transpose (Eq. 20); "random": a uniform
    random matrix, row-normalised the same way (Table VI "R init."). mode "dual": both matrices learnt
    independently; "transposed": one matrix, its transpose used for expression -> AU (Table VI without "Dual");
    "frozen": both fixed at their initial values (Table VII "Frozen": "the DPM weight matrix is no longer learned";
    alpha and beta still learn)."""

    def __init__(self, prior: Tensor, init: str = "prior", mode: str = "dual", tau: float = 0.01,
                 alpha: float = 0.1, beta: float = 0.1):
        super().__init__(alpha, beta)
        if init not in DPM_INITS:
            raise ValueError(f"dpm_init must be one of {DPM_INITS}, got {init!r}")
        if mode not in MATRIX_MODES:
            raise ValueError(f"DynamicPriorMapping modes are {MATRIX_MODES}, got {mode!r}")
        start = prior if init == "prior" else torch.rand(prior.shape)
        start = start / start.sum(dim=1, keepdim=True)                          # Eq. 19
        self.tau, self.mode = tau, mode
        if mode == "frozen":
            # Buffers: saved with the model, never handed to the optimiser.
            self.register_buffer("au_to_expression", start.clone())
            self.register_buffer("expression_to_au", start.T.clone())
        else:
            self.au_to_expression = nn.Parameter(start.clone())
            self.expression_to_au = nn.Parameter(start.T.clone()) if mode == "dual" else None   # Eq. 20

    def maps(self) -> tuple[Tensor, Tensor]:
        """The row-softmax maps actually applied: AU -> expression (K, M) and expression -> AU (M, K)."""
        reverse = self.au_to_expression.T if self.expression_to_au is None else self.expression_to_au
        return (self.au_to_expression / self.tau).softmax(dim=1), (reverse / self.tau).softmax(dim=1)

    def mapped(self, expression_texts: Tensor, au_texts: Tensor) -> tuple[Tensor, Tensor]:
        au_to_expression, expression_to_au = self.maps()
        return au_to_expression @ au_texts, expression_to_au @ expression_texts          # Eqs. 21, 22


class LabelAxisMapping(CrossTaskMapping):
    """Table VII's replacements for the DPM matrices: "Linear" and "MLP".

    The table contrasts them with DPM because "the DPM essentially performs a two-dimensional mapping" (M AU
    prototypes -> K expression prototypes and back), so each direction here maps along the label axis, feature by
    feature: "linear" a learnable K x M (M x K) weight plus bias, "mlp" M -> hidden -> K with a GELU; no prior, no
    row softmax, and the residual update of Eqs. 23-24 kept, so only the mapping differs from DPM. The paper gives
    neither the MLP's width nor an initialisation: hidden = K + M, PyTorch's default Linear initialisation."""

    def __init__(self, num_classes: int, num_aus: int, kind: str, alpha: float = 0.1, beta: float = 0.1):
        super().__init__(alpha, beta)
        if kind not in REPLACEMENT_MODES:
            raise ValueError(f"LabelAxisMapping kinds are {REPLACEMENT_MODES}, got {kind!r}")
        self.kind = kind
        self.au_to_expression = self._map(num_aus, num_classes, num_classes + num_aus)
        self.expression_to_au = self._map(num_classes, num_aus, num_classes + num_aus)

    def _map(self, inputs: int, outputs: int, hidden: int) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(inputs, outputs)
        return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, outputs))

    def mapped(self, expression_texts: Tensor, au_texts: Tensor) -> tuple[Tensor, Tensor]:
        return self.au_to_expression(au_texts.T).T, self.expression_to_au(expression_texts.T).T


class SSM(nn.Module):
    """SSM for joint expression recognition and AU detection (or one of them: `tasks`). Build it with
    `create_model("ssm", ...)`; see the module docstring for the design."""

    def __init__(self, vision: CLIPVisionModelWithProjection, text_encoder: CLIPTextModelWithProjection | None,
                 tokenizer: PreTrainedTokenizerBase | None, *, tasks: Sequence[str] = TASKS,
                 expression_names: Sequence[str] = (), expression_texts: Sequence[str] = (),
                 au_names: Sequence[str] = (), au_texts: Sequence[str] = (), prior: Tensor | None = None,
                 num_frames: int = 16, tsp: bool = True, dpm: bool = True, dpm_init: str = "prior",
                 dpm_mode: str = "dual", context_tokens: int = 8, tau: float = 0.01, tau_m: float = 0.01,
                 alpha: float = 0.1, beta: float = 0.1, lam: float = 2.0, moe_layers: int = 6,
                 num_experts: int = 4, top_k: int = 2, expert_hidden: int = 512, expert_activation: str = "gelu",
                 gamma: float = 0.1, temporal_heads: int = 8, temporal_mlp: int = 1024,
                 au_weights: Sequence[float] | None = None, backbone_lr_scale: float = 1.0):
        super().__init__()
        self.tasks = _tasks(tasks)
        num_classes, num_aus = len(expression_names), len(au_names)
        if "expression" in self.tasks and num_classes < 2:
            raise ValueError(f"SSM needs at least 2 expression classes, got {num_classes}")
        if "au" in self.tasks and num_aus < 1:
            raise ValueError("SSM needs at least 1 AU to detect")
        if (len(expression_texts), len(au_texts)) != (num_classes, num_aus):
            raise ValueError(f"{len(expression_texts)} expression texts for {num_classes} classes, "
                             f"{len(au_texts)} AU texts for {num_aus} AUs")
        if dpm and not tsp:
            raise ValueError("DPM maps the TSP text prototypes: dpm=True needs tsp=True")
        if dpm and len(self.tasks) < 2:
            raise ValueError(f"DPM maps between the two tasks' prototypes; a model of {self.tasks[0]} only needs "
                             f"dpm=False")
        if dpm and (prior is None or tuple(prior.shape) != (num_classes, num_aus)):
            raise ValueError(f"DPM needs the K x M = {num_classes} x {num_aus} FACS prior, got "
                             f"{None if prior is None else tuple(prior.shape)}")
        if dpm_mode not in DPM_MODES or dpm_init not in DPM_INITS:
            raise ValueError(f"dpm_mode must be one of {DPM_MODES} and dpm_init one of {DPM_INITS}, got "
                             f"{dpm_mode!r} and {dpm_init!r}")
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
        add_moe(vision, moe_layers, self.tasks, num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden,
                gamma=gamma, expert_activation=expert_activation)
        dim = config.projection_dim
        if "expression" in self.tasks:
            self.expression_temporal = TemporalTransformer(dim, num_frames, "cls", temporal_heads, temporal_mlp)
        if "au" in self.tasks:
            self.au_temporal = TemporalTransformer(dim, num_frames, "centre", temporal_heads, temporal_mlp)
        self.register_buffer("au_weights", torch.ones(num_aus) if au_weights is None
                             else torch.as_tensor(au_weights, dtype=torch.float32))
        if tuple(self.au_weights.shape) != (num_aus,) or (self.au_weights < 0).any():
            raise ValueError(f"au_weights must be {num_aus} non-negative values, got {au_weights}")

        self.text_encoder = text_encoder if tsp else None
        self.dpm: CrossTaskMapping | None = None
        if dpm:
            self.register_buffer("prior", prior / prior.sum(dim=1, keepdim=True))
            self.dpm = (DynamicPriorMapping(self.prior, dpm_init, dpm_mode, tau_m, alpha, beta)
                        if dpm_mode in MATRIX_MODES else LabelAxisMapping(num_classes, num_aus, dpm_mode, alpha, beta))
        if tsp:
            if text_encoder.config.projection_dim != dim:
                raise ValueError(f"text and vision projections differ: {text_encoder.config.projection_dim} vs {dim}")
            text_encoder.requires_grad_(False)
            width = text_encoder.config.hidden_size
            texts = {"expression": expression_texts, "au": au_texts}
            for task in self.tasks:
                setattr(self, f"{task}_context", nn.Parameter(torch.randn(context_tokens, width) * 0.02))
            ids = _prompt_ids(tokenizer, [t for task in self.tasks for t in texts[task]], context_tokens,
                              text_encoder.config)
            # Derived from the texts at build time, so not saved with the weights.
            self.register_buffer("prompt_ids", ids, persistent=False)
        else:
            if "expression" in self.tasks:
                self.expression_head = nn.Linear(dim, num_classes)
            if "au" in self.tasks:
                self.au_head = nn.Linear(dim, num_aus)

    def train(self, mode: bool = True) -> "SSM":
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()   # frozen: its dropout stays off
        return self

    # ----- encoders -------------------------------------------------------------------------------------------

    def encode_frames(self, frames: Tensor, task: str) -> Tensor:
        """Frames (B, T, 3, S, S), CLIP-normalised -> projected CLIP frame embeddings f_1..f_T (B, T, d) through
        `task`'s private experts (Eqs. 1, 2)."""
        size = self.vision.config.image_size
        expected = (self.num_frames, 3, size, size)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"SSM expects frames of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")
        with routed_to(self.vision, task):
            embeddings = self.vision(pixel_values=frames.flatten(0, 1)).image_embeds
        return embeddings.view(*frames.shape[:2], -1)

    def encode_prompts(self) -> dict[str, Tensor]:
        """TSP: each task's prompts, its context tokens in place of the placeholders after BOS (Eqs. 17, 18), through
        the frozen CLIP text encoder -> {"expression": T^exp (K, d), "au": T^au (M, d)} (Eq. 11).

        CLIPTextModel takes token ids only, so a forward hook on its token embedding splices the context vectors in;
        everything else (causal mask, EOS pooling, projection) is CLIP's own forward."""
        sizes = {"expression": self.num_classes, "au": self.num_aus}
        context = torch.cat([getattr(self, f"{task}_context").expand(sizes[task], -1, -1) for task in self.tasks])
        count = context.shape[1]

        def splice(module: nn.Module, args: tuple, tokens: Tensor) -> Tensor:
            return torch.cat([tokens[:, :1], context.to(tokens.dtype), tokens[:, 1 + count:]], dim=1)

        hook = self.text_encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            prototypes = self.text_encoder(input_ids=self.prompt_ids).text_embeds
        finally:
            hook.remove()
        return dict(zip(self.tasks, prototypes.split([sizes[task] for task in self.tasks])))

    def prototypes(self) -> dict[str, Tensor]:
        """The classifier weights per task: T^exp (K, d), T^au (M, d), normalised, after DPM when it is on."""
        prototypes = {task: F.normalize(t, dim=-1) for task, t in self.encode_prompts().items()}
        if self.dpm is not None:
            prototypes["expression"], prototypes["au"] = self.dpm(prototypes["expression"], prototypes["au"])
        return prototypes

    # ----- forward --------------------------------------------------------------------------------------------

    def forward(self, frames: Tensor, task: str) -> dict[str, Tensor]:
        """Frames (B, T, 3, S, S) of one task's batch -> "logits" (B, K) from the whole clip (task "expression") or
        "au_logits" (B, M) for its centre frame (task "au")."""
        if task not in self.tasks:
            raise ValueError(f"this SSM learns {', '.join(self.tasks)}, not {task!r}")
        per_frame = self.encode_frames(frames, task)
        if task == "expression":
            features = self.expression_temporal(per_frame)
        else:
            features = self.au_temporal(per_frame)
        if not self.tsp:
            logits = getattr(self, f"{task}_head")(features)                                 # Eq. 6
        else:
            texts = self.prototypes()[task]
            logits = F.normalize(features, dim=-1) @ F.normalize(texts, dim=-1).T / self.tau   # Eqs. 12, 13, 25
        return {"logits" if task == "expression" else "au_logits": logits}

    # ----- objective ------------------------------------------------------------------------------------------

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Eq. 14 over an expression batch and/or an AU batch, each term at its own weight 1/(1+lambda) or
        lambda/(1+lambda) whether or not the other is there (weight 1 for a single-task model). Returns "loss" and
        the detached parts "dfe" and "au" that were computed; a batch without a single label adds nothing (a zero
        loss, still on the graph)."""
        shares = ({"dfe": 1.0 / (1.0 + self.lam), "au": self.lam / (1.0 + self.lam)} if len(self.tasks) == 2
                  else {"dfe": 1.0, "au": 1.0})
        parts = {}
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
                parts["au"] = self.au_loss(logits, targets, known)                   # Eq. 13
        # The zero keeps every output on the graph, so distributed backward sees the same parameters each call.
        total = sum(output.float().sum() for task in outputs.values() for output in task.values()) * 0.0
        total = total + sum(parts[name] * shares[name] for name in parts)
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def au_loss(self, logits: Tensor, targets: Tensor, known: Tensor) -> Tensor:
        """Eq. 13: -1/B sum_m sum_n [y log sigma(o) + (1 - y) log(1 - sigma(o))], the sum over the known AUs (each
        weighted by `au_weights`, 1 by default), B the samples with at least one known AU."""
        # NaN targets are zeroed before the BCE: a NaN would poison the sum even where it is masked out.
        per_label = F.binary_cross_entropy_with_logits(logits.float(), torch.where(known, targets, 0.0),
                                                       reduction="none")
        samples = known.any(dim=1).sum()
        return (per_label * known * self.au_weights).sum() / samples.clamp_min(1)

    # ----- optimisation ---------------------------------------------------------------------------------------

    def param_groups(self, lr: float | dict[str, float], weight_decay: float | dict[str, float] = 0.05) -> list[dict]:
        """AdamW groups: "visual_encoder", the CLIP vision encoder E_v with its MoE layers (§IV-B: "the learning rate
        for the visual encoder branch is set to 1e-6"; §III-A1 calls the encoder with MoE layers E_v, and the public
        code's optimiser puts the whole patched encoder at 1e-6), at lr * backbone_lr_scale; "new", every other
        branch (temporal models, context tokens, DPM, heads) at lr. §IV-B: "the weight decay is uniformly set", so
        every parameter decays, 1-D ones too, as in the public code."""
        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay,
                                group_of=lambda name: "visual_encoder" if name.startswith("vision.") else "new",
                                lr_scale_of=lambda name: self.backbone_lr_scale if name.startswith("vision.") else 1.0,
                                decay_vectors=True)

    # ----- registry convention --------------------------------------------------------------------------------

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None,
                       task: str | None = None) -> dict:
        size = self.vision.config.image_size
        frames = torch.randn(batch_size, self.num_frames, 3, size, size, generator=generator)
        return {"frames": frames.to(self.au_weights.device), "task": task or self.tasks[0]}

    def batch_inputs(self, batch: dict) -> dict:
        """A collated batch (on the model's device) -> forward's arguments: its frames, and its task: "au" when it
        carries AU labels, else "expression"."""
        return {"frames": batch["frames"], "task": "au" if "au" in batch else "expression"}

    # ----- explanation ----------------------------------------------------------------------------------------

    explains_samples = False   # the maps do not depend on the input: `affectprep explain RUN` needs no sample

    def explain(self, out_dir: str | Path) -> list[Path]:
        """Draw the learnt DPM maps beside the maps the FACS prior gives (both as applied: row softmax over
        tau_m), AU -> expression on top, expression -> AU below: `dpm-maps.png`, and the four matrices with their
        row and column names in `dpm-maps.json`."""
        if not isinstance(self.dpm, DynamicPriorMapping):
            why = "dpm=False" if self.dpm is None else f"dpm_mode={self.dpm.kind!r} replaces them"
            raise ValueError(f"this SSM has no DPM matrices ({why}): there are no mapping matrices to draw")
        with torch.no_grad():
            learnt = [m.float().cpu().numpy() for m in self.dpm.maps()]
            prior = self.prior.float().cpu()
            from_prior = [(prior / self.dpm.tau).softmax(dim=1).numpy(),
                          (prior.T / self.dpm.tau).softmax(dim=1).numpy()]
        rows = (("AU -> expression", self.expression_names, self.au_names),
                ("expression -> AU", self.au_names, self.expression_names))
        width = 2 + 0.3 * (self.num_classes + self.num_aus)
        figure = new_figure(2 * width, 1.6 * width)
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
        record = {"tau": self.dpm.tau, "expressions": list(self.expression_names), "aus": list(self.au_names),
                  "au_to_expression": {"prior": from_prior[0].tolist(), "learnt": learnt[0].tolist()},
                  "expression_to_au": {"prior": from_prior[1].tolist(), "learnt": learnt[1].tolist()}}
        return write_explanation(figure, record, Path(out_dir), "dpm-maps")


def _tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """The tasks option ("au", ["expression"], ...) as a tuple in TASKS order."""
    chosen = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [task for task in chosen if task not in TASKS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"tasks must be one or both of {TASKS}, got {tasks!r}")
    return tuple(task for task in TASKS if task in chosen)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], context_tokens: int,
                config: CLIPTextConfig) -> Tensor:
    """Token ids of "X * c + text" per text (N, L), padded. The X positions 1..c are where the context vectors go.

    CLIPTextModel pools each prompt at its EOS token: the first `config.eos_token_id`, or, for the legacy configs
    whose eos_token_id is 2 (OpenAI's), the highest id (CLIP's EOT). Checked here against the tokenizer's own EOS
    (a BERT-style tokenizer, the tiny one, ends with [SEP]), so a mismatched tokenizer and encoder cannot pool a
    padding or text position."""
    placeholder = tokenizer(_PLACEHOLDER, add_special_tokens=False).input_ids
    if len(placeholder) != 1:
        raise ValueError(f"the tokenizer splits the context placeholder {_PLACEHOLDER!r} into {placeholder}")
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prompts = [" ".join([_PLACEHOLDER] * context_tokens + [text]) for text in texts]
    ids = tokenizer(prompts, padding=True, truncation=True, max_length=config.max_position_embeddings,
                    return_tensors="pt").input_ids
    if not (ids[:, 1:1 + context_tokens] == placeholder[0]).all():
        raise ValueError("the tokenizer does not start prompts with one BOS token before the context placeholders")
    is_eos = ids == eos_id
    if not is_eos.any(dim=1).all():
        raise ValueError(f"a prompt has no EOS token (id {eos_id})")
    pooled = ids.argmax(dim=1) if config.eos_token_id == 2 else (ids == config.eos_token_id).int().argmax(dim=1)
    if not (pooled == is_eos.int().argmax(dim=1)).all():
        raise ValueError(f"the text encoder (eos_token_id {config.eos_token_id}) would pool the prompts elsewhere "
                         f"than at the tokenizer's EOS token (id {eos_id}): use the tokenizer saved with the encoder")
    return ids


def _facs_lists(facs: dict, text_form: str, num_classes: int, au_names: Sequence[str] | None,
                tasks: tuple[str, ...], dpm: bool) -> dict:
    """Names and texts in `text_form` of the tasks' label sets, and the row-normalised K x M prior when DPM needs
    it, from the FACS asset rows, cross-checked."""
    dpm = dpm and len(tasks) == 2            # one task with dpm=True: SSM itself says why not
    needed = ({"expression"} if "expression" in tasks else set()) | ({"au"} if "au" in tasks else set()) | \
        ({"prior"} if dpm else set())
    missing = needed - set(facs)
    if missing:
        hint = (" (an SSM of both tasks needs an expression and an AU dataset; one task alone: "
                "--set model.tasks=au or =expression, with model.dpm=false)" if set(tasks) == set(TASKS) else "")
        raise ValueError(f"facs lacks the {sorted(missing)} row(s){hint}")
    lists: dict = {}
    if "expression" in tasks:
        expression = facs["expression"]
        if len(expression["names"]) != num_classes:
            raise ValueError(f"num_classes is {num_classes} but the FACS expression set '{expression['asset_id']}' "
                             f"has {len(expression['names'])} classes")
        lists.update(expression_names=list(expression["names"]), expression_texts=list(expression[text_form]))
    if "au" in tasks:
        au = facs["au"]
        if au_names is not None and list(au_names) != list(au["names"]):
            raise ValueError(f"AU names {list(au_names)} differ from the FACS AU set '{au['asset_id']}': "
                             f"{au['names']}")
        lists.update(au_names=list(au["names"]), au_texts=list(au[text_form]))
    if dpm:
        prior = facs["prior"]
        if (list(prior["names"]), list(prior["au_names"])) != (lists["expression_names"], lists["au_names"]):
            raise ValueError(f"the prior row '{prior['asset_id']}' pairs other label sets than "
                             f"'{facs['expression']['asset_id']}' and '{facs['au']['asset_id']}'")
        lists["prior"] = torch.tensor(np.asarray(prior["prior_normalised"], dtype=np.float32))
    return lists


def _synthetic_lists(num_classes: int, au_names: Sequence[str] | None, tasks: tuple[str, ...], dpm: bool) -> dict:
    """Tiny smoke builds without the asset: made-up names and texts, and a fixed random prior in the asset's form."""
    lists: dict = {}
    if "expression" in tasks:
        lists.update(expression_names=[f"class{k}" for k in range(num_classes)],
                     expression_texts=[f"facial expression {k}" for k in range(num_classes)])
    if "au" in tasks:
        names = list(au_names) if au_names is not None else ["AU1", "AU2", "AU4", "AU12"]
        lists.update(au_names=names, au_texts=[f"action unit {name}" for name in names])
    if dpm and len(tasks) == 2:
        linked = torch.rand(num_classes, len(lists["au_names"]), generator=torch.Generator().manual_seed(0)) < 0.4
        prior = torch.where(linked, _LINKED, _OTHER)
        lists["prior"] = prior / prior.sum(dim=1, keepdim=True)
    return lists


# ----- the paper's ablation rows --------------------------------------------------------------------------------

# STL (§IV-B): "the standard CLIP-ViT-B/16, ... the two tasks are trained separately, with a temporal module and a
# linear layer for each task". One run per task; a run gets only that task's dataset.
STL = {"model.tsp": False, "model.dpm": False, "model.moe_layers": 0}
STL_AU = {**STL, "model.tasks": ["au"]}
STL_EXPRESSION = {**STL, "model.tasks": ["expression"]}
BASELINE = {"model.tsp": False, "model.dpm": False}


def _ablations() -> list[Ablation]:
    rows = []
    for table in ("Table I", "Table II"):          # BP4D / DISFA jointly with DFEW
        rows += [Ablation(table, "STL (Ours)", STL_AU), Ablation(table, "SSM (Ours)", {})]
    rows += [Ablation("Table III", "STL (Ours)", STL_EXPRESSION), Ablation("Table III", "SSM (Ours)", {})]
    rows += [Ablation("Table V", "STL (no Baseline, TSP or DPM): AU", STL_AU),
             Ablation("Table V", "STL (no Baseline, TSP or DPM): expression", STL_EXPRESSION),
             Ablation("Table V", "Baseline", BASELINE),
             Ablation("Table V", "Baseline + TSP", {"model.dpm": False}),
             Ablation("Table V", "Baseline + TSP + DPM", {})]
    rows += [Ablation("Table VI", "R init.", {"model.dpm_init": "random", "model.dpm_mode": "transposed"}),
             Ablation("Table VI", "R init. + Dual", {"model.dpm_init": "random"}),
             Ablation("Table VI", "P init.", {"model.dpm_mode": "transposed"}),
             Ablation("Table VI", "P init. + Dual", {})]
    rows += [Ablation("Table VII", "Linear", {"model.dpm_mode": "linear"}),
             Ablation("Table VII", "MLP", {"model.dpm_mode": "mlp"}),
             Ablation("Table VII", "DPM(Random, Frozen)", {"model.dpm_mode": "frozen", "model.dpm_init": "random"}),
             Ablation("Table VII", "DPM(Prior, Frozen)", {"model.dpm_mode": "frozen"}),
             Ablation("Table VII", "DPM", {})]
    rows += [Ablation("Table VIII", form.capitalize(), {} if form == "compound" else {"model.text_form": form})
             for form in ("words", "standalone", "compound")]
    rows += [Ablation("Table IX", f"Prompt Count {count}", {} if count == 8 else {"model.context_tokens": count})
             for count in (0, 4, 8, 12, 16)]
    # Trained on BP4D + DFEW, tested zero-shot on DISFA + FERV39k (an evaluation on other datasets).
    rows += [Ablation("Table X", "STL: AU", STL_AU), Ablation("Table X", "STL: expression", STL_EXPRESSION),
             Ablation("Table X", "Baseline", BASELINE), Ablation("Table X", "SSM", {})]
    # Every AU fold (BP4D, DISFA) with every expression fold (DFEW, MAFW: 1-5) or FERV39k's fixed split.
    rows += [Ablation("Table XI", f"AU fold {au_fold} x " + (f"expression fold {fold}" if fold else "FERV39K"),
                      {"au_fold": au_fold, "fold": fold})
             for au_fold in (1, 2, 3) for fold in (None, 1, 2, 3, 4, 5)]
    for table, option, single in (("Table S1", "expression_fraction", STL_AU),
                                  ("Table S2", "au_fraction", STL_EXPRESSION)):
        rows += [Ablation(table, "0%", single)]
        rows += [Ablation(table, f"{percent}%", {option: percent / 100} if percent < 100 else {})
                 for percent in (20, 40, 60, 80, 100)]
    rows += [Ablation("Table S3", f"alpha, beta = {value}",
                      {} if value == 0.1 else {"model.alpha": value, "model.beta": value})
             for value in (0.01, 0.05, 0.1, 0.5, 1.0)]
    return rows


@register_model("ssm", ablations=_ablations(), needs=("facs", "tasks"))
def ssm(tiny: bool = False, *, num_classes: int = 7, facs: dict | None = None, clip: str | None = None,
        tasks: str | Sequence[str] = TASKS, text_form: str = "compound", tsp: bool = True, dpm: bool = True,
        au_names: Sequence[str] | None = None, **options) -> SSM:
    """SSM on CLIP ViT-B/16, or the tiny variant (32 px, 4 frames, width 32, MoE in the last of 2 blocks).

    tasks: "expression", "au" or both (the default; one task is the paper's STL setting).
    facs: {"expression": row, "au": row, "prior": row} of the FACS asset (affectprep.pipeline.facs.asset_rows()),
    the rows the tasks need (the prior for DPM); the AU row fixes the AUs. None is accepted for tiny builds only:
    names, texts and a random prior are made up.
    clip: a CLIP checkpoint (folder or cached hub id) whose vision and text towers and tokenizer are loaded with
    `from_pretrained`; None builds random towers, tokenised by characters (`tiny_tokenizer`; real size truncates
    prompts to CLIP's 77 positions). Further options go to `SSM` (dpm_init, dpm_mode, context_tokens, tau, tau_m,
    alpha, beta, lam, moe_layers, num_experts, top_k, expert_hidden, expert_activation, gamma, num_frames,
    temporal_heads, temporal_mlp, au_weights, backbone_lr_scale).
    """
    tasks = _tasks(tasks)
    if text_form not in TEXT_FORMS:
        raise ValueError(f"text_form must be one of {TEXT_FORMS}, got {text_form!r}")
    if facs is not None:
        lists = _facs_lists(facs, text_form, num_classes, au_names, tasks, dpm)
    elif tiny:
        lists = _synthetic_lists(num_classes, au_names, tasks, dpm)
    else:
        raise ValueError("SSM needs the FACS asset (facs={'expression': row, 'au': row, 'prior': row}) for its "
                         "texts and prior; only tiny builds make them up")
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
    return SSM(vision, text_encoder, tokenizer, tasks=tasks, tsp=tsp, dpm=dpm, **lists, **sizes)
