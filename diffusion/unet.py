"""The Improved-DDPM / ADM UNet, written for speed.

model(x_t, t, y=labels[, w=scales]) -> [B, out_channels, H, W]; with learned sigma out_channels = 2 * in_channels
(epsilon first, then the variance interpolation value v), as `diffusion/` expects.

Layout (ADM): input conv; per resolution level `num_res_blocks` residual blocks (+ self-attention at the
chosen resolutions) and a downsampling step; a middle ResBlock-Attention-ResBlock; a mirrored decoder that
concatenates the encoder activations (num_res_blocks + 1 blocks per level); GroupNorm-SiLU-conv output.
The timestep (and class label) embedding conditions every residual block through scale-shift group norm:
h = GN(h) * (1 + scale) + shift. A guidance-distilled student (guidance_embed, Meng et al. 2023) also adds an
embedding of its per-example classifier-free guidance scale w to that embedding. Output convolutions of residual
branches are zero-initialised, so that every residual block starts as the identity (or its skip projection).

Speed notes: the SiLU of the embedding is computed once per forward instead of once per block; the group
norm affine parameters are folded into the per-sample scale/shift (one addcmul instead of two passes);
upsampling convs skip the 4x larger upsampled tensor (four 2x2 phase convs, 2.25x fewer FLOPs);
attention runs on a [B, HW, C] view that is free for channels_last tensors, with one fused QKV matmul and
torch's SDPA kernel. Group norms run in float32 under bf16/fp16 (autocast or a low-precision model).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .nn import (CastConv2d, CastLinear, GroupNorm32, GroupNormSiLU, ScaleShiftGroupNormSiLU, timestep_embedding,
                 is_channels_last, upsample2x_conv3x3, upsample2x_kernel, zero_)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-(up/down)-conv3x3, embedding via scale-shift GN, SiLU-dropout-conv3x3 (zero).

    x: [B, in_ch, H, W], emb: [B, emb_ch] (already passed through SiLU) -> [B, out_ch, H', W']
    with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, *, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
                 num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.up, self.down, self.scale_shift = up, down, use_scale_shift_norm
        self.norm1 = GroupNormSiLU(num_groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = ScaleShiftGroupNormSiLU(num_groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Every parameter is used inside its own module's forward (DeepSpeed ZeRO-3 gathers per module).
        h = self.norm1(x)
        if self.up:
            h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0, mode="nearest")
        elif self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.norm2(self.conv1(h), self.emb(emb), self.scale_shift)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions: x + proj(SDPA(QKV(GN(x)))), proj zero-initialised.

    x: [B, C, H, W] -> [B, C, H, W]. Heads: `num_heads`, each of C // num_heads channels.
    """

    def __init__(self, ch: int, num_heads: int, *, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"attention channels {ch} are not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(num_groups, ch, eps)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, L, C], a free view for channels_last
        q, k, v = self.qkv(h).unflatten(-1, (3, self.num_heads, C // self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, C/heads], softmax(q k^T / sqrt(d)) v
        a = self.proj(a.transpose(1, 2).flatten(2))  # [B, L, C]
        return x + a.transpose(1, 2).unflatten(2, (H, W))


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv (conv=True) or 2x2 average pool. Ignores the embedding."""

    def __init__(self, ch: int, conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then (conv=True) a 3x3 conv, computed as four 2x2 phase convs on
    the low-resolution input (upsample2x_conv3x3: 2.25x fewer FLOPs, same function). Ignores the embedding.

    cache_kernel (off by default; set_inference_caches turns it on): in eager mode without autograd, the phase
    kernels are computed once and reused while the weights stay the same tensors, unmodified (their version
    counters and data pointers are checked every call). Results are the same bit for bit; it saves the per-call
    kernel arithmetic on the weights (0.6 ms at 64 channels, 9 ms at 256, 1 CPU thread)."""

    def __init__(self, ch: int, conv: bool = True) -> None:
        super().__init__()
        self.use_conv = conv
        self.cache_kernel = False
        self._kernel: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        if conv:  # the conv's parameters live here, where they are used (ZeRO-3 gathers per module)
            c = nn.Conv2d(ch, ch, 3, padding=1)
            self.weight, self.bias = c.weight, c.bias

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        kernel = None
        if self.cache_kernel and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            cl = is_channels_last(x)
            w, b = self.weight, self.bias
            key = (w.data_ptr(), w._version, w.dtype, w.device, cl) + ((b.data_ptr(), b._version) if b is not None
                                                                       else ())
            if self._kernel is None or self._kernel[0] != key:
                self._kernel = (key, upsample2x_kernel(w, b, cl))
            kernel = self._kernel[1]
        return upsample2x_conv3x3(x, self.weight, self.bias, kernel)


def set_inference_caches(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn on (off) the weight-only caches of `model`'s modules for inference (Upsample.cache_kernel). Only for a
    model whose weights are never changed behind the version counter (writes through `.data`, or parameters
    re-gathered into a reused buffer, as DeepSpeed ZeRO-3 does): e.g. exported weights loaded for sampling.
    Returns the model."""
    for m in model.modules():
        if isinstance(m, Upsample):
            m.cache_kernel, m._kernel = enabled, None
    return model


class UNetBlock(nn.Module):
    """One checkpointable unit: optional skip concatenation, a body (ResBlock/Downsample/Upsample), optional attention."""

    def __init__(self, body: nn.Module, attn: AttentionBlock | None = None, takes_skip: bool = False) -> None:
        super().__init__()
        self.body, self.attn, self.takes_skip = body, attn, takes_skip

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = self.body(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        return x


GUIDANCE_EMBED_SCALE = 100.0  # w is embedded as a timestep w * 100: periods from 0.06 to ~600 units of w


def reachable_resolutions(image_size: int, levels: int) -> list[int]:
    """Resolutions (pixels) the UNet works at: image_size, image_size/2, ... (one per channel_mult level)."""
    return [image_size // 2 ** i for i in range(levels)]


class UNetModel(nn.Module):
    """ADM / Improved-DDPM UNet. Call as model(x [B, in_channels, H, W], t [B] int, y [B] int64 or None).

    attention_resolutions are in pixels (e.g. (16, 8) at 64 px) and must be among the resolutions reached.
    Heads: num_head_channels > 0 fixes the channels per head, otherwise num_heads fixes the head count
    (num_heads_upsample in the decoder; -1 = num_heads). channel_mult may be fractional (level channels are
    int(mult * model_channels); the input conv already has the first level's channels).
    num_classes: class-conditional with labels 0..num_classes-1 plus, if null_label, the null label num_classes
    (for classifier-free guidance); None for an unconditional model. timestep_scale: the embedding sees
    t * timestep_scale (1000 / T for checkpoints trained with improved-diffusion's rescale_timesteps).
    use_checkpoint: recompute each block in the backward pass (non-reentrant torch.utils.checkpoint; may be
    switched at any time).
    guidance_embed: the model also takes w [B] (float, a classifier-free guidance scale, Meng et al. 2023): the
    sinusoidal embedding of w * GUIDANCE_EMBED_SCALE goes through Linear-SiLU-Linear, whose last layer starts at
    zero, and is added to the timestep embedding; so weights loaded from a model without it (`load_unguided`)
    compute exactly that model's output for every w until trained.
    """

    def __init__(self, *, image_size: int, in_channels: int = 3, model_channels: int = 128,
                 out_channels: int = 6, num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (16, 8),
                 dropout: float = 0.0, channel_mult: Sequence[int] = (1, 2, 3, 4), num_classes: int | None = None,
                 use_checkpoint: bool = False, num_heads: int = 4, num_head_channels: int = -1,
                 use_scale_shift_norm: bool = True, resblock_updown: bool = False, conv_resample: bool = True,
                 num_groups: int = 32, num_heads_upsample: int = -1, null_label: bool = True,
                 timestep_scale: float = 1.0, guidance_embed: bool = False) -> None:
        super().__init__()
        levels = len(channel_mult)
        allowed = reachable_resolutions(image_size, levels)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2**(len(channel_mult)-1) = {2 ** (levels - 1)}")
        bad = [r for r in attention_resolutions if r not in allowed]
        if bad:
            raise ValueError(f"attention resolution(s) {bad} are never reached at image_size {image_size} with "
                             f"{levels} levels; allowed: {allowed}")
        for m in channel_mult:
            if int(model_channels * m) % num_groups or int(model_channels * m) < 1:
                raise ValueError(f"channels {int(model_channels * m)} are not a positive multiple of num_groups "
                                 f"{num_groups}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_classes, self.use_checkpoint = model_channels, num_classes, use_checkpoint
        self.num_groups, self.timestep_scale = num_groups, float(timestep_scale)
        attn_res = set(attention_resolutions)
        emb_ch = 4 * model_channels
        chs = [int(m * model_channels) for m in channel_mult]  # channels per level

        def heads(ch: int, n: int = num_heads) -> int:
            if num_head_channels > 0:
                if ch % num_head_channels:
                    raise ValueError(f"attention channels {ch} are not divisible by num_head_channels {num_head_channels}")
                return ch // num_head_channels
            return n

        def attn_up(ch: int, r: int) -> AttentionBlock | None:
            n = num_heads if num_heads_upsample == -1 else num_heads_upsample
            return AttentionBlock(ch, heads(ch, n), num_groups=num_groups) if r in attn_res else None

        def res(i: int, o: int, **kw) -> ResBlock:
            return ResBlock(i, o, emb_ch, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm,
                            num_groups=num_groups, **kw)

        def attn(ch: int, r: int) -> AttentionBlock | None:
            return AttentionBlock(ch, heads(ch), num_groups=num_groups) if r in attn_res else None

        self.time_embed = nn.Sequential(CastLinear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_emb = nn.Embedding(num_classes + int(null_label), emb_ch) if num_classes is not None else None
        self.guidance_embed = guidance_embed
        self.w_embed = nn.Sequential(CastLinear(model_channels, emb_ch), nn.SiLU(),
                                     zero_(nn.Linear(emb_ch, emb_ch))) if guidance_embed else None
        self.conv_in = CastConv2d(in_channels, chs[0], 3, padding=1)

        ch, r, chans = chs[0], image_size, [chs[0]]
        self.enc = nn.ModuleList()
        for level in range(levels):
            for _ in range(num_res_blocks):
                self.enc.append(UNetBlock(res(ch, chs[level]), attn(chs[level], r)))
                ch = chs[level]
                chans.append(ch)
            if level != levels - 1:
                body = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.enc.append(UNetBlock(body))
                chans.append(ch)
                r //= 2
        self.mid = nn.ModuleList([UNetBlock(res(ch, ch), AttentionBlock(ch, heads(ch), num_groups=num_groups)),
                                  UNetBlock(res(ch, ch))])
        self.dec = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                out = chs[level]
                self.dec.append(UNetBlock(res(ch + chans.pop(), out), attn_up(out, r), takes_skip=True))
                ch = out
                if level and i == num_res_blocks:
                    body = res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                    self.dec.append(UNetBlock(body))
                    r *= 2
        self.norm_out = GroupNormSiLU(num_groups, ch)
        self.conv_out = zero_(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _run(self, blk: UNetBlock, h: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(blk, h, emb, skip, use_reentrant=False)
        return blk(h, emb, skip)

    def load_unguided(self, state: dict[str, torch.Tensor]) -> None:
        """Load the state dict of the same network without guidance_embed (a guided teacher): every tensor is
        loaded strictly, the w embedding keeps its initialisation (zero output). Any other mismatch raises."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (self.guidance_embed and k.startswith("w_embed."))]
        if missing or unexpected:
            raise RuntimeError(f"state dict does not match the network: missing {missing[:4]}, unexpected "
                               f"{unexpected[:4]}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                w: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, in_channels, H, W]; t: [B] timesteps of the original process; y: [B] labels in 0..num_classes
        (num_classes = null label) or None for an unconditional model; w: [B] float guidance scales, required by
        (and only by) a guidance_embed model. Returns [B, out_channels, H, W] in x's dtype."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("class-conditional model needs y (use y = num_classes for the null label)"
                             if y is None else "unconditional model (num_classes=None) takes no labels y")
        if (w is None) == self.guidance_embed:
            raise ValueError("guidance-distilled model (guidance_embed) needs w: one guidance scale per example"
                             if w is None else "this model has no guidance input (guidance_embed=False); drop w")
        if w is not None and w.shape != t.shape:
            raise ValueError(f"w must hold one guidance scale per example: shape {tuple(t.shape)}, got "
                             f"{tuple(w.shape)}")
        # Parameters may be bf16/fp16 (a DeepSpeed engine) or fp32 (autocast): the Cast* layers cast inputs.
        if self.timestep_scale != 1.0:
            t = t.float() * self.timestep_scale
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        if self.w_embed is not None:
            emb = emb + self.w_embed(timestep_embedding(w * GUIDANCE_EMBED_SCALE, self.model_channels))
        emb = F.silu(emb)  # every consumer (the ResBlocks' projections) starts with SiLU
        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = self._run(blk, h, emb)
            skips.append(h)
        for blk in self.mid:
            h = self._run(blk, h, emb)
        for blk in self.dec:
            h = self._run(blk, h, emb, skips.pop() if blk.takes_skip else None)
        return self.conv_out(self.norm_out(h)).to(x.dtype)


class SuperResModel(UNetModel):
    """A UNet conditioned on a low-resolution image: model(x [B, C, H, W], t, y, low_res=[B, C, h, w]).

    low_res is upsampled bilinearly (align_corners=False) to H x W and concatenated after x, so the input conv
    takes 2 * in_channels channels; everything else is UNetModel(**kwargs) (Improved DDPM / ADM super-resolution).
    """

    def __init__(self, *, in_channels: int = 3, **kwargs) -> None:
        super().__init__(in_channels=2 * in_channels, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                low_res: torch.Tensor | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        if low_res is None or low_res.ndim != 4 or low_res.shape[:2] != x.shape[:2]:
            raise ValueError(f"super-resolution model needs low_res [B, {x.shape[1]}, h, w] matching x "
                             f"{tuple(x.shape)}, got {None if low_res is None else tuple(low_res.shape)}")
        up = F.interpolate(low_res.to(x.dtype), x.shape[2:], mode="bilinear", align_corners=False)
        return super().forward(torch.cat([x, up], dim=1), t, y, w=w)
