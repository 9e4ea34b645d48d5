"""PCA (Shi et al., IEEE SPL 2025): prompt-based cross-modal feature alignment for weakly supervised infrared FER.

A frozen CLIP ViT-B/16 is adapted by prompts only, MaPLe-style: §III-A trains the prompts and "a few MLPs", not CLIP.

CPT, cross-modal prompt transfer (§II-B, Eqs. 2-8):
  Q    k learnable text prompts per prompted layer (`text_prompts`, (J, k, d_w), drawn from a normal distribution as
       §II-B says; std 0.02 as CoOp / MaPLe). The class texts are tokenised as "X X {class}." and the k placeholder
       embeddings after the start token are replaced by Q_0 (a hook on the token embedding); layers 1..J-1 of the
       text encoder get fresh Q_l in the same positions (Eq. 4: the previous layer's output there is discarded),
       layers J.. carry them on (Eq. 5). The pooled end-of-text state -> TPro (CLIP's text projection) is o_c (Eq. 6).
  P    visual prompts P_l = T_l(Q_l), one linear map per prompted layer (`prompt_transfer`, §II-B "P_k = T_k(Q_k)"),
       appended after the patch embeddings (a hook on the vision embeddings, so CLIP's pre-layernorm covers them as
       in MaPLe) and replaced at the input of vision layers 1..J-1 (Eq. 2). The class token -> IPro (CLIP's visual
       projection) is x_v (Eq. 3). Hooks keep every pretrained weight name as `CLIPModel` saves it.
  L_cls  cross-entropy of logit_scale * cos(x_v, o_c) (Eqs. 7-8).
  The paper leaves the depth J open; it follows MaPLe (k = 2 prompts, as here): J = 9 of 12 layers by default.

"Two image encoders" (§II-B, Algorithm 1): one per domain, both initialised from the same pre-trained CLIP
(Algorithm 1, line 1), both frozen (§III-A), both fed the one prompt set P = T(Q) (Eq. 2; Algorithm 1 has one
(P, Q)). Two frozen copies of the same weights with the same prompts compute the same function, so one module
serves both domains: the result is identical and CLIP's image tower is held once.

IGA, image-guided alignment (§II-C, Eqs. 9-12):
  banks  per domain (0 source / visible, 1 target / infrared) and class, the N = 5 labelled samples whose label
         CLIP finds most probable (p(y | x_v), Eq. 7) (`bank_features` (2, C, N, D), `bank_scores` (2, C, N), -inf
         marks an empty slot, `bank_keys` (2, C, N) the samples' id hashes; buffers, saved with the model). §II-C:
         "CLIP identifies the highest-probability emotion representations, with top-N(5) visual features selected
         per category"; the source bank holds N per class, the target's as many as its few labels give. Only
         labelled samples enter (source: the labelled visible set; target: the few labelled target samples), each
         at most once. `begin_epoch` rebuilds the banks before every epoch's first step from a no-gradient pass
         over those samples (the trainer hands it them; under several processes every rank's share is gathered,
         so every rank builds the same banks from all samples). Algorithm 1 does the per-epoch encoder work
         (lines 2-5) before the iterations and lists no bank step of its own; building the banks there, with the
         prompts as they stand, is our reading. Choice: the bank features are x_v of this model (its prompted,
         frozen CLIP), so they share the space of the features they align.
  centres  x_sc, x_tc: the mean of each class's entries. During training a sample never attends to a centre that
         contains itself: a bank member's centre is recomputed without it (a class whose only entry it is drops out
         of its attention), so training sees what a test sample sees.
  f_pr   a 3-layer MLP shared by samples and centres, giving q, k, v (Eq. 9).
  Eq. 10 xa_i = f_po(softmax(q k_i^T / eps) v_i), i in {sc, tc}, f_po a shared linear projector (empty classes are
         masked out of the softmax); xa'_i = normalise(x + xa_i); x' = xa'_sc + xa'_tc (§II-C). A domain whose bank
         is empty adds normalise(x). eps is not given; sqrt(d_q) by default.
  L_iga  cross-entropy of logit_scale * cos(x', o_c) (Eqs. 11-12).
Loss (Eq. 13): lambda1 * L_cls + lambda2 * L_iga, lambdas 0.5 and 0.5 (§III-A). Only labelled samples (label >= 0)
enter either term.

Prediction: with IGA, "logits" are those of the aligned feature x' (the model's final representation); without,
those of x_v. Both are in the output ("cls_logits", "iga_logits"), with "bank_attention" (B, 2, C).

Ablations (Table II, the ViT columns; Table III): `cpt=False` is plain CLIP: no text prompts, no visual prompts, no
transfer maps; the classes are read from a hand-made template (`class_template`, "a photo of a {} face." by
default; the paper does not give one). `iga=False` removes the IGA module, its banks and L_iga. With both off
(Table II's first row, zero-shot CLIP) nothing of the paper's is left to learn; the trainer still needs a parameter,
so CLIP's temperature (logit_scale) learns there alone: a positive scale cannot change any prediction (the argmax of
scale * cos), so the row's accuracies are zero-shot CLIP's. `prompts` = k (Table III).
Table II's ResNet columns (and Table I's ResNet row) use CLIP's ResNet image encoder, which transformers does not
implement (its CLIPModel has only the ViT tower), so they are not reproducible here and are not registered.
"""
from __future__ import annotations

import functools
import hashlib
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from affectprep.labels import BASIC7

from .layers.optim import parameter_groups
from .losses import labelled_cross_entropy
from .registry import CLIP_MEAN, CLIP_STD, Ablation, ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer
from .figures import displayable, new_figure, prediction_title, write_explanation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE, TARGET = 0, 1
# The task whose labelled training samples fill each domain's bank (see models/data.py TASKS).
BANK_TASKS = {SOURCE: "expression", TARGET: "target"}
DOMAIN_NAMES = ("source (visible)", "target (infrared)")

# CLIP ViT-B/16: the text tower keeps CLIPTextConfig's defaults (width 512, 12 layers, 8 heads, 77 positions).
BASE_VISION = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12)
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2)
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=32)

_PROMPT_STD = 0.02   # CoOp / MaPLe initialisation of the context vectors


def sample_keys(sample_ids: Sequence[str]) -> Tensor:
    """A stable 63-bit hash of each sample id (B,), int64: how the banks recognise a sample across processes."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big") >> 1
                         for s in sample_ids], dtype=torch.long)


class PCA(nn.Module):
    """PCA classifier. Build it with `create_model("pca", ...)`; see the module docstring for the design."""

    tasks = ("expression", "target")   # visible source, infrared target (few labels)

    def __init__(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, *, class_names: Sequence[str],
                 prompts: int = 2, prompt_depth: int = 9, cpt: bool = True, iga: bool = True, bank_size: int = 5,
                 iga_dim: int | None = None, epsilon: float | None = None,
                 lambdas: tuple[float, float] = (0.5, 0.5), class_template: str = "a photo of a {} face."):
        super().__init__()
        text_config, vision_config = clip.config.text_config, clip.config.vision_config
        depth = min(text_config.num_hidden_layers, vision_config.num_hidden_layers)
        if cpt and not 1 <= prompt_depth <= depth:
            raise ValueError(f"prompt_depth must lie in [1, {depth}], got {prompt_depth}")
        if cpt and prompts < 1:
            raise ValueError(f"prompts must be at least 1, got {prompts}")
        if len(class_names) < 2:
            raise ValueError(f"PCA needs at least two classes, got {list(class_names)}")
        if bank_size < 1:
            raise ValueError(f"bank_size must be at least 1, got {bank_size}")
        self.clip = clip.requires_grad_(False)
        self.class_names = tuple(class_names)
        self.num_classes = len(class_names)
        self.prompts, self.prompt_depth = (prompts, prompt_depth) if cpt else (0, 0)
        self.cpt, self.iga, self.lambdas = cpt, iga, lambdas
        self.inputs = ModelInputs(frames=1, image_size=vision_config.image_size, mean=CLIP_MEAN, std=CLIP_STD)

        self.text_prompts = self.prompt_transfer = None
        if cpt:
            self.text_prompts = nn.Parameter(torch.randn(prompt_depth, prompts, text_config.hidden_size) * _PROMPT_STD)
            self.prompt_transfer = nn.ModuleList(nn.Linear(text_config.hidden_size, vision_config.hidden_size)
                                                 for _ in range(prompt_depth))
            self._register_class_texts(tokenizer, [f"{' '.join(['X'] * prompts)} {name}." for name in self._words()])
            clip.text_model.embeddings.token_embedding.register_forward_hook(self._insert_text_prompts)
            clip.vision_model.embeddings.register_forward_hook(self._append_visual_prompts)
            for layer in range(1, prompt_depth):
                clip.text_model.encoder.layers[layer].register_forward_pre_hook(
                    functools.partial(self._replace_text_prompts, layer=layer), with_kwargs=True)
                clip.vision_model.encoder.layers[layer].register_forward_pre_hook(
                    functools.partial(self._replace_visual_prompts, layer=layer), with_kwargs=True)
        else:
            self._register_class_texts(tokenizer, [class_template.format(name) for name in self._words()])
        # Zero-shot CLIP (no CPT, no IGA): only the temperature learns; see the module docstring.
        self.learns_temperature = not cpt and not iga
        clip.logit_scale.requires_grad_(self.learns_temperature)

        embed_dim = clip.config.projection_dim
        self.embed_dim = embed_dim
        if iga:
            iga_dim = iga_dim or embed_dim
            self.iga_dim = iga_dim
            self.epsilon = epsilon or math.sqrt(iga_dim)
            self.align_mlp = nn.Sequential(nn.Linear(embed_dim, iga_dim), nn.ReLU(), nn.Linear(iga_dim, iga_dim),
                                           nn.ReLU(), nn.Linear(iga_dim, 3 * iga_dim))      # f_pr: q, k, v
            self.align_projector = nn.Linear(iga_dim, embed_dim)                             # f_po
            self.register_buffer("bank_features", torch.zeros(2, self.num_classes, bank_size, embed_dim))
            self.register_buffer("bank_scores", torch.full((2, self.num_classes, bank_size), -torch.inf))
            self.register_buffer("bank_keys", torch.zeros(2, self.num_classes, bank_size, dtype=torch.long))
            self._warned_empty_banks = False

    def _words(self) -> list[str]:
        return [name.replace("_", " ") for name in self.class_names]

    def _register_class_texts(self, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> None:
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        ids = tokens["input_ids"]
        if self.cpt and not (ids[:, 1:1 + self.prompts] == ids[0, 1]).all():
            raise ValueError(f"the tokenizer does not map the {self.prompts} prompt placeholders to single tokens "
                             f"right after the start token: {ids.tolist()}")
        limit = self.clip.config.text_config.max_position_embeddings
        if ids.shape[1] > limit:
            raise ValueError(f"class prompts take {ids.shape[1]} tokens, more than the text encoder's {limit}")
        self.register_buffer("class_input_ids", ids, persistent=False)
        self.register_buffer("class_attention_mask", tokens["attention_mask"], persistent=False)

    # ----- prompt hooks (CPT) ---------------------------------------------------------------------------------

    def _with_prompts(self, hidden: Tensor, prompts: Tensor, start: int) -> Tensor:
        prompts = prompts.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([hidden[:, :start], prompts, hidden[:, start + prompts.shape[1]:]], dim=1)

    def _insert_text_prompts(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self._with_prompts(output, self.text_prompts[0], start=1)

    def _replace_text_prompts(self, module: nn.Module, args: tuple, kwargs: dict, *, layer: int):
        return _replace_hidden(args, kwargs, lambda hidden: self._with_prompts(hidden, self.text_prompts[layer], 1))

    def visual_prompts(self, layer: int) -> Tensor:
        """P_l = T_l(Q_l), (k, d_v)."""
        return self.prompt_transfer[layer](self.text_prompts[layer])

    def _append_visual_prompts(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        prompts = self.visual_prompts(0).to(output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([output, prompts], dim=1)

    def _replace_visual_prompts(self, module: nn.Module, args: tuple, kwargs: dict, *, layer: int):
        def replace(hidden: Tensor) -> Tensor:
            return self._with_prompts(hidden, self.visual_prompts(layer), hidden.shape[1] - self.prompts)
        return _replace_hidden(args, kwargs, replace)

    # ----- encoders -------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "PCA":
        super().train(mode)
        self.clip.eval()   # frozen
        return self

    def encode_classes(self) -> Tensor:
        """o_c for every class, L2-normalised (C, D)."""
        pooled = self.clip.text_model(input_ids=self.class_input_ids,
                                      attention_mask=self.class_attention_mask).pooler_output
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def encode_images(self, frames: Tensor) -> Tensor:
        """Frames (B, 1, 3, S, S), CLIP-normalised -> x_v, L2-normalised (B, D)."""
        size = self.inputs.image_size
        if frames.dim() != 5 or tuple(frames.shape[1:]) != (1, 3, size, size):
            raise ValueError(f"PCA expects still frames of shape (B, 1, 3, {size}, {size}), got {tuple(frames.shape)}")
        pooled = self.clip.vision_model(pixel_values=frames[:, 0]).pooler_output
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def class_logits(self, features: Tensor, classes: Tensor) -> Tensor:
        """logit_scale * cos(x, o_c) (Eqs. 7 and 11 before the softmax); features need not be unit length."""
        return self.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ classes.T

    # ----- feature banks (IGA, §II-C) ---------------------------------------------------------------------------

    @torch.no_grad()
    def begin_epoch(self, epoch: int, data) -> None:
        """Rebuild both banks from the labelled training samples (the trainer's hook, called in every process
        before the epoch's first step).

        `data.batches(task)` yields this process's share of a task's labelled training samples, collated and on
        the model's device ("expression" fills the source bank, "target" the target bank); `data.gather(tensor)`
        concatenates a tensor over processes. A task the run does not have yields no batches (or is left out of
        `data.tasks` where the trainer gives that)."""
        if not self.iga:
            return
        tasks = getattr(data, "tasks", self.tasks)
        classes = self.encode_classes()
        for domain, task in BANK_TASKS.items():
            parts = [[], [], [], []]
            for batch in data.batches(task) if task in tasks else ():
                labels = batch["labels"]
                features = self.encode_images(batch["frames"])
                probabilities = self.class_logits(features, classes).float().softmax(-1)
                scores = probabilities.gather(1, labels.clamp_min(0)[:, None])[:, 0]
                keys = sample_keys(batch["sample_ids"]).to(labels.device)
                for part, value in zip(parts, (features.float(), scores, labels, keys)):
                    part.append(value[labels >= 0])
            # Every process gathers, with or without samples of its own, so the collectives stay matched.
            device = self.bank_features.device
            empty = (torch.zeros(0, self.embed_dim, device=device), torch.zeros(0, device=device),
                     torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device))
            features, scores, labels, keys = (data.gather(torch.cat(part) if part else blank)
                                              for part, blank in zip(parts, empty))
            self.fill_bank(domain, features, scores, labels, keys)
        self._warned_empty_banks = False

    @torch.no_grad()
    def fill_bank(self, domain: int, features: Tensor, scores: Tensor, labels: Tensor, keys: Tensor) -> None:
        """Replace a domain's banks: per class the `bank_size` highest-scoring distinct samples (a sample offered
        twice counts once, at its best score; ties keep the first offered)."""
        size = self.bank_scores.shape[-1]
        self.bank_scores[domain] = -torch.inf
        self.bank_features[domain] = 0
        self.bank_keys[domain] = 0
        filled, seen = [0] * self.num_classes, set()
        for i in torch.argsort(scores, descending=True, stable=True).tolist():
            key, label = int(keys[i]), int(labels[i])
            if key in seen or not 0 <= label < self.num_classes or filled[label] == size:
                continue
            seen.add(key)
            slot = filled[label]
            self.bank_features[domain, label, slot] = features[i].to(self.bank_features.dtype)
            self.bank_scores[domain, label, slot] = scores[i].to(self.bank_scores.dtype)
            self.bank_keys[domain, label, slot] = key
            filled[label] += 1

    def bank_centres(self, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The mean of each (domain, class) bank (E, 2, C, D) and whether it holds anything (E, 2, C): E = 1 when
        `exclude` is None, else one per key in `exclude` (B,), each centre computed without that sample."""
        filled = torch.isfinite(self.bank_scores)                                   # (2, C, N)
        sums = (self.bank_features * filled[..., None]).sum(2)[None]                # (1, 2, C, D)
        counts = filled.sum(-1)[None]                                               # (1, 2, C)
        if exclude is not None:
            member = (filled[None] & (self.bank_keys[None] == exclude[:, None, None, None])).to(sums.dtype)
            sums = sums - torch.einsum("bdcn,dcnk->bdck", member, self.bank_features)
            counts = counts - member.sum(-1).long()
        return sums / counts.clamp_min(1)[..., None], counts > 0

    def align(self, features: Tensor, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x' = sum over the source and target banks of normalise(x + f_po(attention to the class centres))
        (Eqs. 9-10, §II-C), and the attention (B, 2, C). `exclude` (B,): the samples' keys, whose own bank entries
        are left out of their centres (training)."""
        queries = self.align_mlp(features).split(self.iga_dim, dim=-1)[0]                  # (B, d)
        centres, valid = self.bank_centres(exclude)                                         # (E, 2, C, D), (E, 2, C)
        _, keys, values = self.align_mlp(centres.to(features.dtype)).split(self.iga_dim, dim=-1)
        keys, values = (t.expand(features.shape[0], -1, -1, -1) for t in (keys, values))    # (B, 2, C, d)
        valid = valid.expand(features.shape[0], -1, -1)
        scores = torch.einsum("bk,bdck->bdc", queries, keys) / self.epsilon
        attention = scores.masked_fill(~valid, -torch.inf).softmax(dim=-1)
        present = valid.any(dim=-1, keepdim=True)                                           # (B, 2, 1)
        attention = torch.where(present, attention, torch.zeros_like(attention))           # no NaN for empty banks
        adjustment = self.align_projector(torch.einsum("bdc,bdck->bdk", attention, values)) * present
        aligned = F.normalize(features[:, None] + adjustment, dim=-1).sum(dim=1)
        return aligned, attention

    # ----- forward and loss -----------------------------------------------------------------------------------

    def forward(self, frames: Tensor, *, sample_keys: Tensor | None = None) -> dict[str, Tensor]:
        """frames (B, 1, 3, S, S); sample_keys (B,) (see `sample_keys`), which in training mode keep each sample
        out of its own bank centres. Returns logits (B, C), cls_logits, image_features x_v (B, D), and with IGA
        iga_logits, aligned_features x' (B, D) and bank_attention (B, 2, C)."""
        classes = self.encode_classes()
        features = self.encode_images(frames)
        cls_logits = self.class_logits(features, classes)
        outputs = {"logits": cls_logits, "cls_logits": cls_logits, "image_features": features}
        if not self.iga:
            return outputs
        if self.training and not self._warned_empty_banks and not torch.isfinite(self.bank_scores).any():
            warnings.warn("PCA's IGA banks are empty, so x' is the plain image feature: the trainer fills them "
                          "through begin_epoch before each epoch", RuntimeWarning, stacklevel=2)
            self._warned_empty_banks = True
        aligned, attention = self.align(features, sample_keys if self.training else None)
        iga_logits = self.class_logits(aligned, classes)
        outputs.update(logits=iga_logits, iga_logits=iga_logits, aligned_features=aligned, bank_attention=attention)
        return outputs

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """lambda1 * L_cls + lambda2 * L_iga (Eq. 13) over the labelled samples of each domain given ("expression"
        is the visible source, "target" the infrared domain, each its own batch); parts "cls" (and "iga"),
        detached."""
        parts: dict[str, Tensor] = {}
        for task, output in outputs.items():
            labels = batches[task]["labels"]
            weights = class_weights if task == "expression" else None   # the weights are the source's counts
            terms = {"cls": labelled_cross_entropy(output["cls_logits"], labels, weights)}            # Eq. 8
            if self.iga:
                terms["iga"] = labelled_cross_entropy(output["iga_logits"], labels, weights)          # Eq. 12
            for name, value in terms.items():
                parts[name] = parts[name] + value if name in parts else value
        total = self.lambdas[0] * parts["cls"] + (self.lambdas[1] * parts["iga"] if self.iga else 0.0)
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def param_groups(self, lr: float, weight_decay: float = 5e-4) -> list[dict]:
        """The trainable parameters: "prompts" (Q and the transfer maps T), "alignment" (f_pr, f_po) and, for
        zero-shot CLIP only, "temperature"; frozen CLIP is left out."""
        def group(name: str) -> str:
            if name.startswith(("align_mlp.", "align_projector.")):
                return "alignment"
            return "temperature" if name == "clip.logit_scale" else "prompts"
        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay, group_of=group)

    # ----- explanation ----------------------------------------------------------------------------------------

    def explain(self, batch: dict, outputs: dict[str, Tensor], out_dir: Path, label_names: list[str]) -> list[Path]:
        """The first sample's image-guided attention over the class centres of both banks (Eq. 10's softmax), as a
        PNG (the face beside a domain x class heat map) and a JSON with the weights, the bank sizes and both
        predictions ("image": from x_v, "aligned": from x')."""
        if not self.iga:
            raise ValueError("this PCA model has no IGA module (iga=false): there is no bank attention to draw")
        sample_id = batch["sample_ids"][0]
        attention = outputs["bank_attention"][0].float().cpu().numpy()                     # (2, C)
        sizes = torch.isfinite(self.bank_scores).sum(-1).cpu().tolist()                    # (2, C)
        probabilities = {name: outputs[key][0].float().softmax(-1).cpu()
                         for name, key in (("image", "cls_logits"), ("aligned", "iga_logits"))}
        predicted = {name: label_names[int(p.argmax())] for name, p in probabilities.items()}
        label = int(batch["labels"][0])
        title = prediction_title(sample_id, probabilities["aligned"], label_names, label,
                                 note=f"from x_v alone {predicted['image']}")
        figure = _plot_bank_attention(attention, sizes, label_names, title, batch["frames"][0, 0], self.inputs)
        return write_explanation(figure, {
            "label": label_names[label] if label >= 0 else None,
            "classes": list(label_names), "domains": list(DOMAIN_NAMES),
            "attention": attention.tolist(), "bank_sizes": sizes,
            "probabilities": {name: p.tolist() for name, p in probabilities.items()},
            "predicted": predicted}, out_dir, "bank-attention", sample_id)

    # ----- registry convention --------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        frames = batch["frames"]
        return {"frames": frames, "sample_keys": sample_keys(batch["sample_ids"]).to(frames.device)}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random frames."""
        device = self.class_input_ids.device
        size = self.inputs.image_size
        return {"frames": torch.randn(batch_size, 1, 3, size, size, generator=generator).to(device)}


def _replace_hidden(args: tuple, kwargs: dict, replace) -> tuple[tuple, dict]:
    """Apply `replace` to an encoder layer's hidden-states argument, positional or keyword."""
    if args:
        return (replace(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}


def _plot_bank_attention(attention: np.ndarray, sizes: list[list[int]], classes: list[str], title: str,
                         frame: Tensor, inputs: ModelInputs) -> "Figure":
    """The face, and a heat map of the attention weights (rows: banks, columns: classes), each cell annotated with
    its weight and the number of samples behind that centre."""
    figure = new_figure(4.5 + 0.9 * len(classes), 3.2, layout="constrained")
    face, heat = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, max(1.0, 0.45 * len(classes))]})
    face.imshow(displayable(frame, inputs.mean, inputs.std))
    face.set_axis_off()
    image = heat.imshow(attention, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for d in range(attention.shape[0]):
        for c in range(attention.shape[1]):
            text = f"{attention[d, c]:.2f}\nn={sizes[d][c]}" if sizes[d][c] else "empty"
            heat.text(c, d, text, ha="center", va="center", fontsize=7,
                      color="black" if attention[d, c] > 0.6 else "white")
    heat.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    heat.set_yticks(range(len(DOMAIN_NAMES)), [f"{d}\nbank" for d in DOMAIN_NAMES], fontsize=8)
    heat.set_title("attention over the class centres (Eq. 10)", fontsize=9)
    figure.colorbar(image, ax=heat)
    figure.suptitle(title, fontsize=9)
    return figure


def _table_ii(cpt: bool, iga: bool) -> Ablation:
    mark = {True: "✓", False: "×"}
    settings = {**({} if cpt else {"model.cpt": False}), **({} if iga else {"model.iga": False})}
    return Ablation("Table II", f"CPT {mark[cpt]} / IGA {mark[iga]}", settings)


ABLATIONS = ([_table_ii(cpt, iga) for cpt, iga in ((False, False), (True, False), (False, True), (True, True))]
             + [Ablation("Table III", f"k={k}", {"model.prompts": k}) for k in range(1, 6)])


@register_model("pca", ablations=ABLATIONS, needs=("class_names",))
def pca(tiny: bool = False, *, num_classes: int = 7, clip: str | None = None,
        class_names: Sequence[str] | None = None, prompts: int = 2, cpt: bool = True, iga: bool = True,
        prompt_depth: int | None = None, **options) -> PCA:
    """PCA on CLIP ViT-B/16, or the tiny variant (32 px, width 32, 2 layers, character tokenizer).

    clip: path or hub id of a CLIP checkpoint with its tokenizer (e.g. openai/clip-vit-base-patch16), loaded with
    `from_pretrained`; None gives a randomly initialised CLIP with the offline character tokenizer. transformers
    has no CLIP ResNet, so the paper's ResNet columns cannot be built. class_names: the words the class prompts
    use, in label order (default: the basic7 names when num_classes is 7; the trainer passes the dataset's).
    Further options go to `PCA` (bank_size, iga_dim, epsilon, lambdas, class_template).
    """
    if class_names is None:
        if num_classes == len(BASIC7):
            class_names = BASIC7
        elif tiny:   # a smoke-test build: the words do not matter to a random CLIP
            class_names = [f"class {i}" for i in range(num_classes)]
        else:
            raise ValueError(f"class_names are required for {num_classes} classes (the default is basic7's 7)")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if clip is not None:
        model, tokenizer = CLIPModel.from_pretrained(clip), load_tokenizer(clip)
    else:
        tokenizer = tiny_tokenizer()
        # CLIPTextModel pools at the first eos_token_id (ids other than 2), here the tokenizer's [SEP].
        special = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        text = {**(TINY_TEXT if tiny else {}), **special}
        # A random CLIP gets the temperature pretrained CLIP ends with (100).
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION if tiny else BASE_VISION,
                                     projection_dim=16 if tiny else 512, logit_scale_init_value=math.log(100)))
    depth = prompt_depth or (model.config.text_config.num_hidden_layers if tiny else 9)
    return PCA(model, tokenizer, class_names=class_names, prompts=prompts, prompt_depth=depth, cpt=cpt, iga=iga,
               **options)
