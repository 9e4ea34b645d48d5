"""LGI-Former, MAE-DFER's video encoder (Sun et al., ACM MM 2023, Sec. 3.2), with the public checkpoints' names.

GRACE (Sec. IV-A3) uses "VideoMAE pretrained on VoxCeleb2, following the MAE-DFER setup ... via LGIFormer". The
encoder, written here from the MAE-DFER paper and the facts of its public release:

- Tubelet embedding: a Conv3d of kernel = stride = (tubelet, patch, patch) over (B, 3, T, H, W); tokens ordered
  (t, h, w); fixed sine-cosine position table (not a parameter, so not in the checkpoints). Release: 16 frames of
  160 x 160, patch 16, tubelet 2 -> 8 x 10 x 10 = 800 tokens of width 512, 16 blocks, 8 heads, MLP ratio 4,
  LayerNorm eps 1e-6, q/v biases but no k bias.
- The token grid is cut into non-overlapping regions of (2, 5, 10) tokens (8 regions of 100); each region gets a
  learnable representative ("messenger") token, `lg_region_tokens` (regions, D).
- Each block: (1) local intra-region self-attention over [representative, region tokens]; (2) global
  inter-region self-attention among the representatives; (3) local-global interaction: every token of the clip
  attends (cross-attention) to all representatives; then (4) an MLP on every token. Pre-norm residuals, drop
  path per branch rising linearly over depth.
- Output here: the original (non-representative) tokens in (t, h, w) order after a final LayerNorm, shape
  (B, T' * H' * W', D) like Hugging Face VideoMAE's last_hidden_state, plus the representatives on request.

Checkpoint names (MAE-DFER's modeling_pretrain / modeling_finetune): patch_embed.proj.{weight,bias};
blocks.N.{first_attn_norm0, second_attn_norm0, third_attn_norm0, third_attn_norm1, norm2}.{weight,bias};
blocks.N.{first,second,third}_attn.{q.weight, kv.weight, q_bias, v_bias, proj.weight, proj.bias};
blocks.N.mlp.fc{1,2}.{weight,bias}; lg_region_tokens; norm.{weight,bias}. The VoxCeleb2 pre-training release nests
them under "encoder." beside the MAE decoder (decoder.*, encoder_to_decoder.weight, mask_token: not part of the
encoder, left out); a DFEW fine-tuned release has them unprefixed with fc_norm (read here as the final norm: a
choice, it normalised the pooled representatives there) and a 7-class head (left out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affectprep.config import ConfigError

from .checkpoints import load_exactly, nested_state_dict, read_checkpoint, split_keys


@dataclass(frozen=True)
class LGIFormerConfig:
    """Attribute names shared with transformers' VideoMAEConfig where the meaning is the same."""
    image_size: int = 160
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    num_channels: int = 3
    hidden_size: int = 512
    num_hidden_layers: int = 16
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    region_size: tuple[int, int, int] = (2, 5, 10)    # (t, h, w) tokens per region
    layer_norm_eps: float = 1e-6

    @property
    def token_grid(self) -> tuple[int, int, int]:
        side = self.image_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def region_grid(self) -> tuple[int, int, int]:
        return tuple(n // r for n, r in zip(self.token_grid, self.region_size))

    def __post_init__(self) -> None:
        if any(n % r for n, r in zip(self.token_grid, self.region_size)) or min(self.region_size) < 1:
            raise ValueError(f"LGI-Former regions {self.region_size} do not tile the token grid {self.token_grid}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")


MAE_DFER_BASE = LGIFormerConfig()


def sinusoid_table(positions: int, dim: int) -> Tensor:
    """The fixed position table of "Attention is all you need" (VideoMAE's get_sinusoid_encoding_table)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2) / dim
    angles = position / torch.pow(10000.0, exponent.to(torch.float64))[None]
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float()


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample in training, rescaling the kept ones."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = 1 - self.rate
        mask = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head (cross-)attention with q and v biases and no k bias (VideoMAE's qkv_bias convention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        batch, length, dim = x.shape
        q = F.linear(x, self.q.weight, self.q_bias)
        kv = F.linear(context, self.kv.weight, torch.cat([torch.zeros_like(self.v_bias), self.v_bias]))
        k, v = kv.chunk(2, dim=-1)
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LGIBlock(nn.Module):
    """One LGI-Former block over (B * R, 1 + S, D): representative first, then the region's S tokens."""

    def __init__(self, config: LGIFormerConfig, drop_path: float):
        super().__init__()
        dim, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        self.first_attn_norm0 = nn.LayerNorm(dim, eps=eps)
        self.first_attn = Attention(dim, heads)
        self.second_attn_norm0 = nn.LayerNorm(dim, eps=eps)
        self.second_attn = Attention(dim, heads)
        self.third_attn_norm0 = nn.LayerNorm(dim, eps=eps)
        self.third_attn_norm1 = nn.LayerNorm(dim, eps=eps)
        self.third_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, config.intermediate_size)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, batch: int) -> Tensor:
        regions, size = x.shape[0] // batch, x.shape[1] - 1
        # (1) local intra-region self-attention, representatives included
        x = x + self.drop_path(self.first_attn(self.first_attn_norm0(x)))
        # (2) global inter-region self-attention among the representatives of each clip
        messengers = x[:, 0].reshape(batch, regions, -1)
        messengers = messengers + self.drop_path(self.second_attn(self.second_attn_norm0(messengers)))
        # (3) local-global interaction: every token of the clip queries all representatives
        local = x[:, 1:].reshape(batch, regions * size, -1)
        local = local + self.drop_path(self.third_attn(self.third_attn_norm0(local),
                                                        context=self.third_attn_norm1(messengers)))
        x = torch.cat([messengers.reshape(batch * regions, 1, -1), local.reshape(batch * regions, size, -1)], dim=1)
        # (4) feed-forward on every token
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, config: LGIFormerConfig):
        super().__init__()
        kernel = (config.tubelet_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.num_channels, config.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:          # (B, C, T, H, W) -> (B, T'H'W', D), (t, h, w) order
        return self.proj(x).flatten(2).transpose(1, 2)


class LGIFormer(nn.Module):
    """MAE-DFER's encoder. forward(pixel_values (B, T, C, H, W)) -> tokens (B, T'*H'*W', D)."""

    def __init__(self, config: LGIFormerConfig = MAE_DFER_BASE, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        grid = config.token_grid
        self.patch_embed = PatchEmbed(config)
        self.register_buffer("pos_embed", sinusoid_table(math.prod(grid), config.hidden_size), persistent=False)
        depth = config.num_hidden_layers
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(LGIBlock(config, rate) for rate in rates)
        self.lg_region_tokens = nn.Parameter(torch.zeros(math.prod(config.region_grid), config.hidden_size))
        nn.init.trunc_normal_(self.lg_region_tokens, std=0.02)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(_init_weights)

    def forward(self, pixel_values: Tensor, return_regions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        config = self.config
        expected = (config.num_frames, config.num_channels, config.image_size, config.image_size)
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"LGI-Former expects frames of shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixel_values.shape)}")
        batch = pixel_values.shape[0]
        x = self.patch_embed(pixel_values.transpose(1, 2)) + self.pos_embed.to(pixel_values.dtype)
        x = self._to_regions(x)                                                    # (B, R, S, D)
        regions = self.lg_region_tokens[None, :, None].expand(batch, -1, -1, -1).to(x.dtype)
        x = torch.cat([regions, x], dim=2).flatten(0, 1)                           # (B*R, 1+S, D)
        for block in self.blocks:
            x = block(x, batch)
        x = x.reshape(batch, -1, *x.shape[1:])
        tokens = self.norm(self._from_regions(x[:, :, 1:]))
        return (tokens, self.norm(x[:, :, 0])) if return_regions else tokens

    def _to_regions(self, x: Tensor) -> Tensor:
        (nt, nh, nw), (t, h, w) = self.config.region_grid, self.config.region_size
        batch, _, dim = x.shape
        x = x.reshape(batch, nt, t, nh, h, nw, w, dim).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(batch, nt * nh * nw, t * h * w, dim)

    def _from_regions(self, x: Tensor) -> Tensor:
        (nt, nh, nw), (t, h, w) = self.config.region_grid, self.config.region_size
        batch, dim = x.shape[0], x.shape[-1]
        x = x.reshape(batch, nt, nh, nw, t, h, w, dim).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(batch, nt * t * nh * h * nw * w, dim)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---- the public checkpoints ---------------------------------------------------------------------------------------

_WHAT = "MAE-DFER checkpoint"
# Pre-training release: the MAE's decoder side; fine-tuned release: the classifier. Neither belongs to the encoder.
_PRETRAINING_EXTRAS = ("decoder.", "encoder_to_decoder.", "mask_token")
_FINETUNED_EXTRAS = ("head.",)


def load_mae_dfer(path: Path | str, drop_path_rate: float = 0.0) -> tuple[LGIFormer, list[str]]:
    """An LGIFormer with the weights of a MAE-DFER release file, and the names deliberately left out (the MAE
    decoder of a pre-training checkpoint, the head of a fine-tuned one). Any other mismatch is a ConfigError."""
    state, config = _encoder_state(path)
    model = LGIFormer(config, drop_path_rate)
    load_exactly(model, state[0], path, _WHAT)
    return model, state[1]


def mae_dfer_config(path: Path | str) -> LGIFormerConfig:
    """The encoder configuration a MAE-DFER release file was trained with (see `_config_of`)."""
    return _encoder_state(path)[1]


def _encoder_state(path: Path | str) -> tuple[tuple[dict[str, Tensor], list[str]], LGIFormerConfig]:
    checkpoint = read_checkpoint(path, _WHAT)
    state = nested_state_dict(checkpoint, path, _WHAT)
    # DDP / fine-tuning wrappers MAE-DFER's own loader strips ("module.", "backbone."), then the pre-training
    # encoder's "encoder." prefix.
    state = {_strip(k, "module.", "backbone."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        kept, ignored = split_keys(state, lambda k: k.startswith(_PRETRAINING_EXTRAS))
        kept = {_strip(k, "encoder."): v for k, v in kept.items()}
    else:
        kept, ignored = split_keys(state, lambda k: k.startswith(_FINETUNED_EXTRAS))
        kept = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in kept.items()}
    return (kept, ignored), _config_of(kept, checkpoint.get("args"), path)


def _strip(key: str, *prefixes: str) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _config_of(state: dict[str, Tensor], args, path: Path | str) -> LGIFormerConfig:
    """Width, tubelet, patch, depth and MLP width from the tensors; frames, input size and region size from the
    saved training args (MAE-DFER's argparse Namespace: num_frames, input_size, lg_region_size), else the release
    values (16, 160, (2, 5, 10)). Heads: width / 64, as in the release (512 / 8) and every ViT-B."""
    patch = state.get("patch_embed.proj.weight")
    if patch is None or patch.dim() != 5:
        raise ConfigError(f"{_WHAT} {path} does not fit: missing patch_embed.proj.weight (keys: "
                          f"{', '.join(list(state)[:4])} ...)")
    hidden, channels, tubelet, patch_size = patch.shape[0], patch.shape[1], patch.shape[2], patch.shape[3]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    saved = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    try:
        return LGIFormerConfig(
            image_size=int(saved.get("input_size", MAE_DFER_BASE.image_size)), patch_size=int(patch_size),
            num_frames=int(saved.get("num_frames", MAE_DFER_BASE.num_frames)), tubelet_size=int(tubelet),
            num_channels=int(channels), hidden_size=int(hidden), num_hidden_layers=depth,
            num_attention_heads=max(1, int(hidden) // 64),
            intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * int(hidden),
            region_size=tuple(int(r) for r in saved.get("lg_region_size", MAE_DFER_BASE.region_size)))
    except ValueError as e:
        raise ConfigError(f"{_WHAT} {path}: {e}") from None
