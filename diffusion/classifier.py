"""The ADM noise-aware classifier (Dhariwal & Nichol 2021): the UNet's downsampling half and middle block, then a
normalised, attention-pooled head to class logits. classifier(x_t [B, C, H, W], t [B]) -> logits [B, num_classes].

Layout and parameter names (ADM's EncoderUNetModel names in brackets, for converting its checkpoints):

    time_embed.{0,2}      Linear(mc, 4mc), SiLU, Linear(4mc, 4mc)                     [time_embed.{0,2}]
    conv_in               3x3 conv in_channels -> mc                                 [input_blocks.0.0]
    enc.{i}.body          ResBlock or downsampling ResBlock / Downsample             [input_blocks.{i+1}.0]
                            norm1 [in_layers.0], conv1 [in_layers.2], emb [emb_layers.1],
                            norm2 [out_layers.0], conv2 [out_layers.3], skip [skip_connection]
                            Downsample: op [op]
    enc.{i}.attn          AttentionBlock: norm, qkv (Linear 3C x C), proj            [input_blocks.{i+1}.1:
                            norm, qkv (conv1d, ADM's legacy per-head q|k|v order: permute rows), proj_out]
    mid.0.body, mid.0.attn, mid.1.body                                               [middle_block.{0,1,2}]
    norm_out              GroupNorm (+SiLU)                                          [out.0]
    pool                  AttentionPool2d: positional_embedding [C, HW + 1],         [out.2: positional_embedding,
                            qkv (Linear 3C x C, q|k|v then heads), c_proj (Linear K x C)    qkv_proj, c_proj (conv1d)]
    (pool = "adaptive": pool.proj, a zero-initialised 1x1 conv C -> K)               [out.3]

The ResBlock, AttentionBlock, Downsample and UNetBlock modules are diffusion.unet's, so the numerics (float32 group
norms, scale-shift embedding, fused attention) are the UNet's. Only query 0 (the mean token) is computed in the
attention pool: ADM's output is that token's row, so the result is the same.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .nn import CastConv2d, CastLinear, GroupNormSiLU, timestep_embedding, zero_
from .unet import AttentionBlock, Downsample, ResBlock, UNetBlock, reachable_resolutions

KIND = "encoder_classifier"  # the "kind" of a classifier's model config (the JSON beside exported weights)
POOLS = ("attention", "adaptive")


class AttentionPool2d(nn.Module):
    """CLIP/ADM attention pooling: the mean token (plus a learned position embedding) attends over itself and the
    H*W positions; its output, projected, is the result. x: [B, C, H, W] with H*W = spatial ** 2 -> [B, out_dim]."""

    def __init__(self, spatial: int, ch: int, head_channels: int, out_dim: int) -> None:
        super().__init__()
        if ch % head_channels:
            raise ValueError(f"pool channels {ch} are not divisible by num_head_channels {head_channels}")
        self.num_heads = ch // head_channels
        self.positional_embedding = nn.Parameter(torch.randn(ch, spatial ** 2 + 1) / ch ** 0.5)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.c_proj = nn.Linear(ch, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        h = x.flatten(2)                                              # [B, C, L]
        h = torch.cat([h.mean(-1, keepdim=True), h], -1) + self.positional_embedding.to(h.dtype)
        qkv = self.qkv(h.transpose(1, 2))                             # [B, L+1, 3C]
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, C // self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q[:, :, :1], k, v)         # [B, heads, 1, C/heads]
        return self.c_proj(a.transpose(1, 2).flatten(2))[:, 0]


class AdaptivePool(nn.Module):
    """Global average pool, then a zero-initialised 1x1 projection to the logits: [B, C, H, W] -> [B, out_dim]."""

    def __init__(self, ch: int, out_dim: int) -> None:
        super().__init__()
        self.proj = zero_(nn.Conv2d(ch, out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean((2, 3), keepdim=True)).flatten(1)


class EncoderClassifier(nn.Module):
    """ADM's encoder classifier. Call as classifier(x [B, in_channels, H, W], t [B] timesteps) -> [B, num_classes]
    logits in float32 (the head runs in the parameters' dtype; bf16/fp16 parameters take fp32 inputs).

    Arguments as diffusion.unet.UNetModel (attention_resolutions in pixels); num_res_blocks is ADM's
    classifier_depth; pool "attention" (ADM's ImageNet classifiers) or "adaptive".
    """

    def __init__(self, *, image_size: int, in_channels: int = 3, model_channels: int = 128, num_res_blocks: int = 4,
                 attention_resolutions: Sequence[int] = (32, 16, 8), channel_mult: Sequence[int] = (1, 2, 3, 4),
                 num_classes: int = 1000, dropout: float = 0.0, num_head_channels: int = 64,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = True, pool: str = "attention",
                 num_groups: int = 32, use_checkpoint: bool = False) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2**(len(channel_mult)-1) = {2 ** (levels - 1)}")
        allowed = reachable_resolutions(image_size, levels)
        bad = [r for r in attention_resolutions if r not in allowed]
        if bad:
            raise ValueError(f"attention resolution(s) {bad} are never reached at image_size {image_size}; allowed: {allowed}")
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r} is not one of {', '.join(POOLS)}")
        if num_classes < 1 or num_res_blocks < 1:
            raise ValueError(f"num_classes and num_res_blocks must be >= 1, got {num_classes}, {num_res_blocks}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.model_channels, self.use_checkpoint = model_channels, use_checkpoint
        emb_ch = 4 * model_channels

        def res(i: int, o: int, **kw: Any) -> ResBlock:
            return ResBlock(i, o, emb_ch, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm,
                            num_groups=num_groups, **kw)

        def attn(ch: int, r: int | None) -> AttentionBlock | None:
            if r is not None and r not in attention_resolutions:
                return None
            if ch % num_head_channels:
                raise ValueError(f"attention channels {ch} are not divisible by num_head_channels {num_head_channels}")
            return AttentionBlock(ch, ch // num_head_channels, num_groups=num_groups)

        self.time_embed = nn.Sequential(CastLinear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = CastConv2d(in_channels, model_channels, 3, padding=1)
        ch, r = model_channels, image_size
        self.enc = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.enc.append(UNetBlock(res(ch, mult * model_channels), attn(mult * model_channels, r)))
                ch = mult * model_channels
            if level != levels - 1:
                self.enc.append(UNetBlock(res(ch, ch, down=True) if resblock_updown else Downsample(ch, True)))
                r //= 2
        self.mid = nn.ModuleList([UNetBlock(res(ch, ch), attn(ch, None)), UNetBlock(res(ch, ch))])
        self.norm_out = GroupNormSiLU(num_groups, ch)
        self.pool = AttentionPool2d(r, ch, num_head_channels, num_classes) if pool == "attention" \
            else AdaptivePool(ch, num_classes)

    def _run(self, blk: UNetBlock, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(blk, h, emb, use_reentrant=False)
        return blk(h, emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] noised images; t: [B] timesteps of the original process -> [B, K] fp32 logits."""
        emb = F.silu(self.time_embed(timestep_embedding(t, self.model_channels)))
        h = self.conv_in(x)
        for blk in self.enc:
            h = self._run(blk, h, emb)
        for blk in self.mid:
            h = self._run(blk, h, emb)
        return self.pool(self.norm_out(h)).float()


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild an EncoderClassifier; to_dict() is the exported JSON's "model" section
    (with "kind": "encoder_classifier", which tells it from a UNet's)."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 4
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_classes: int = 1000
    dropout: float = 0.0
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    pool: str = "attention"
    num_groups: int = 32
    use_checkpoint: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"kind": KIND, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierConfig":
        """Inverse of to_dict(); a missing or other kind, or unknown keys, raise ValueError."""
        d = dict(d)
        kind = d.pop("kind", None)
        if kind != KIND:
            raise ValueError(f"model kind is {kind or 'a UNet (no kind)'}, not {KIND}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown classifier config key(s) {unknown}; allowed: {known}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **overrides: Any) -> "ClassifierConfig":
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})

    def build(self) -> EncoderClassifier:
        d = dataclasses.asdict(self)
        return EncoderClassifier(**d)


CLASSIFIER_PRESETS: dict[str, ClassifierConfig] = {
    # ADM's ImageNet 64x64 classifier (guided-diffusion README: --classifier_width 128 --classifier_depth 4
    # --classifier_attention_resolutions 32,16,8 --classifier_pool attention --classifier_resblock_updown True
    # --classifier_use_scale_shift_norm True; 64 channels per head, channel_mult 1,2,3,4): 65,438,568 parameters.
    "adm64": ClassifierConfig(),
    # 16-px digits: 32 channels, 1 block per level, attention at 8 px (and in the middle block), 8 norm groups.
    "tiny16": ClassifierConfig(image_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=(8,),
                               channel_mult=(1, 2, 2), num_classes=10, num_head_channels=32, num_groups=8),
}

# The parameter count of ADM's published 64x64 classifier configuration, counted on the reference implementation
# (guided_diffusion.script_util.create_classifier(64, False, 128, 4, "32,16,8", True, True, "attention")).
ADM64_CLASSIFIER_PARAMS = 65_438_568


def get_classifier_config(name: str, **overrides: Any) -> ClassifierConfig:
    """The named preset with field overrides (image_size, num_classes, dropout, use_checkpoint, ...)."""
    if name not in CLASSIFIER_PRESETS:
        raise ValueError(f"unknown classifier preset {name!r}; allowed: {', '.join(CLASSIFIER_PRESETS)}")
    return CLASSIFIER_PRESETS[name].replace(**overrides)


def create_classifier_from_config(d: dict[str, Any] | ClassifierConfig) -> EncoderClassifier:
    """Rebuild a classifier from ClassifierConfig.to_dict() output (the JSON next to exported weights)."""
    return (d if isinstance(d, ClassifierConfig) else ClassifierConfig.from_dict(d)).build()


def is_classifier_config(d: dict[str, Any]) -> bool:
    """True for a classifier's model config (kind encoder_classifier), False for a UNet's."""
    return isinstance(d, dict) and d.get("kind") == KIND
