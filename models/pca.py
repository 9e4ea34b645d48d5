"""PCA (Shi et al., IEEE SPL 2025): prompt-based cross-modal feature alignment for weakly supervised infrared FER.

A frozen CLIP ViT-B/16 is adapted by prompts only, MaPLe-style; the paper trains prompts and a few MLPs, not CLIP.

CPT, cross-modal prompt transfer (Eqs. 2-8):
  Q    k learnable text prompts per prompted layer (`text_prompts`, (J, k, d_w), drawn from N(0, 0.02^2)). The
       class texts are tokenised as "X X {class}." and the k placeholder embeddings after the start token are
       replaced by Q_0 (a hook on the token embedding); layers 1..J-1 of the text encoder get fresh Q_l in the same
       positions (Eq. 4: the previous layer's output there is discarded), layers J.. carry them on (Eq. 5). The
       pooled end-of-text state -> TPro (CLIP's text projection) is o_c (Eq. 6).
  P    visual prompts P_l = T_l(Q_l), one linear map per prompted layer (`prompt_transfer`), appended after the
       patch embeddings (a hook on the vision embeddings, so CLIP's pre-layernorm covers them as in MaPLe) and
       replaced at the input of vision layers 1..J-1 (Eq. 2). The class token -> IPro (CLIP's visual projection)
       is x_v (Eq. 3). Hooks keep every pretrained weight name as `CLIPModel` saves it.
  L_cls  cross-entropy of logit_scale * cos(x_v, o_c) (Eqs. 7-8).
  The paper leaves the depth J open; it follows MaPLe (k = 2 prompts, as here): J = 9 of 12 layers by default.

IGA, image-guided alignment (Eqs. 9-12):
  banks  per domain (0 source / visible, 1 target / infrared) and class, the N = 5 most confident normalised image
         features seen so far (`bank_features` (2, C, N, D), `bank_scores` (2, C, N), -inf marks an empty slot;
         buffers, so they are saved with the model). A labelled sample enters its label's bank, scored by
         p(label | x_v); an unlabelled one (label -1: the weakly supervised target's unlabelled images) enters
         the bank of its predicted class, scored by that probability. Banks change only in training mode; as in
         the paper, a batch first enters the banks, then is aligned with them. `reset_banks()` empties them
         (e.g. once per epoch, so that features from stale prompts age out).
  f_pr   a 3-layer MLP shared by samples and bank centres, giving q, k, v (Eq. 9); the bank centres x_sc, x_tc
         are the means of each class's entries (empty classes are masked out of the attention).
  Eq. 10 xa_i = f_po(softmax(q k_i^T / eps) v_i), i in {sc, tc}, f_po a shared linear projector;
         xa'_i = normalise(x + xa_i); x' = xa'_sc + xa'_tc. eps is not given; sqrt(d_q) by default.
  L_iga  cross-entropy of logit_scale * cos(x', o_c) (Eqs. 11-12).
Loss (Eq. 13): lambda1 * L_cls + lambda2 * L_iga, lambdas 0.5 and 0.5. Only labelled samples (label >= 0) enter
either term; unlabelled target samples are used by the target bank alone. A batch without a "domain" key is
taken as all source (plain supervised FER).

Prediction: with IGA, "logits" are those of the aligned feature x' (the model's final representation); without,
those of x_v. Both are in the output ("cls_logits", "iga_logits").

Ablations (Table II): `cpt=False` removes the visual prompts and the transfer maps T (the vision encoder is plain
frozen CLIP; the learnable text prompts stay, as in CoOp, so the model still has something to train); `iga=False`
removes the IGA module, its banks and L_iga. `prompts` = k (Table III).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from affectprep.labels import BASIC7

from .layers.optim import parameter_groups
from .losses import labelled_cross_entropy
from .registry import CLIP_MEAN, CLIP_STD, ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer

SOURCE, TARGET = 0, 1

# CLIP ViT-B/16: the text tower keeps CLIPTextConfig's defaults (width 512, 12 layers, 8 heads, 77 positions).
BASE_VISION = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12)
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2)
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=32)

_PROMPT_STD = 0.02   # CoOp / MaPLe initialisation of the context vectors


class PCA(nn.Module):
    """PCA classifier. Build it with `create_model("pca", ...)`; see the module docstring for the design."""

    tasks = ("expression", "target")   # visible source, infrared target (few labels)

    def __init__(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, *, class_names: Sequence[str],
                 prompts: int = 2, prompt_depth: int = 9, cpt: bool = True, iga: bool = True, bank_size: int = 5,
                 iga_dim: int | None = None, epsilon: float | None = None,
                 lambdas: tuple[float, float] = (0.5, 0.5)):
        super().__init__()
        text_config, vision_config = clip.config.text_config, clip.config.vision_config
        depth = min(text_config.num_hidden_layers, vision_config.num_hidden_layers)
        if not 1 <= prompt_depth <= depth:
            raise ValueError(f"prompt_depth must lie in [1, {depth}], got {prompt_depth}")
        if prompts < 1:
            raise ValueError(f"prompts must be at least 1, got {prompts}")
        if len(class_names) < 2:
            raise ValueError(f"PCA needs at least two classes, got {list(class_names)}")
        self.clip = clip.requires_grad_(False)
        self.class_names = tuple(class_names)
        self.num_classes = len(class_names)
        self.prompts, self.prompt_depth = prompts, prompt_depth
        self.cpt, self.iga, self.lambdas = cpt, iga, lambdas
        self.inputs = ModelInputs(frames=1, image_size=vision_config.image_size, mean=CLIP_MEAN, std=CLIP_STD)

        self.text_prompts = nn.Parameter(torch.randn(prompt_depth, prompts, text_config.hidden_size) * _PROMPT_STD)
        self._register_class_texts(tokenizer)
        clip.text_model.embeddings.token_embedding.register_forward_hook(self._insert_text_prompts)
        for layer in range(1, prompt_depth):
            clip.text_model.encoder.layers[layer].register_forward_pre_hook(
                functools.partial(self._replace_text_prompts, layer=layer), with_kwargs=True)

        self.prompt_transfer = None
        if cpt:
            self.prompt_transfer = nn.ModuleList(nn.Linear(text_config.hidden_size, vision_config.hidden_size)
                                                 for _ in range(prompt_depth))
            clip.vision_model.embeddings.register_forward_hook(self._append_visual_prompts)
            for layer in range(1, prompt_depth):
                clip.vision_model.encoder.layers[layer].register_forward_pre_hook(
                    functools.partial(self._replace_visual_prompts, layer=layer), with_kwargs=True)

        embed_dim = clip.config.projection_dim
        if iga:
            iga_dim = iga_dim or embed_dim
            self.epsilon = epsilon or math.sqrt(iga_dim)
            self.align_mlp = nn.Sequential(nn.Linear(embed_dim, iga_dim), nn.ReLU(), nn.Linear(iga_dim, iga_dim),
                                           nn.ReLU(), nn.Linear(iga_dim, 3 * iga_dim))      # f_pr: q, k, v
            self.align_projector = nn.Linear(iga_dim, embed_dim)                             # f_po
            self.register_buffer("bank_features", torch.zeros(2, self.num_classes, bank_size, embed_dim))
            self.register_buffer("bank_scores", torch.full((2, self.num_classes, bank_size), -torch.inf))

    def _register_class_texts(self, tokenizer: PreTrainedTokenizerBase) -> None:
        placeholder = " ".join(["X"] * self.prompts)
        texts = [f"{placeholder} {name.replace('_', ' ')}." for name in self.class_names]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        ids = tokens["input_ids"]
        if not (ids[:, 1:1 + self.prompts] == ids[0, 1]).all():
            raise ValueError(f"the tokenizer does not map the {self.prompts} prompt placeholders to single tokens "
                             f"right after the start token: {ids.tolist()}")
        limit = self.clip.config.text_config.max_position_embeddings
        if ids.shape[1] > limit:
            raise ValueError(f"class prompts take {ids.shape[1]} tokens, more than the text encoder's {limit}")
        self.register_buffer("class_input_ids", ids, persistent=False)
        self.register_buffer("class_attention_mask", tokens["attention_mask"], persistent=False)

    # ----- prompt hooks ---------------------------------------------------------------------------------------

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

    # ----- image-guided alignment -----------------------------------------------------------------------------

    def bank_centres(self) -> tuple[Tensor, Tensor]:
        """Mean of each (domain, class) bank (2, C, D) and whether the bank holds anything (2, C)."""
        filled = torch.isfinite(self.bank_scores)
        counts = filled.sum(-1)
        centres = (self.bank_features * filled[..., None]).sum(2) / counts.clamp_min(1)[..., None]
        return centres, counts > 0

    def align(self, features: Tensor) -> Tensor:
        """x' = sum over the source and target banks of normalise(x + f_po(attention to the class centres))."""
        queries = self.align_mlp(features).chunk(3, dim=-1)[0]
        centres, filled = self.bank_centres()
        aligned = features.new_zeros(features.shape)
        for domain in (SOURCE, TARGET):
            adjustment = 0.0
            if filled[domain].any():
                _, keys, values = self.align_mlp(centres[domain]).chunk(3, dim=-1)
                scores = (queries @ keys.T / self.epsilon).masked_fill(~filled[domain], -torch.inf)
                adjustment = self.align_projector(scores.softmax(dim=-1) @ values)
            aligned = aligned + F.normalize(features + adjustment, dim=-1)
        return aligned

    @torch.no_grad()
    def update_banks(self, features: Tensor, probabilities: Tensor, labels: Tensor, domain: Tensor) -> None:
        """Offer each sample to the bank of its domain and class (its label, or its prediction when unlabelled);
        every bank keeps its N highest-scoring entries."""
        classes = torch.where(labels >= 0, labels, probabilities.argmax(dim=-1))
        scores = probabilities.gather(1, classes[:, None])[:, 0]
        size = self.bank_scores.shape[-1]
        for d, c in torch.unique(torch.stack([domain, classes], dim=1), dim=0).tolist():
            chosen = (domain == d) & (classes == c)
            pool_features = torch.cat([self.bank_features[d, c], features[chosen].to(self.bank_features.dtype)])
            pool_scores = torch.cat([self.bank_scores[d, c], scores[chosen].to(self.bank_scores.dtype)])
            best = pool_scores.topk(size).indices
            self.bank_features[d, c] = pool_features[best]
            self.bank_scores[d, c] = pool_scores[best]

    def reset_banks(self) -> None:
        """Empty both feature banks."""
        self.bank_features.zero_()
        self.bank_scores.fill_(-torch.inf)

    # ----- forward and loss -----------------------------------------------------------------------------------

    def forward(self, frames: Tensor, *, domain: Tensor | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        """frames (B, 1, 3, S, S); domain (B,) 0 source / 1 target (default all source); labels (B,) with -1 for
        unlabelled samples, used in training mode to fill the banks before aligning. Returns logits (B, C),
        cls_logits, image_features x_v (B, D), and with IGA iga_logits and aligned_features x' (B, D)."""
        classes = self.encode_classes()
        features = self.encode_images(frames)
        scale = self.clip.logit_scale.exp()
        cls_logits = scale * features @ classes.T
        outputs = {"logits": cls_logits, "cls_logits": cls_logits, "image_features": features}
        if not self.iga:
            return outputs
        if self.training and labels is not None:
            if domain is None:
                domain = torch.full_like(labels, SOURCE)
            if domain.shape != labels.shape or not ((domain == SOURCE) | (domain == TARGET)).all():
                raise ValueError(f"domain must be (B,) of 0 (source) and 1 (target), got {domain.tolist()}")
            self.update_banks(features.detach(), cls_logits.detach().float().softmax(-1), labels.to(features.device),
                              domain.to(features.device))
        aligned = self.align(features)
        iga_logits = scale * F.normalize(aligned, dim=-1) @ classes.T
        outputs.update(logits=iga_logits, iga_logits=iga_logits, aligned_features=aligned)
        return outputs

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """lambda1 * L_cls + lambda2 * L_iga over the labelled samples of each domain given ("expression" is the
        visible source, "target" the infrared domain, each its own batch); parts "cls" (and "iga"), detached."""
        parts: dict[str, Tensor] = {}
        for task, output in outputs.items():
            labels = batches[task]["labels"]
            weights = class_weights if task == "expression" else None   # the weights are the source's counts
            terms = {"cls": labelled_cross_entropy(output["cls_logits"], labels, weights)}
            if self.iga:
                terms["iga"] = labelled_cross_entropy(output["iga_logits"], labels, weights)
            for name, value in terms.items():
                parts[name] = parts[name] + value if name in parts else value
        total = self.lambdas[0] * parts["cls"] + (self.lambdas[1] * parts["iga"] if self.iga else 0.0)
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def param_groups(self, lr: float, weight_decay: float = 5e-4) -> list[dict]:
        """The trainable parameters (prompts, transfer maps, IGA) in one group; frozen CLIP is left out."""
        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay, group_of=lambda n: "prompts")

    # ----- registry convention --------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        inputs = {"frames": batch["frames"], "labels": batch["labels"]}
        if "domain" in batch:
            inputs["domain"] = batch["domain"]
        return inputs

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random frames; alternating source / target samples with random labels, the last one unlabelled."""
        device = self.text_prompts.device
        size = self.inputs.image_size
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        labels[-1] = -1
        return {"frames": torch.randn(batch_size, 1, 3, size, size, generator=generator).to(device),
                "domain": (torch.arange(batch_size) % 2).to(device), "labels": labels.to(device)}


def _replace_hidden(args: tuple, kwargs: dict, replace) -> tuple[tuple, dict]:
    """Apply `replace` to an encoder layer's hidden-states argument, positional or keyword."""
    if args:
        return (replace(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}


@register_model("pca")
def pca(tiny: bool = False, *, num_classes: int = 7, clip: str | None = None,
        class_names: Sequence[str] | None = None, prompts: int = 2, cpt: bool = True, iga: bool = True,
        prompt_depth: int | None = None, **options) -> PCA:
    """PCA on CLIP ViT-B/16, or the tiny variant (32 px, width 32, 2 layers, character tokenizer).

    clip: path or hub id of a CLIP checkpoint with its tokenizer (e.g. openai/clip-vit-base-patch16), loaded with
    `from_pretrained`; None gives a randomly initialised CLIP with the offline character tokenizer. class_names:
    the words the class prompts use, in label order (default: the basic7 names when num_classes is 7; the
    trainer passes the dataset's). Further
    options go to `PCA` (bank_size, iga_dim, epsilon, lambdas).
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
        # PCA never trains CLIP's temperature: a random CLIP gets the one pretrained CLIP ends with (100).
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION if tiny else BASE_VISION,
                                     projection_dim=16 if tiny else 512, logit_scale_init_value=math.log(100)))
    depth = prompt_depth or (model.config.text_config.num_hidden_layers if tiny else 9)
    return PCA(model, tokenizer, class_names=class_names, prompts=prompts, prompt_depth=depth, cpt=cpt, iga=iga,
               **options)
