"""Named model sizes: the Improved-DDPM scaling models at 64 px and tiny models for tests and the demo.

    python -m diffusion.presets [NAME ...]

prints, per preset, the parameter count, the forward GFLOPs per image (torch.utils.flop_counter, one
multiply-add = 2 FLOPs) and the activation memory per image with and without gradient checkpointing.
Everything is measured on the meta device: shapes only, nothing is allocated.

The paper's scaling models (Nichol & Dhariwal 2021, ImageNet 64x64, class-conditional, learned sigma,
3 residual blocks per level, channel_mult 1,2,3,4, attention at 16 and 8 px) are matched to within 0.1% of
30.6M / 68.5M / 121.6M / 273.0M parameters with: scale-shift norm (embedding projection to 2*C), plain
stride-2 conv downsampling and nearest+conv upsampling (no resblock up/down), a label table of
1000 + 1 rows (the extra null label for classifier-free guidance), 32 norm groups. Head settings do not
change the count; 4 heads as in improved-diffusion. (Without scale-shift the counts fall about 4% short;
with resblock up/down they overshoot by about 7%.)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .unet import UNetBlock, UNetModel


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a UNetModel; JSON-serialisable through to_dict()."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 64
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_classes: int | None = 1000
    learn_sigma: bool = True
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    num_groups: int = 32
    use_checkpoint: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict(); unknown keys raise ValueError listing the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; allowed: {known}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def replace(self, **overrides: Any) -> "ModelConfig":
        d = self.to_dict()
        d.update(overrides)
        return ModelConfig.from_dict(d)

    def build(self) -> UNetModel:
        return UNetModel(image_size=self.image_size, in_channels=self.in_channels,
                         model_channels=self.model_channels, out_channels=self.out_channels,
                         num_res_blocks=self.num_res_blocks, attention_resolutions=self.attention_resolutions,
                         dropout=self.dropout, channel_mult=self.channel_mult, num_classes=self.num_classes,
                         use_checkpoint=self.use_checkpoint, num_heads=self.num_heads,
                         num_head_channels=self.num_head_channels, use_scale_shift_norm=self.use_scale_shift_norm,
                         resblock_updown=self.resblock_updown, num_groups=self.num_groups)


PRESETS: dict[str, ModelConfig] = {
    "30M": ModelConfig(model_channels=64),
    "70M": ModelConfig(model_channels=96),
    "120M": ModelConfig(model_channels=128),
    "270M": ModelConfig(model_channels=192),
    # Small and fast for CPU tests and the demo (16-px digits); 8 norm groups of 4+ channels each.
    "tiny16": ModelConfig(image_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=(8,),
                          channel_mult=(1, 2, 2), num_classes=10, num_head_channels=32, num_groups=8),
    "tiny32": ModelConfig(image_size=32, model_channels=32, num_res_blocks=1, attention_resolutions=(16, 8),
                          channel_mult=(1, 2, 2, 2), num_classes=10, num_head_channels=32, num_groups=8),
}

# Parameter counts the paper reports for the scaling models (millions); presets must be within 2%.
PAPER_PARAMS_M: dict[str, float] = {"30M": 30.6, "70M": 68.5, "120M": 121.6, "270M": 273.0}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ModelConfig with field overrides (num_classes, learn_sigma, use_checkpoint, dropout, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def create_model(name: str, **overrides: Any) -> UNetModel:
    """Build the named preset. Raises ValueError for an unknown name, field or unreachable attention resolution."""
    return get_config(name, **overrides).build()


def create_model_from_config(d: dict[str, Any] | ModelConfig) -> UNetModel:
    """Rebuild a model from ModelConfig.to_dict() output (e.g. the JSON next to exported weights)."""
    return (d if isinstance(d, ModelConfig) else ModelConfig.from_dict(d)).build()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(cfg: ModelConfig, batch: int, device: str | torch.device) -> tuple[torch.Tensor, ...]:
    s = cfg.image_size
    x = torch.zeros(batch, cfg.in_channels, s, s, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    y = None if cfg.num_classes is None else torch.zeros(batch, dtype=torch.long, device=device)
    return x, t, y


def forward_flops(cfg: ModelConfig, batch: int = 1) -> int:
    """FLOPs of one forward pass of `batch` images (convs, matmuls, attention; 1 multiply-add = 2), on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = cfg.replace(use_checkpoint=False).build()
    x, t, y = _inputs(cfg, batch, "meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, y)
    return fc.get_total_flops()


class _FusedAttentionOnMeta(TorchFunctionMode):
    """On meta, SDPA takes the math path, which saves the [B, heads, L, L] attention weights; real CPU and GPU
    runs take a fused kernel that saves only q, k, v, the output and the log-sum-exp. Route meta calls to the
    fused CPU kernel's op (it has a meta implementation) so that the analysis sees what a real run saves."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs and len(args) == 3 and args[0].is_meta:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args)[0]
        return func(*args, **kwargs)


def _saved_tensor_tally(cfg: ModelConfig, batch: int, device: str = "meta") -> dict[str, int]:
    """Bytes of the tensors autograd saves in one training forward of `batch` images (on meta by default).

    Tensors are deduplicated by storage and parameters are excluded. Bytes are split into: block inputs
    (the activations entering each UNetBlock, which checkpointing keeps), per-block internals (which
    checkpointing discards and recomputes one block at a time in the backward pass) and the rest.
    """
    with torch.device(device):
        model = cfg.replace(use_checkpoint=False).build().train()
    x, t, y = _inputs(cfg, batch, device)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    keep: list[torch.Tensor] = []  # hold every tensor looked at, so that no storage address is recycled
    seen: set[int] = set()
    inputs: dict[int, int] = {}
    per_block: dict[int, int] = defaultdict(int)
    tally = {"outside": 0, "saved_inputs": 0}
    current: list[int | None] = [None]

    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def pre(mod: torch.nn.Module, args: tuple) -> None:
        current[0] = id(mod)
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 4:
                keep.append(a)
                inputs.setdefault(key(a), a.untyped_storage().nbytes())

    def post(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        current[0] = None

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = key(t)
        if k in params or k in seen:
            return t
        keep.append(t)
        seen.add(k)
        n = t.untyped_storage().nbytes()
        if k in inputs:
            tally["saved_inputs"] += n
        elif current[0] is None:
            tally["outside"] += n
        else:
            per_block[current[0]] += n
        return t

    hooks = []
    for m in model.modules():
        if isinstance(m, UNetBlock):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionOnMeta():
        model(x, t, y)
    for h in hooks:
        h.remove()
    tally["inputs"] = sum(inputs.values())
    tally["blocks_sum"] = sum(per_block.values())
    tally["blocks_max"] = max(per_block.values(), default=0)
    return tally


def activation_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """Activation memory per image (bytes, fp32) kept for the backward pass: (without, with checkpointing).

    Without: every saved tensor. With (non-reentrant checkpoint per UNetBlock): the tensors saved outside the
    blocks, plus every block's input (held by the checkpoint), plus the largest single block's internals
    (alive while that block is recomputed in the backward pass). Per image = tally(batch 2) - tally(batch 1),
    which removes the batch-independent part (the embedding tables' inputs etc.).
    """
    def totals(b: int) -> tuple[int, int]:
        s = _saved_tensor_tally(cfg, b)
        return (s["outside"] + s["saved_inputs"] + s["blocks_sum"],
                s["outside"] + s["inputs"] + s["blocks_max"])

    (a1, c1), (a2, c2) = totals(1), totals(2)
    return a2 - a1, c2 - c1


def describe(name: str) -> dict[str, Any]:
    cfg = get_config(name)
    with torch.device("meta"):
        n = count_params(cfg.build())
    no_ckpt, ckpt = activation_bytes(cfg)
    return {"name": name, "params": n, "gflops": forward_flops(cfg) / 1e9, "act_mib": no_ckpt / 2**20,
            "act_ckpt_mib": ckpt / 2**20, "image_size": cfg.image_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffusion.presets", description=(
        "Print parameters, forward GFLOPs per image and activation memory per image (fp32, without / with "
        "gradient checkpointing) of the model presets, measured on the meta device (nothing is allocated)."))
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"preset(s) to describe (default: all of {', '.join(PRESETS)})")
    args = ap.parse_args(argv)
    for n in args.names:
        if n not in PRESETS:
            print(f"error: unknown model preset {n!r}; allowed: {', '.join(PRESETS)}", file=sys.stderr)
            return 2
    print(f"{'preset':>7} {'px':>4} {'params':>14} {'paper':>7} {'GFLOPs/img':>11} {'act MiB/img':>12} {'ckpt MiB/img':>13}")
    for n in args.names or list(PRESETS):
        d = describe(n)
        paper = f"{PAPER_PARAMS_M[n]:.1f}M" if n in PAPER_PARAMS_M else "-"
        print(f"{n:>7} {d['image_size']:>4} {d['params']:>14,} {paper:>7} {d['gflops']:>11.2f} "
              f"{d['act_mib']:>12.1f} {d['act_ckpt_mib']:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
