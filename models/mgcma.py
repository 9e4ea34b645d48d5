"""MGCMA (Wang et al., 2024, arXiv 2412.20821): speech + transcript emotion recognition with multi-granularity
cross-modal alignment. Our notes of the paper (../shared/papers/mgcma.md) are a summary: what it states is cited
below as "paper"; everything else is marked as our choice.

Three alignment stages in the paper's order, coarse to fine, the output of each feeding the next (paper: "the
specific sequence of distribution-based, token-based, and instance-based alignment yields optimal results"):
  E_s, E_t  Wav2Vec2 on the 16 kHz waveform and BERT on the transcript -> token features (paper); or precomputed
            token features (`features=True`, the audio_features cache). The waveform is cut at
            affectprep.speech.MAX_UTTERANCE_SECONDS and normalised as the checkpoint's feature extractor says
            (do_normalize) by the same code as the features stage, so both paths feed the encoder the same input.
            Choice: fine-tuned, with Wav2Vec2's convolutional feature encoder frozen as is usual;
            `freeze_encoders=True` freezes both.
  P         choice: per-modality linear projection + LayerNorm into one width, so the modalities can be compared.
  DAM       distribution-based alignment. Paper: a distribution constructor turns each modality's features into a
            Gaussian N(mu, diag(sigma)); the 2-Wasserstein distance W between the speech and text Gaussians gives
            Eq. 5, Sim(N_1, N_2) = -p * W(N_1, N_2) + q, p > 0 a scale, q a bias, the logits of a distribution-level
            contrastive loss. Here:
              constructor (choice): a multi-head self-attention sublayer over the tokens, then linear heads giving
                each token a Gaussian (mean mu_i, log-variance); the token means mu_i are the Gaussian features that
                feed the next stage. The utterance's Gaussian is the moment-matched uniform mixture of its real
                tokens' Gaussians: mu = mean_i mu_i, sigma = mean_i (sigma_i + mu_i^2) - mu^2.
              W = sqrt(||mu_1 - mu_2||^2 + ||sqrt(sigma_1) - sqrt(sigma_2)||^2), the closed form for diagonal
                covariances (sigma the variances); Eq. 5 uses W, not its square (`squared_distance=True` gives W^2).
              loss (choice): the sigmoid (pairwise) contrastive loss over every speech/text pair of the batch,
                positives the true pairs, as PCME++'s matching probability sigmoid(-a * d + b) that Eq. 5 mirrors
                (under a softmax over the batch q would cancel and never learn). p = exp(log p) stays positive and
                starts at distribution_scale / sqrt(width) (W grows with the square root of the width), q at
                distribution_bias.
  TAM       token-based alignment. Paper: N blocks; in block i the self-attention inputs (Q, K, V) are block i-1's
            cross-attention outputs and the cross-attention inputs block i's self-attention outputs. Choice: each
            modality's tokens attend to themselves, then to the other modality's (both directions read this block's
            self-attention outputs), then a feed-forward layer; pre-norm residual sublayers; a final LayerNorm.
  IAM       instance-based alignment. Paper: contrastive learning on the two modalities' representations with
            dot-product similarities between speech and text. Choice: the representations are the masked means of
            the stream's tokens, the loss a symmetric InfoNCE over the batch, positives the true pairs;
            `instance_similarity="cosine"` uses cos / temperature instead of the plain dot product.
  head      choice: the two pooled final streams, concatenated -> MLP -> emotion logits; cross-entropy.
Total loss = CE + lambda_d * L_dist + lambda_i * L_inst; choice: lambdas 1, N = 2 blocks, width 768, 8 heads.

Switches (the paper's module and order ablations): `distribution_alignment`, `token_alignment`,
`instance_alignment` remove a module (its loss term and its parameters); `module_order` runs the enabled modules in
another order ("distribution,token,instance" is the paper's); `distribution_mode="side"` keeps DAM as a side branch
whose Gaussians feed only its loss (the next stage reads the tokens DAM read).

Padding is masked everywhere: BERT and the attention layers take the token masks, pooling skips padding, and
Wav2Vec2's frame mask comes from the sample mask through `_get_feat_extract_output_lengths`. Wav2Vec2-base
normalises its first convolution over the whole time axis (GroupNorm), so padding would leak into every frame of a
shorter utterance; such encoders (feat_extract_norm="group") therefore run each utterance on its own samples,
while LayerNorm encoders (e.g. large-lv60) run batched with the attention mask. Waveforms are right-padded.
"""
from __future__ import annotations

import itertools
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedTokenizerBase, Wav2Vec2Config, Wav2Vec2Model

from affectprep.speech import MAX_TRANSCRIPT_TOKENS, SAMPLE_RATE, normalize_waveform, normalizes_waveform

from .grace import masked_mean
from .layers.optim import parameter_groups
from .losses import labelled_cross_entropy
from .registry import Ablation, ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer
from .figures import new_figure, prediction_title, write_explanation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Tiny configs: forward + backward in well under a second on CPU. The tiny Wav2Vec2 downsamples 20x (two
# convolutions, strides 5 and 4) where the base one downsamples 320x (20 ms frames).
TINY_SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4, mask_time_length=2)
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
# example_inputs' waveforms give about this many Wav2Vec2 frames (one second for the base config).
EXAMPLE_FRAMES = 50
MODULES = ("distribution", "token", "instance")
PAPER_ORDER = ",".join(MODULES)


def wasserstein2_squared(mean_a: Tensor, variance_a: Tensor, mean_b: Tensor, variance_b: Tensor) -> Tensor:
    """Squared 2-Wasserstein distances between every pair of diagonal Gaussians: (Na, D) and (Nb, D) -> (Na, Nb).

    For diagonal covariances the general form ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_b^1/2 S_a S_b^1/2)^1/2)
    reduces to ||mu_a - mu_b||^2 + ||sqrt(var_a) - sqrt(var_b)||^2.
    """
    if mean_a.shape != variance_a.shape or mean_b.shape != variance_b.shape or mean_a.shape[-1] != mean_b.shape[-1]:
        raise ValueError(f"means and variances must be (N, D) pairs of one width, got {tuple(mean_a.shape)}, "
                         f"{tuple(variance_a.shape)}, {tuple(mean_b.shape)}, {tuple(variance_b.shape)}")
    mean_term = (mean_a[:, None] - mean_b[None]).pow(2).sum(-1)
    std_term = (variance_a.sqrt()[:, None] - variance_b.sqrt()[None]).pow(2).sum(-1)
    return mean_term + std_term


def wasserstein2(mean_a: Tensor, variance_a: Tensor, mean_b: Tensor, variance_b: Tensor,
                 eps: float = 1e-8) -> Tensor:
    """The 2-Wasserstein distance W (the square root of `wasserstein2_squared`), (Na, Nb). eps keeps the gradient
    finite where two distributions coincide (the square root's slope is infinite at 0)."""
    return (wasserstein2_squared(mean_a, variance_a, mean_b, variance_b) + eps).sqrt()


def distribution_contrastive_loss(similarity: Tensor) -> Tensor:
    """Sigmoid contrastive loss on a (B, B) matrix of Eq. 5 similarities whose diagonal holds the true pairs:
    -1/B sum_ij log sigmoid(z_ij * Sim_ij), z = +1 on the diagonal, -1 off it."""
    signs = 2 * torch.eye(similarity.shape[0], device=similarity.device, dtype=similarity.dtype) - 1
    return -F.logsigmoid(signs * similarity).sum() / similarity.shape[0]


def instance_contrastive_loss(speech: Tensor, text: Tensor, similarity: str = "dot",
                              temperature: float = 0.07) -> Tensor:
    """Symmetric InfoNCE between paired (B, D) embeddings, positives on the diagonal, averaged over the
    speech-to-text and text-to-speech directions. similarity "dot": the logits are the dot products (paper);
    "cosine": cosine similarity / temperature."""
    speech, text = speech.float(), text.float()
    if similarity == "cosine":
        logits = F.normalize(speech, dim=-1) @ F.normalize(text, dim=-1).T / temperature
    elif similarity == "dot":
        logits = speech @ text.T
    else:
        raise ValueError(f"instance_similarity must be 'dot' or 'cosine', got {similarity!r}")
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def mixture_gaussian(means: Tensor, variances: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The diagonal Gaussian with the moments of the uniform mixture of a sequence's real token Gaussians:
    means, variances (B, L, D) and mask (B, L) -> mean (B, D), variance (B, D)."""
    mean = masked_mean(means, mask)
    second = masked_mean(variances + means.pow(2), mask)
    return mean, (second - mean.pow(2)).clamp_min(1e-6)


class DistributionConstructor(nn.Module):
    """Tokens (B, L, D) -> a diagonal Gaussian per token: means (B, L, D) and variances (B, L, D); a pre-norm
    residual self-attention sublayer (`heads` heads) then a linear head for each moment."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention = _Attention(dim, heads, dropout, cross=False)
        self.norm = nn.LayerNorm(dim)
        self.mean = nn.Linear(dim, dim)
        self.log_variance = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.norm(self.attention(tokens, tokens, mask)[0])
        return self.mean(hidden), self.log_variance(hidden).exp()


class TokenAlignmentBlock(nn.Module):
    """Self-attention within each modality, then cross-attention to the other one, then a feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attention = nn.ModuleList(_Attention(dim, heads, dropout, cross=False) for _ in range(2))
        self.cross_attention = nn.ModuleList(_Attention(dim, heads, dropout, cross=True) for _ in range(2))
        self.feed_forward = nn.ModuleList(nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
            nn.Dropout(dropout)) for _ in range(2))

    def forward(self, speech: Tensor, speech_mask: Tensor, text: Tensor, text_mask: Tensor,
                need_weights: bool = False) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Returns the new speech and text tokens and, with need_weights, the cross-attention weights averaged over
        heads: speech -> text (B, Ls, Lt) and text -> speech (B, Lt, Ls)."""
        speech = self.self_attention[0](speech, speech, speech_mask)[0]
        text = self.self_attention[1](text, text, text_mask)[0]
        # Both directions read the other modality's self-attention output, so neither sees the other updated first.
        (speech, to_text), (text, to_speech) = (self.cross_attention[0](speech, text, text_mask, need_weights),
                                                self.cross_attention[1](text, speech, speech_mask, need_weights))
        weights = (to_text, to_speech) if need_weights else None
        return speech + self.feed_forward[0](speech), text + self.feed_forward[1](text), weights


class _Attention(nn.Module):
    """Pre-norm residual multi-head attention of `queries` over `keys` (their padding masked out); self-attention
    when `cross` is False (the keys are the queries and share their norm)."""

    def __init__(self, dim: int, heads: int, dropout: float, *, cross: bool):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        # Self-attention reuses query_norm in forward rather than aliasing it here: an aliased module is one tensor
        # under two names, which safetensors checkpoints store once, so the saved state would not load back.
        self.key_norm = nn.LayerNorm(dim) if cross else None
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        keys = (self.query_norm if self.key_norm is None else self.key_norm)(keys)
        attended, weights = self.attention(self.query_norm(queries), keys, keys, key_padding_mask=~key_mask,
                                           need_weights=need_weights)
        return queries + self.dropout(attended), weights


class Mgcma(nn.Module):
    """MGCMA classifier. Build it with `create_model("mgcma", ...)`; see the module docstring for the design."""

    tasks = ("expression",)
    inputs = ModelInputs(frames=0, audio=True, text="transcript")

    def __init__(self, speech_encoder: Wav2Vec2Model | None, text_encoder: nn.Module | None,
                 tokenizer: PreTrainedTokenizerBase | None, *, num_classes: int = 4, audio_dim: int = 768,
                 text_dim: int = 768, hidden_dim: int = 768, heads: int = 8, num_blocks: int = 2,
                 dropout: float = 0.1, freeze_encoders: bool = False, distribution_alignment: bool = True,
                 token_alignment: bool = True, instance_alignment: bool = True, module_order: str = PAPER_ORDER,
                 distribution_mode: str = "stage", squared_distance: bool = False,
                 instance_similarity: str = "dot", loss_weights: tuple[float, float] = (1.0, 1.0),
                 temperature: float = 0.07, distribution_scale: float = 5.0, distribution_bias: float = 0.0,
                 encoder_lr_scale: float = 0.1, max_text_length: int = MAX_TRANSCRIPT_TOKENS,
                 normalize_waveform: bool = True):
        super().__init__()
        if (speech_encoder is None) != (text_encoder is None):
            raise ValueError("give both encoders (waveform + transcript inputs) or neither (token features)")
        if text_encoder is not None and tokenizer is None:
            raise ValueError("a text encoder needs its tokenizer")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if num_blocks < 1 and token_alignment:
            raise ValueError(f"token alignment needs at least one block, got num_blocks={num_blocks}")
        order = [name.strip() for name in module_order.split(",")]
        if sorted(order) != sorted(MODULES):
            raise ValueError(f"module_order must name {', '.join(MODULES)} once each, separated by commas; got "
                             f"{module_order!r}")
        if distribution_mode not in ("stage", "side"):
            raise ValueError(f"distribution_mode must be 'stage' or 'side', got {distribution_mode!r}")
        if instance_similarity not in ("dot", "cosine"):
            raise ValueError(f"instance_similarity must be 'dot' or 'cosine', got {instance_similarity!r}")
        self.speech_encoder, self.text_encoder, self.tokenizer = speech_encoder, text_encoder, tokenizer
        self.features = speech_encoder is None
        self.freeze_encoders = freeze_encoders and not self.features
        if self.freeze_encoders:
            speech_encoder.requires_grad_(False)
            text_encoder.requires_grad_(False)
        elif not self.features:
            speech_encoder.freeze_feature_encoder()
        if not self.features:
            audio_dim, text_dim = speech_encoder.config.hidden_size, text_encoder.config.hidden_size
            max_text_length = min(max_text_length, text_encoder.config.max_position_embeddings)
        self.audio_dim, self.text_dim, self.max_text_length = audio_dim, text_dim, max_text_length
        self.normalize_waveform = normalize_waveform
        self.num_classes = num_classes
        enabled = {"distribution": distribution_alignment, "token": token_alignment, "instance": instance_alignment}
        self.order = tuple(name for name in order if enabled[name])
        self.distribution_alignment, self.token_alignment = distribution_alignment, token_alignment
        self.instance_alignment = instance_alignment
        self.distribution_mode, self.squared_distance = distribution_mode, squared_distance
        self.instance_similarity = instance_similarity
        self.distribution_weight, self.instance_weight = loss_weights
        self.temperature, self.encoder_lr_scale = temperature, encoder_lr_scale

        self.speech_projection = nn.Sequential(nn.Linear(audio_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.text_projection = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        if distribution_alignment:
            self.speech_distribution = DistributionConstructor(hidden_dim, heads, dropout)
            self.text_distribution = DistributionConstructor(hidden_dim, heads, dropout)
            # p = exp(log p) stays positive, as Eq. 5 requires; W grows as sqrt(width) (W^2 as the width).
            width = hidden_dim if squared_distance else math.sqrt(hidden_dim)
            self.log_distribution_scale = nn.Parameter(torch.tensor(distribution_scale / width).log())
            self.distribution_bias = nn.Parameter(torch.tensor(float(distribution_bias)))
        if token_alignment:
            self.blocks = nn.ModuleList(TokenAlignmentBlock(hidden_dim, heads, dropout) for _ in range(num_blocks))
            self.speech_norm, self.text_norm = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.head = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden_dim, num_classes))

    def train(self, mode: bool = True) -> "Mgcma":
        super().train(mode)
        if self.freeze_encoders:
            self.speech_encoder.eval()   # frozen encoders keep dropout, layer drop and SpecAugment off
            self.text_encoder.eval()
        return self

    # ----- encoders -------------------------------------------------------------------------------------------

    def encode_speech(self, waveform: Tensor, waveform_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Right-padded waveforms (B, N) at 16 kHz + sample mask (B, N) -> Wav2Vec2 tokens (B, T, D), frame mask.
        The waveforms are normalised first when the checkpoint's feature extractor says do_normalize."""
        if self.speech_encoder is None:
            raise ValueError("this MGCMA model has no speech encoder: pass audio_tokens and audio_mask")
        if waveform.dim() != 2:
            raise ValueError(f"waveform must have shape (B, N), got {tuple(waveform.shape)}")
        mask = torch.ones_like(waveform, dtype=torch.bool) if waveform_mask is None else waveform_mask.bool()
        lengths = mask.sum(dim=1)
        if mask.shape != waveform.shape or not torch.equal(mask, _prefix_mask(lengths, waveform.shape[1])):
            raise ValueError("waveform_mask must match the waveform's shape and mark a prefix of each row "
                             "(right padding)")
        receptive_field = sum(self.speech_encoder.config.conv_kernel)
        if (lengths < receptive_field).any():
            raise ValueError(f"every waveform needs at least {receptive_field} samples, got lengths "
                             f"{lengths.tolist()}")
        if self.normalize_waveform:
            waveform = normalize_waveform(waveform, mask)
        frame_lengths = self.speech_encoder._get_feat_extract_output_lengths(lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            if self.speech_encoder.config.feat_extract_norm == "group":
                utterances = [self.speech_encoder(waveform[i:i + 1, :length]).last_hidden_state[0]
                              for i, length in enumerate(lengths.tolist())]
                tokens = nn.utils.rnn.pad_sequence(utterances, batch_first=True)
            else:
                tokens = self.speech_encoder(waveform, attention_mask=mask.long()).last_hidden_state
        return tokens, _prefix_mask(frame_lengths, tokens.shape[1])

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) -> text encoder tokens (B, L, D) and the mask of real tokens (B, L)."""
        if self.text_encoder is None:
            raise ValueError("this MGCMA model has no text encoder: pass text_tokens and text_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            tokens = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, attention_mask.bool()

    # ----- forward --------------------------------------------------------------------------------------------

    def forward(self, waveform: Tensor | None = None, waveform_mask: Tensor | None = None, *,
                audio_tokens: Tensor | None = None, audio_mask: Tensor | None = None,
                input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                text_tokens: Tensor | None = None, text_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Either `waveform` (+ `waveform_mask`) or `audio_tokens` (+ `audio_mask`), and either `input_ids`
        (+ `attention_mask`) or `text_tokens` (+ `text_mask`). Returns logits (B, C); speech_embedding and
        text_embedding (B, H), the pooled final streams the head reads; with instance alignment speech_instance and
        text_instance, the pair it contrasts; with distribution alignment the utterance Gaussians speech_mean,
        speech_variance, text_mean, text_variance (B, H); with token alignment, in evaluation, the last block's
        cross-attention text_to_speech_attention (B, Lt, Ls) and speech_to_text_attention (B, Ls, Lt), and the
        masks speech_mask, text_mask.
        """
        speech, speech_mask = self._inputs("audio", waveform, waveform_mask, audio_tokens, audio_mask,
                                           self.audio_dim, self.encode_speech)
        text, text_mask = self._inputs("text", input_ids, attention_mask, text_tokens, text_mask, self.text_dim,
                                       self.encode_text)
        if speech.shape[0] != text.shape[0]:
            raise ValueError(f"batch sizes differ: {speech.shape[0]} utterances but {text.shape[0]} transcripts")

        speech, text = self.speech_projection(speech), self.text_projection(text)
        outputs = {"speech_mask": speech_mask, "text_mask": text_mask}
        for module in self.order:      # each stage reads the token streams the previous one left
            if module == "distribution":
                speech_means, speech_variances = self.speech_distribution(speech, speech_mask)
                text_means, text_variances = self.text_distribution(text, text_mask)
                outputs["speech_mean"], outputs["speech_variance"] = mixture_gaussian(speech_means, speech_variances,
                                                                                      speech_mask)
                outputs["text_mean"], outputs["text_variance"] = mixture_gaussian(text_means, text_variances,
                                                                                  text_mask)
                if self.distribution_mode == "stage":
                    speech, text = speech_means, text_means
            elif module == "token":
                for i, block in enumerate(self.blocks):
                    last = i == len(self.blocks) - 1
                    speech, text, weights = block(speech, speech_mask, text, text_mask,
                                                  need_weights=last and not self.training)
                if weights is not None:
                    outputs["speech_to_text_attention"], outputs["text_to_speech_attention"] = weights
                speech, text = self.speech_norm(speech), self.text_norm(text)
            else:
                outputs["speech_instance"] = masked_mean(speech, speech_mask)
                outputs["text_instance"] = masked_mean(text, text_mask)
        outputs["speech_embedding"] = masked_mean(speech, speech_mask)
        outputs["text_embedding"] = masked_mean(text, text_mask)
        outputs["logits"] = self.head(torch.cat([outputs["speech_embedding"], outputs["text_embedding"]], dim=-1))
        return outputs

    def _inputs(self, modality: str, raw: Tensor | None, raw_mask: Tensor | None, tokens: Tensor | None,
                mask: Tensor | None, dim: int, encode) -> tuple[Tensor, Tensor]:
        raw_name = "waveform" if modality == "audio" else "input_ids"
        if (raw is None) == (tokens is None):
            raise ValueError(f"pass exactly one of {raw_name} or {modality}_tokens")
        if raw is not None:
            tokens, mask = encode(raw, raw_mask)
        else:
            if tokens.dim() != 3 or tokens.shape[-1] != dim:
                raise ValueError(f"{modality}_tokens must have shape (B, L, {dim}), got {tuple(tokens.shape)}")
            mask = (torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None
                    else mask.bool())
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"{modality}_mask must have shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
        empty = ~mask.any(dim=1)
        if empty.any():
            raise ValueError(f"samples {torch.nonzero(empty).flatten().tolist()} have no {modality} tokens")
        return tokens, mask

    # ----- loss and optimisation ------------------------------------------------------------------------------

    def distribution_similarity(self, output: dict[str, Tensor]) -> Tensor:
        """Eq. 5 for every speech/text pair of the batch: Sim = -p * W + q, (B, B), speech rows, text columns."""
        gaussians = [output[name].float() for name in ("speech_mean", "speech_variance", "text_mean",
                                                         "text_variance")]
        distance = wasserstein2_squared(*gaussians) if self.squared_distance else wasserstein2(*gaussians)
        return -self.log_distribution_scale.exp() * distance + self.distribution_bias

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Total = CE (class-weighted, samples labelled -1 skipped) + lambda_d * distribution contrastive
        + lambda_i * instance contrastive; the parts come back detached for logging."""
        output, labels = outputs["expression"], batches["expression"]["labels"]
        parts = {"ce": labelled_cross_entropy(output["logits"], labels, class_weights)}
        total = parts["ce"]
        if self.distribution_alignment:
            parts["distribution"] = distribution_contrastive_loss(self.distribution_similarity(output))
            total = total + self.distribution_weight * parts["distribution"]
        if self.instance_alignment:
            parts["instance"] = instance_contrastive_loss(output["speech_instance"], output["text_instance"],
                                                          self.instance_similarity, self.temperature)
            total = total + self.instance_weight * parts["instance"]
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def param_groups(self, lr: float | dict[str, float], weight_decay: float | dict[str, float] = 0.01) -> list[dict]:
        """AdamW groups: the pre-trained encoders ("encoders") and the rest ("new"); biases and norm weights (1-D
        tensors) without weight decay. Frozen parameters are left out. One lr for both: the encoders' is lr *
        encoder_lr_scale; one lr per group (the trainer's, from the recipe): each group's own."""
        def encoder(name: str) -> bool:
            return name.startswith(("speech_encoder.", "text_encoder."))

        scale = 1.0 if isinstance(lr, dict) else self.encoder_lr_scale
        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay,
                                group_of=lambda name: "encoders" if encoder(name) else "new",
                                lr_scale_of=lambda name: scale if encoder(name) else 1.0)

    # ----- explanation ----------------------------------------------------------------------------------------

    def explain(self, batch: dict, outputs: dict[str, Tensor], out_dir: Path, label_names: list[str]) -> list[Path]:
        """The first utterance's token cross-attention of the last TAM block: words x speech frames (each word's
        share of its tokens' attention to every 20 ms frame, text -> speech), under the waveform, as a PNG, and a
        JSON with both directions (text -> speech per word, speech -> text per frame)."""
        if "text_to_speech_attention" not in outputs:
            raise ValueError("this MGCMA model has no token alignment (token_alignment=false), or ran in training "
                             "mode: there is no cross-attention to draw")
        if self.tokenizer is None:
            raise ValueError("explaining needs the transcript tokenizer; this model reads cached text tokens")
        sample_id, transcript = batch["sample_ids"][0], batch["texts"][0]
        speech_frames = int(outputs["speech_mask"][0].sum())
        text_tokens = int(outputs["text_mask"][0].sum())
        to_speech = outputs["text_to_speech_attention"][0, :text_tokens, :speech_frames].float().cpu()
        to_text = outputs["speech_to_text_attention"][0, :speech_frames, :text_tokens].float().cpu()
        encoded = self.tokenizer(transcript, truncation=True, max_length=self.max_text_length)
        word_of = encoded.word_ids()
        words = sorted({w for w in word_of if w is not None})
        spans = [encoded.word_to_chars(w) for w in words]
        names = [transcript[span.start:span.end] for span in spans]
        members = [[i for i, w in enumerate(word_of) if w == word] for word in words]
        matrix = torch.stack([to_speech[m].mean(0) for m in members]).numpy()           # (words, frames)
        by_frame = torch.stack([to_text[:, m].sum(1) for m in members], dim=1).numpy()    # (frames, words)
        seconds_per_frame = float(batch["waveform_mask"][0].sum()) / SAMPLE_RATE / speech_frames
        probabilities = outputs["logits"][0].float().softmax(-1).cpu()
        title = prediction_title(sample_id, probabilities, label_names, int(batch["labels"][0]))
        waveform = batch["waveform"][0, :int(batch["waveform_mask"][0].sum())].float().cpu().numpy()
        figure = _plot_token_attention(matrix, names, waveform, seconds_per_frame, title)
        return write_explanation(figure, {
            "transcript": transcript, "words": names, "predicted": label_names[int(probabilities.argmax())],
            "probabilities": probabilities.tolist(), "seconds_per_frame": seconds_per_frame,
            "text_to_speech": matrix.tolist(), "speech_to_text": by_frame.tolist()}, out_dir, "token-attention",
            sample_id)

    # ----- registry convention --------------------------------------------------------------------------------

    def batch_inputs(self, batch: dict) -> dict[str, Tensor]:
        """A collated batch -> forward kwargs: waveform + mask and the tokenised transcripts (batch["texts"]); in
        features mode the cached audio_tokens/audio_mask and text_tokens/text_mask."""
        if self.features:
            return {key: batch[key] for key in ("audio_tokens", "audio_mask", "text_tokens", "text_mask")}
        waveform = batch["waveform"]
        encoded = self.tokenizer(list(batch["texts"]), padding=True, truncation=True,
                                 max_length=self.max_text_length, return_tensors="pt")
        return {"waveform": waveform, "waveform_mask": batch["waveform_mask"],
                "input_ids": encoded["input_ids"].to(waveform.device),
                "attention_mask": encoded["attention_mask"].to(waveform.device)}

    def example_inputs(self, batch_size: int = 2, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random inputs of the right shapes, the last sample padded to half length in both modalities."""
        device = next(self.parameters()).device
        length = 6
        text_mask = torch.ones(batch_size, length, dtype=torch.bool)
        text_mask[-1, length // 2:] = False
        if self.features:
            audio_mask = torch.ones(batch_size, EXAMPLE_FRAMES, dtype=torch.bool)
            audio_mask[-1, EXAMPLE_FRAMES // 2:] = False
            audio = torch.randn(batch_size, EXAMPLE_FRAMES, self.audio_dim, generator=generator)
            return {"audio_tokens": audio.to(device), "audio_mask": audio_mask.to(device),
                    "text_tokens": torch.randn(batch_size, length, self.text_dim, generator=generator).to(device),
                    "text_mask": text_mask.to(device)}
        samples = EXAMPLE_FRAMES * math.prod(self.speech_encoder.config.conv_stride)
        waveform_mask = torch.ones(batch_size, samples, dtype=torch.bool)
        waveform_mask[-1, samples // 2:] = False
        waveform = (torch.rand(batch_size, samples, generator=generator) * 2 - 1) * waveform_mask
        ids = torch.randint(0, self.text_encoder.config.vocab_size, (batch_size, length), generator=generator)
        return {"waveform": waveform.to(device), "waveform_mask": waveform_mask.to(device),
                "input_ids": (ids * text_mask).to(device), "attention_mask": text_mask.long().to(device)}


def _prefix_mask(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device) < lengths[:, None]


def _plot_token_attention(matrix: np.ndarray, words: list[str], waveform: np.ndarray, seconds_per_frame: float,
                          title: str) -> "Figure":
    """The waveform over time, and below it the words x frames attention on the same time axis."""
    rows, frames = matrix.shape
    duration = frames * seconds_per_frame
    figure = new_figure(min(16.0, 4.0 + 2.0 * duration), 1.8 + 0.3 * rows, layout="constrained")
    wave, heat = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.0, max(1.5, 0.3 * rows)]})
    wave.plot(np.arange(len(waveform)) / SAMPLE_RATE, waveform, linewidth=0.5, color="0.3")
    wave.set_yticks([])
    wave.set_title(title, fontsize=9)
    image = heat.imshow(matrix, aspect="auto", cmap="viridis", extent=(0, duration, rows - 0.5, -0.5),
                        interpolation="nearest")
    figure.colorbar(image, ax=[wave, heat], label="attention weight")
    heat.set_yticks(range(rows), [textwrap.shorten(w, 24) for w in words], fontsize=7)
    heat.set_xlabel("time (s): speech frames each word attends to (last token-alignment block, text -> speech)")
    return figure


_SHORT = {"distribution": "DAM", "token": "TAM", "instance": "IAM"}


def _module_rows() -> list[Ablation]:
    """Every subset of the three modules: the summary says each module helps and the three together do best,
    without giving the table's rows."""
    rows = []
    for kept in itertools.product((True, False), repeat=3):
        on = [_SHORT[m] for m, k in zip(MODULES, kept) if k]
        off = [_SHORT[m] for m, k in zip(MODULES, kept) if not k]
        label = (" + ".join(on) if len(on) == 3 else f"w/o {off[0]}" if len(on) == 2 else f"{on[0]} only" if on
                 else "no alignment module")
        rows.append(Ablation("Ablation: alignment modules", label,
                             {f"model.{m}_alignment": False for m, k in zip(MODULES, kept) if not k}))
    return rows


def _order_rows() -> list[Ablation]:
    """Every order of the three modules (the summary names the order as an ablation, DAM -> TAM -> IAM best,
    without listing the orders compared), and DAM as a side branch."""
    rows = [Ablation("Ablation: module order", " -> ".join(_SHORT[m] for m in order),
                     {} if ",".join(order) == PAPER_ORDER else {"model.module_order": ",".join(order)})
            for order in itertools.permutations(MODULES)]
    return rows + [Ablation("Ablation: module order", "DAM as a side branch (feeds only its loss)",
                            {"model.distribution_mode": "side"})]


@register_model("mgcma", ablations=_module_rows() + _order_rows(), needs=("speech_features",))
def mgcma(tiny: bool = False, *, num_classes: int = 4, speech_encoder: str | None = None,
          text_encoder: str | None = None, features: bool = False, audio_dim: int = 768, text_dim: int = 768,
          hidden_dim: int | None = None, heads: int | None = None, **options) -> Mgcma:
    """MGCMA on Wav2Vec2-base + BERT-base sized encoders, or the tiny variant (width 32, random tiny encoders).

    speech_encoder / text_encoder: paths (or cached hub ids) loaded with `from_pretrained`; the transcript
    tokenizer comes from text_encoder's folder, the waveform normalisation from speech_encoder's feature extractor
    config (do_normalize). None gives a randomly initialised encoder of the base (tiny: tiny) config and the
    offline character tokenizer, as good as any for an encoder that has learned no vocabulary. features=True builds
    no encoders: the model takes precomputed token features of sizes audio_dim and text_dim. Further options go to
    `Mgcma` (num_blocks, dropout, freeze_encoders, distribution_alignment, token_alignment, instance_alignment,
    module_order, distribution_mode, squared_distance, instance_similarity, loss_weights, temperature,
    encoder_lr_scale, ...).
    """
    speech_model = text_model = tokenizer = None
    if not features:
        if speech_encoder is not None:
            speech_model = Wav2Vec2Model.from_pretrained(speech_encoder)
        else:
            speech_model = Wav2Vec2Model(Wav2Vec2Config(**(TINY_SPEECH if tiny else {})))
        options.setdefault("normalize_waveform", normalizes_waveform(speech_encoder))
        if text_encoder is not None:
            text_model, tokenizer = AutoModel.from_pretrained(text_encoder), load_tokenizer(text_encoder)
            if getattr(text_model, "pooler", None) is not None:
                text_model.pooler = None   # unused; dropping it keeps every trainable parameter in the graph
        else:
            text_model = BertModel(BertConfig(**(TINY_TEXT if tiny else {})), add_pooling_layer=False)
            tokenizer = tiny_tokenizer()
    return Mgcma(speech_model, text_model, tokenizer, num_classes=num_classes, audio_dim=audio_dim,
                 text_dim=text_dim, hidden_dim=hidden_dim or (32 if tiny else 768), heads=heads or (2 if tiny else 8),
                 **options)
