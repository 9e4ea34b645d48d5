"""MGCMA (Wang et al., 2024): speech + transcript emotion recognition with multi-granularity cross-modal alignment.

Pipeline, in the paper's order (coarse to fine):
  E_s, E_t  Wav2Vec2 on the 16 kHz waveform and BERT on the transcript -> token features (paper: feature extractor);
            or precomputed token features (`features=True`, the features cache). Fine-tuned by default with
            Wav2Vec2's convolutional feature encoder frozen, as is usual when fine-tuning Wav2Vec2;
            `freeze_encoders=True` freezes both encoders.
  P         per-modality linear projection + LayerNorm into one width, so the two modalities can be compared.
  DAM       distribution-based alignment. A distribution constructor per modality turns the projected tokens into
            a diagonal Gaussian N(mu, diag(sigma)) of the utterance: mu and log sigma are each a multi-head
            attention pooling over the real tokens (learned query) and a linear layer. mu is L2-normalised, so
            ||mu_1 - mu_2||^2 lies in [0, 4] and p, q below have a scale independent of the width.
            The 2-Wasserstein distance between diagonal Gaussians has the closed form
                W(N_1, N_2) = ||mu_1 - mu_2||^2 + ||sqrt(sigma_1) - sqrt(sigma_2)||^2
            (sigma the variances; the squared distance, which the closed form gives directly and which, unlike
            its square root, is differentiable where two distributions coincide). Eq. 5: Sim = -p * W + q with
            learnable p > 0 and q. These similarities of every speech/text pair in the batch are the logits of a
            contrastive loss whose positives are the true pairs. The loss is the sigmoid (pairwise) form, as in
            PCME's matching probability and SigLIP: under a softmax over the batch the bias q would cancel and
            never learn. p and q start at 5, so unrelated pairs (W about 2) start at logit -5.
  TAM       token-based alignment: N blocks; in each, every modality's tokens first attend to themselves
            (self-attention, inputs from the previous block's cross-attention output), then to the other
            modality's tokens (cross-attention, inputs from this block's self-attention output), then a
            feed-forward layer; pre-norm residual sublayers.
  IAM       instance-based alignment: the two modalities' masked-mean pooled TAM outputs are contrasted (symmetric
            InfoNCE over the batch; logits the dot products of the L2-normalised pair / temperature 0.07, so the
            scale of the features cannot saturate the softmax; positives the true pairs).
  head      the two pooled vectors, concatenated -> MLP -> emotion logits; cross-entropy.
The Gaussians feed only the loss: DAM shapes the projected tokens (and the encoders) that TAM then reads, which
is what makes the paper's coarse-to-fine order meaningful.
Total loss = CE + lambda_d * L_dist + lambda_i * L_inst. Not in our notes of the paper, so defaults here: lambdas
1, N = 2 blocks, width 768, 8 heads, fine-tuned encoders. Ablations: `distribution_alignment`, `token_alignment`,
`instance_alignment` switch each module off (its loss term and its parameters disappear; without TAM the
projected tokens are pooled directly).

Padding is masked everywhere: BERT and the attention layers take the token masks, pooling skips padding, and
Wav2Vec2's frame mask comes from the sample mask through `_get_feat_extract_output_lengths`. Wav2Vec2-base
normalises its first convolution over the whole time axis (GroupNorm), so padding would leak into every frame of a
shorter utterance; such encoders (feat_extract_norm="group") therefore run each utterance on its own samples,
while LayerNorm encoders (e.g. large-lv60) run batched with the attention mask. Waveforms are right-padded.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel, PreTrainedTokenizerBase, Wav2Vec2Config, Wav2Vec2Model

from .grace import masked_mean
from .layers.optim import parameter_groups
from .losses import labelled_cross_entropy
from .registry import ModelInputs, register_model
from .text import TINY_VOCAB_SIZE, load_tokenizer, tiny_tokenizer

# Tiny configs: forward + backward in well under a second on CPU. The tiny Wav2Vec2 downsamples 20x (two
# convolutions, strides 5 and 4) where the base one downsamples 320x (20 ms frames).
TINY_SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4, mask_time_length=2)
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
# example_inputs' waveforms give about this many Wav2Vec2 frames (one second for the base config).
EXAMPLE_FRAMES = 50


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


def distribution_contrastive_loss(distance: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Sigmoid contrastive loss on the similarities -scale * distance + bias (Eq. 5) of a (B, B) distance matrix
    whose diagonal holds the true pairs: -1/B sum_ij log sigmoid(z_ij * Sim_ij), z = +1 on the diagonal, -1 off it.
    """
    similarity = -scale * distance + bias
    signs = 2 * torch.eye(distance.shape[0], device=distance.device, dtype=similarity.dtype) - 1
    return -F.logsigmoid(signs * similarity).sum() / distance.shape[0]


def instance_contrastive_loss(speech: Tensor, text: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between paired (B, D) embeddings: cosine similarity / temperature, positives on the
    diagonal, averaged over the speech-to-text and text-to-speech directions."""
    logits = F.normalize(speech.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class AttentionPool(nn.Module):
    """A learned query attending over the real tokens (multi-head), then a linear layer: (B, L, D) -> (B, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1)
        pooled, _ = self.attention(query, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return self.out(pooled[:, 0])


class DistributionConstructor(nn.Module):
    """Tokens (B, L, D) -> a diagonal Gaussian per utterance: unit-norm mean (B, D) and variances (B, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mean = AttentionPool(dim, heads)
        self.log_variance = AttentionPool(dim, heads)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.mean(tokens, mask), dim=-1), self.log_variance(tokens, mask).exp()


class TokenAlignmentBlock(nn.Module):
    """Self-attention within each modality, then cross-attention to the other one, then a feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attention = nn.ModuleList(_Attention(dim, heads, dropout, cross=False) for _ in range(2))
        self.cross_attention = nn.ModuleList(_Attention(dim, heads, dropout, cross=True) for _ in range(2))
        self.feed_forward = nn.ModuleList(nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
            nn.Dropout(dropout)) for _ in range(2))

    def forward(self, speech: Tensor, speech_mask: Tensor, text: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        speech = self.self_attention[0](speech, speech, speech_mask)
        text = self.self_attention[1](text, text, text_mask)
        # Both directions read the other modality's self-attention output, so neither sees the other updated first.
        speech, text = (self.cross_attention[0](speech, text, text_mask),
                        self.cross_attention[1](text, speech, speech_mask))
        return speech + self.feed_forward[0](speech), text + self.feed_forward[1](text)


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

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        keys = (self.query_norm if self.key_norm is None else self.key_norm)(keys)
        attended, _ = self.attention(self.query_norm(queries), keys, keys, key_padding_mask=~key_mask,
                                     need_weights=False)
        return queries + self.dropout(attended)


class Mgcma(nn.Module):
    """MGCMA classifier. Build it with `create_model("mgcma", ...)`; see the module docstring for the design."""

    tasks = ("expression",)
    inputs = ModelInputs(frames=0, audio=True, text="transcript")

    def __init__(self, speech_encoder: Wav2Vec2Model | None, text_encoder: nn.Module | None,
                 tokenizer: PreTrainedTokenizerBase | None, *, num_classes: int = 4, audio_dim: int = 768,
                 text_dim: int = 768, hidden_dim: int = 768, heads: int = 8, num_blocks: int = 2,
                 dropout: float = 0.1, freeze_encoders: bool = False, distribution_alignment: bool = True,
                 token_alignment: bool = True, instance_alignment: bool = True,
                 loss_weights: tuple[float, float] = (1.0, 1.0), temperature: float = 0.07,
                 distribution_scale: float = 5.0, distribution_bias: float = 5.0, encoder_lr_scale: float = 0.1,
                 max_text_length: int = 512):
        super().__init__()
        if (speech_encoder is None) != (text_encoder is None):
            raise ValueError("give both encoders (waveform + transcript inputs) or neither (token features)")
        if text_encoder is not None and tokenizer is None:
            raise ValueError("a text encoder needs its tokenizer")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if num_blocks < 1 and token_alignment:
            raise ValueError(f"token alignment needs at least one block, got num_blocks={num_blocks}")
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
        self.num_classes = num_classes
        self.distribution_alignment, self.token_alignment = distribution_alignment, token_alignment
        self.instance_alignment = instance_alignment
        self.distribution_weight, self.instance_weight = loss_weights
        self.temperature, self.encoder_lr_scale = temperature, encoder_lr_scale

        self.speech_projection = nn.Sequential(nn.Linear(audio_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.text_projection = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        if distribution_alignment:
            self.speech_distribution = DistributionConstructor(hidden_dim, heads)
            self.text_distribution = DistributionConstructor(hidden_dim, heads)
            # p = exp(log p) stays positive, as Eq. 5 requires.
            self.log_distribution_scale = nn.Parameter(torch.tensor(float(distribution_scale)).log())
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
        """Right-padded waveforms (B, N) at 16 kHz + sample mask (B, N) -> Wav2Vec2 tokens (B, T, D), frame mask."""
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
        text_embedding (B, H), the pooled pair for the instance loss; with distribution alignment, the Gaussians
        speech_mean, speech_variance, text_mean, text_variance (B, H).
        """
        speech, speech_mask = self._inputs("audio", waveform, waveform_mask, audio_tokens, audio_mask,
                                           self.audio_dim, self.encode_speech)
        text, text_mask = self._inputs("text", input_ids, attention_mask, text_tokens, text_mask, self.text_dim,
                                       self.encode_text)
        if speech.shape[0] != text.shape[0]:
            raise ValueError(f"batch sizes differ: {speech.shape[0]} utterances but {text.shape[0]} transcripts")

        speech, text = self.speech_projection(speech), self.text_projection(text)
        outputs = {}
        if self.distribution_alignment:
            outputs["speech_mean"], outputs["speech_variance"] = self.speech_distribution(speech, speech_mask)
            outputs["text_mean"], outputs["text_variance"] = self.text_distribution(text, text_mask)
        if self.token_alignment:
            for block in self.blocks:
                speech, text = block(speech, speech_mask, text, text_mask)
            speech, text = self.speech_norm(speech), self.text_norm(text)
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

    def loss(self, outputs: dict[str, dict[str, Tensor]], batches: dict[str, dict],
             class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """Total = CE (class-weighted, samples labelled -1 skipped) + lambda_d * distribution contrastive
        + lambda_i * instance contrastive; the parts come back detached for logging."""
        output, labels = outputs["expression"], batches["expression"]["labels"]
        logits = output["logits"]
        parts = {"ce": labelled_cross_entropy(logits, labels, class_weights)}
        total = parts["ce"]
        if self.distribution_alignment:
            distance = wasserstein2_squared(output["speech_mean"].float(), output["speech_variance"].float(),
                                            output["text_mean"].float(), output["text_variance"].float())
            parts["distribution"] = distribution_contrastive_loss(distance, self.log_distribution_scale.exp(),
                                                                  self.distribution_bias)
            total = total + self.distribution_weight * parts["distribution"]
        if self.instance_alignment:
            parts["instance"] = instance_contrastive_loss(output["speech_embedding"], output["text_embedding"],
                                                          self.temperature)
            total = total + self.instance_weight * parts["instance"]
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}

    def param_groups(self, lr: float, weight_decay: float = 0.01) -> list[dict]:
        """AdamW groups: the pre-trained encoders at lr * encoder_lr_scale, the rest at lr; biases and norm weights
        (1-D tensors) without weight decay. Frozen parameters are left out."""
        def encoder(name: str) -> bool:
            return name.startswith(("speech_encoder.", "text_encoder."))

        return parameter_groups(self.named_parameters(), lr=lr, weight_decay=weight_decay,
                                group_of=lambda name: "encoders" if encoder(name) else "new",
                                lr_scale_of=lambda name: self.encoder_lr_scale if encoder(name) else 1.0)

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


@register_model("mgcma")
def mgcma(tiny: bool = False, *, num_classes: int = 4, speech_encoder: str | None = None,
          text_encoder: str | None = None, features: bool = False, audio_dim: int = 768, text_dim: int = 768,
          hidden_dim: int | None = None, heads: int | None = None, **options) -> Mgcma:
    """MGCMA on Wav2Vec2-base + BERT-base sized encoders, or the tiny variant (width 32, random tiny encoders).

    speech_encoder / text_encoder: paths (or cached hub ids) loaded with `from_pretrained`; the transcript
    tokenizer comes from text_encoder's folder. None gives a randomly initialised encoder of the base (tiny:
    tiny) config and the offline character tokenizer, as good as any for an encoder that has learned no
    vocabulary. features=True builds no encoders: the model takes precomputed token features of sizes audio_dim
    and text_dim. Further options go to `Mgcma` (num_blocks, dropout, freeze_encoders, distribution_alignment,
    token_alignment, instance_alignment, loss_weights, temperature, encoder_lr_scale, ...).
    """
    speech_model = text_model = tokenizer = None
    if not features:
        if speech_encoder is not None:
            speech_model = Wav2Vec2Model.from_pretrained(speech_encoder)
        else:
            speech_model = Wav2Vec2Model(Wav2Vec2Config(**(TINY_SPEECH if tiny else {})))
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
