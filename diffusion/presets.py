"""Named model sizes: the Improved-DDPM scaling models at 64 px and tiny models for tests and the demo.

count_params and forward_flops (torch.utils.flop_counter on the meta device, one multiply-add = 2 FLOPs) size
the compute-matched scaling sweep. The activation-memory profiler and the table of all presets live in
benchmarks/model_profile.py (`python -m benchmarks.model_profile [NAME ...]`).

The paper's scaling models (Nichol & Dhariwal 2021, ImageNet 64x64, class-conditional, learned sigma,
3 residual blocks per level, channel_mult 1,2,3,4, attention at 16 and 8 px) are matched to within 0.1% of
30.6M / 68.5M / 121.6M / 273.0M parameters with: scale-shift norm (embedding projection to 2*C), plain
stride-2 conv downsampling and nearest+conv upsampling (no resblock up/down), a label table of
1000 + 1 rows (the extra null label for classifier-free guidance), 32 norm groups. Head settings do not
change the count; 4 heads as in improved-diffusion. (Without scale-shift the counts fall about 4% short;
with resblock up/down they overshoot by about 7%.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .unet import SuperResModel, UNetModel


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a UNetModel; JSON-serialisable through to_dict().

    num_heads_upsample, null_label, timestep_scale and super_res describe checkpoints converted from improved-/
    guided-diffusion (trainer.convert): num_heads_upsample (decoder heads, -1 = num_heads), null_label (False: no
    extra label row, so no classifier-free guidance), timestep_scale (1000 / T for rescale_timesteps), super_res
    (SuperResModel: the model also takes low_res [B, in_channels, h, w]). guidance_embed: a guidance-distilled
    student that takes a classifier-free guidance scale w [B] per example (trainer.distill
    --teacher-guidance-range). channel_mult may be fractional (0.5 at 512 px).
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 64
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    num_classes: int | None = 1000
    learn_sigma: bool = True
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    num_groups: int = 32
    use_checkpoint: bool = False
    num_heads_upsample: int = -1
    null_label: bool = True
    timestep_scale: float = 1.0
    super_res: bool = False
    guidance_embed: bool = False

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
        return (SuperResModel if self.super_res else UNetModel)(
                         image_size=self.image_size, in_channels=self.in_channels,
                         model_channels=self.model_channels, out_channels=self.out_channels,
                         num_res_blocks=self.num_res_blocks, attention_resolutions=self.attention_resolutions,
                         dropout=self.dropout, channel_mult=self.channel_mult, num_classes=self.num_classes,
                         use_checkpoint=self.use_checkpoint, num_heads=self.num_heads,
                         num_head_channels=self.num_head_channels, use_scale_shift_norm=self.use_scale_shift_norm,
                         resblock_updown=self.resblock_updown, num_groups=self.num_groups,
                         num_heads_upsample=self.num_heads_upsample, null_label=self.null_label,
                         timestep_scale=self.timestep_scale, guidance_embed=self.guidance_embed)


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
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters())


def dummy_inputs(cfg: ModelConfig, batch: int, device: str | torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Zero inputs for one forward: x [batch, in_channels, S, S] float32, t [batch] and y [batch] int64 (None
    for an unconditional model), on `device` ("meta" for shape-only analysis)."""
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
    x, t, y = dummy_inputs(cfg, batch, "meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, y, **({"w": torch.zeros(batch, device="meta")} if cfg.guidance_embed else {}))
    return fc.get_total_flops()
