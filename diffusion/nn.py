"""Small building blocks for the UNet: float32 group norm, sinusoidal timestep embedding, zero init."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm32(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm with its statistics and affine computed in float32 (stable under bf16/fp16).

    x: [B, C, H, W] (any memory format). Returns float32; the caller casts back once, after any fused
    scale/shift/activation, so that the low-precision rounding happens a single time.
    """
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.group_norm(x.float(), num_groups, w, b, eps)


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm computed in float32; output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm32(x, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class GroupNormSiLU(nn.GroupNorm):
    """SiLU(GroupNorm(x)) with the norm in float32; output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(group_norm32(x, self.num_groups, self.weight, self.bias, self.eps)).to(x.dtype)


class ScaleShiftGroupNormSiLU(nn.GroupNorm):
    """Adaptive group norm: SiLU(GN(h) * (1 + scale) + shift), computed in float32, output in h's dtype.

    h: [B, C, H, W]; e: [B, 2C] (scale, shift) when scale_shift, else [B, C] added before the norm.
    The affine GN parameters (w, b) are folded into the per-sample affine: GN0(h) * s + t with
    s = w (1 + scale) and t = b (1 + scale) + shift, one addcmul instead of two passes over h.
    """

    def forward(self, h: torch.Tensor, e: torch.Tensor, scale_shift: bool = True) -> torch.Tensor:
        e = e.float()[:, :, None, None]
        if scale_shift:
            scale, shift = e.chunk(2, dim=1)
            w, b = self.weight.float()[:, None, None], self.bias.float()[:, None, None]
            out = torch.addcmul(torch.addcmul(shift, b, 1.0 + scale), group_norm32(h, self.num_groups, None, None, self.eps),
                                w * (1.0 + scale))
        else:
            out = group_norm32(h.float() + e, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(out).to(h.dtype)


class CastConv2d(nn.Conv2d):
    """Conv2d that first casts its input to the weight dtype (models held in bf16/fp16 take fp32 inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class CastLinear(nn.Linear):
    """Linear that first casts its input to the weight dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (as in the Transformer / DDPM).

    t: [B] timesteps (integer or fractional). Returns [B, dim] float32: cos of the dim//2 frequencies
    exp(-ln(max_period) * k / (dim//2)), k = 0..dim//2-1, then sin; a zero column pads an odd dim.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(k * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero (output layers of residual branches) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def _phase_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along `dim` (size 3) of a 3x3 kernel, the 2-tap kernels of the two output phases of a nearest-2x
    upsample followed by the conv: phase 0 reads input rows (i-1, i) with taps (w0, w1+w2), phase 1 reads
    (i, i+1) with taps (w0+w1, w2). Returns the kernel with `dim` replaced by (phase, tap) = (2, 2)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)], dim)


def upsample2x_kernel(weight: torch.Tensor, bias: torch.Tensor | None, channels_last: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The phase kernels of upsample2x_conv3x3: weight [O, I, 3, 3] -> [4 * O, I, 2, 2] (output channel o*4 + 2a + b,
    in channels_last memory order when asked) and bias [O] -> [4 * O]. A function of the weights only: a model
    whose weights do not change may compute it once (Upsample.cache_kernel)."""
    O = weight.shape[0]
    k = _phase_taps(_phase_taps(weight, 2), 4)  # [O, I, a, ty, b, tx]
    k = k.permute(0, 2, 4, 1, 3, 5).reshape(4 * O, -1, 2, 2)  # output channel o*4 + 2a + b
    if channels_last:
        k = k.contiguous(memory_format=torch.channels_last)
    return k, None if bias is None else bias.repeat_interleave(4)


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       kernel: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """conv3x3(nearest_upsample_2x(x)) with padding 1, computed without the upsampled tensor.

    Each of the 4 output phases (a, b) is a 2x2 conv of x with summed taps, so the work is 4 * 2 * 2 = 16
    taps per input pixel instead of 9 * 4 = 36 (2.25x fewer FLOPs, same function up to rounding).
    x: [B, I, H, W], weight: [O, I, 3, 3] -> [B, O, 2H, 2W] in x's memory format (NCHW or channels_last).
    kernel: upsample2x_kernel(weight, bias, channels_last of x), if already computed (same result bit for bit);
    then (eager inference, Upsample.cache_kernel) the four phases are copied straight into the output, one copy
    instead of the stack and the reshape's two (same values).
    """
    B, _, H, W = x.shape
    O = weight.shape[0]
    cl = is_channels_last(x)
    k, b4 = kernel if kernel is not None else upsample2x_kernel(weight, bias, cl)
    compiling = torch.compiler.is_compiling()
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), k, None if compiling else b4)
    y = y.unflatten(1, (O, 2, 2))  # [B, O, a, b, H+1, W+1]; phase (a, b) at output (i, j) is y[..., i + a, j + b]
    if compiling and bias is not None:
        # compiled, the bias is added here (fused into the phase copies) instead of as the conv's repeated bias:
        # torch 2.11's inductor cannot lay out that view as a conv bias (NotImplementedError: View)
        y = y + bias[:, None, None, None, None]
    if kernel is not None:
        out = torch.empty((B, O, 2 * H, 2 * W), dtype=y.dtype, device=y.device,
                          memory_format=torch.channels_last if cl else torch.contiguous_format)
        o6 = out.unflatten(2, (H, 2)).unflatten(4, (W, 2))  # [B, O, i, a, j, b], a view
        for a in (0, 1):
            for b in (0, 1):
                o6[:, :, :, a, :, b].copy_(y[:, :, a, b, a:a + H, b:b + W])
        return out
    ph = torch.stack([y[:, :, a, b, a:a + H, b:b + W] for a in (0, 1) for b in (0, 1)], 0).unflatten(0, (2, 2))
    if cl:  # memory order (B, i, a, j, b, O)
        return ph.permute(2, 4, 0, 5, 1, 3).reshape(B, 2 * H, 2 * W, O).permute(0, 3, 1, 2)
    return ph.permute(2, 3, 4, 0, 5, 1).reshape(B, O, 2 * H, 2 * W)  # (B, O, i, a, j, b)
