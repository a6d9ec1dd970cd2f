"""Our weights as a diffusers folder (UNet2DModel + DDPMScheduler), written without importing diffusers.

    python -m trainer.export RUN_DIR --format diffusers --out-dir DIR      (or: export_diffusers(src, DIR))

DIR/model_index.json (a DDPMPipeline), DIR/unet/{config.json, diffusion_pytorch_model.safetensors} and
DIR/scheduler/scheduler_config.json: `UNet2DModel.from_pretrained(DIR, subfolder="unet")`,
`DDPMScheduler.from_pretrained(DIR, subfolder="scheduler")` and, for an unconditional model,
`DDPMPipeline.from_pretrained(DIR)` load it. The cosine schedule is `squaredcos_cap_v2`, a learned sigma is
`variance_type="learned_range"` (the model's 2C outputs: epsilon, then v in [-1, 1]).

What UNet2DModel can express, and so what is refused with one line: one head width for every attention layer
(`attention_head_dim`; ours: num_head_channels, or a num_heads that gives the same width everywhere), a first
level of model_channels channels (diffusers' time embedding is as wide as block_out_channels[0]), timesteps fed
as they are (no rescale_timesteps), no super-resolution input, stride-2 conv or ResBlock down/upsampling.
Group norms keep their groups in the mid attention too (attn_norm_num_groups), scale-shift norm maps to
resnet_time_scale_shift="scale_shift", labels to num_class_embeds (the null row included when the model has it).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from data.cli import UsageError
from data.fsio import atomic_save_safetensors, atomic_write_json

DIFFUSERS_VERSION = "0.42.1"  # the version the layout was checked with (constraints.txt)


def _cfg_get(cfg: dict[str, Any], key: str, default: Any) -> Any:
    v = cfg.get(key, default)
    return default if v is None else v


def _refuse_unexpressible(cfg: dict[str, Any]) -> None:
    """UsageError for a model configuration UNet2DModel has no equivalent of."""
    mult = list(cfg["channel_mult"])
    if int(mult[0] * cfg["model_channels"]) != cfg["model_channels"]:
        raise UsageError(f"--format diffusers: channel_mult starts with {mult[0]}, but UNet2DModel's time embedding "
                         f"is as wide as its first level; only models whose channel_mult starts with 1 export")
    if float(_cfg_get(cfg, "timestep_scale", 1.0)) != 1.0:
        raise UsageError("--format diffusers: this model sees rescaled timesteps (rescale_timesteps, t * 1000 / T); "
                         "UNet2DModel feeds timesteps as they are")
    if _cfg_get(cfg, "super_res", False):
        raise UsageError("--format diffusers: a super-resolution model (low-res input) has no UNet2DModel equivalent")
    if _cfg_get(cfg, "guidance_embed", False):
        raise UsageError("--format diffusers: a guidance-distilled model (guidance_embed: it takes a guidance scale w "
                         "per example) has no UNet2DModel equivalent")
    for key in ("fourier_features",):
        if _cfg_get(cfg, key, 0):
            raise UsageError(f"--format diffusers: {key} has no UNet2DModel equivalent")


def _head_dim(model: torch.nn.Module) -> int:
    """The one attention head width of the model (UNet2DModel has a single attention_head_dim)."""
    from diffusion.unet import AttentionBlock
    widths = {m.qkv.in_features // m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    if len(widths) != 1:
        raise UsageError(f"--format diffusers: attention head widths {sorted(widths)} differ between layers; "
                         f"UNet2DModel has one attention_head_dim (train with num_head_channels to export)")
    return widths.pop()


class _Mapper:
    """Collects diffusers-named tensors from our state dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state, self.out, self.used = state, {}, set()

    def put(self, ours: str, theirs: str) -> None:
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in self.state:
                self.out[f"{theirs}.{p}"] = self.state[f"{ours}.{p}"]
                self.used.add(f"{ours}.{p}")

    def res(self, ours: str, theirs: str) -> None:
        for a, b in [("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("skip", "conv_shortcut")]:
            self.put(f"{ours}.{a}", f"{theirs}.{b}")

    def attn(self, ours: str, theirs: str) -> None:
        self.put(f"{ours}.norm", f"{theirs}.group_norm")
        self.put(f"{ours}.proj", f"{theirs}.to_out.0")
        for p in ("weight", "bias"):  # our fused qkv rows are [q | k | v], each head-major like diffusers'
            for name, part in zip(("to_q", "to_k", "to_v"), self.state[f"{ours}.qkv.{p}"].chunk(3, dim=0)):
                self.out[f"{theirs}.{name}.{p}"] = part.contiguous()
            self.used.add(f"{ours}.qkv.{p}")

    def block(self, model: torch.nn.Module, i: int, where: str, ours: str, theirs: str, j: int) -> None:
        blk = getattr(model, where)[i]
        self.res(f"{ours}.body", f"{theirs}.resnets.{j}")
        if blk.attn is not None:
            self.attn(f"{ours}.attn", f"{theirs}.attentions.{j}")

    def resample(self, model: torch.nn.Module, i: int, where: str, theirs: str) -> None:
        from diffusion.unet import ResBlock
        ours = f"{where}.{i}.body"
        if isinstance(getattr(model, where)[i].body, ResBlock):
            self.res(ours, theirs)
        elif where == "enc":
            self.put(f"{ours}.op", f"{theirs}.conv")
        else:
            self.put(ours, f"{theirs}.conv")


def diffusers_unet(model_cfg: dict[str, Any], state: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(UNet2DModel config, its state dict) for our ModelConfig dict and state dict; UsageError if unexpressible."""
    from diffusion.presets import create_model_from_config
    _refuse_unexpressible(model_cfg)
    with torch.device("meta"):
        model = create_model_from_config(model_cfg)
    mult, nrb, mc = list(model_cfg["channel_mult"]), model_cfg["num_res_blocks"], model_cfg["model_channels"]
    updown = bool(model_cfg.get("resblock_updown", False))
    m = _Mapper(state)
    m.put("conv_in", "conv_in")
    m.put("time_embed.0", "time_embedding.linear_1")
    m.put("time_embed.2", "time_embedding.linear_2")
    m.put("label_emb", "class_embedding")
    m.put("norm_out", "conv_norm_out")
    m.put("conv_out", "conv_out")
    down, up, e, d = [], [], 0, 0
    for level in range(len(mult)):
        has_attn = model.enc[e].attn is not None
        down.append("AttnDownBlock2D" if has_attn else ("ResnetDownsampleBlock2D" if updown else "DownBlock2D"))
        for j in range(nrb):
            m.block(model, e, "enc", f"enc.{e}", f"down_blocks.{level}", j)
            e += 1
        if level != len(mult) - 1:
            m.resample(model, e, "enc", f"down_blocks.{level}.downsamplers.0")
            e += 1
    m.res("mid.0.body", "mid_block.resnets.0")
    m.attn("mid.0.attn", "mid_block.attentions.0")
    m.res("mid.1.body", "mid_block.resnets.1")
    for i, level in enumerate(reversed(range(len(mult)))):
        has_attn = model.dec[d].attn is not None
        up.append("AttnUpBlock2D" if has_attn else ("ResnetUpsampleBlock2D" if updown else "UpBlock2D"))
        for j in range(nrb + 1):
            m.block(model, d, "dec", f"dec.{d}", f"up_blocks.{i}", j)
            d += 1
        if level:
            m.resample(model, d, "dec", f"up_blocks.{i}.upsamplers.0")
            d += 1
    n_cls = model.label_emb.num_embeddings if model.label_emb is not None else None
    config = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": model_cfg["image_size"], "in_channels": model.conv_in.in_channels,
        "out_channels": model.out_channels, "center_input_sample": False, "time_embedding_type": "positional",
        "freq_shift": 0, "flip_sin_to_cos": True,  # our embedding is [cos | sin] with frequencies exp(-ln(1e4) k/half)
        "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2D",
        "block_out_channels": [int(k * mc) for k in mult], "layers_per_block": nrb, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv", "dropout": float(model_cfg.get("dropout", 0.0)),
        "act_fn": "silu", "attention_head_dim": _head_dim(model), "norm_num_groups": model.num_groups,
        "attn_norm_num_groups": model.num_groups, "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if model_cfg.get("use_scale_shift_norm", True) else "default",
        "add_attention": True, "class_embed_type": None, "num_class_embeds": n_cls,
    }
    missing = sorted(set(state) - m.used)
    if missing:
        raise UsageError(f"--format diffusers: weights {missing[:3]} have no UNet2DModel place")
    return config, {k: v.float().contiguous() for k, v in m.out.items()}


def diffusers_scheduler(diffusion: dict[str, Any]) -> dict[str, Any]:
    """DDPMScheduler config for our create_diffusion kwargs (schedule, variance type, prediction type)."""
    T, sched = int(diffusion.get("steps", 4000)), diffusion.get("noise_schedule", "cosine")
    cfg: dict[str, Any] = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                           "num_train_timesteps": T, "trained_betas": None, "clip_sample": True,
                           "clip_sample_range": 1.0, "thresholding": False, "timestep_spacing": "leading",
                           "steps_offset": 0, "rescale_betas_zero_snr": False}
    if sched == "cosine":
        cfg.update(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)
    elif sched == "linear":  # ours is DDPM's 1e-4..0.02 at T=1000, scaled by 1000/T
        cfg.update(beta_schedule="linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    else:
        raise UsageError(f"--format diffusers: noise schedule {sched!r} has no DDPMScheduler equivalent")
    if diffusion.get("learn_sigma", True):
        cfg["variance_type"] = "learned_range"
    else:
        cfg["variance_type"] = "fixed_small" if diffusion.get("sigma_small", False) else "fixed_large"
    if diffusion.get("distilled_steps"):
        raise UsageError("--format diffusers: a distilled student samples on its own step grid "
                         "(diffusion.distill.step_grid), which DDPMScheduler does not have")
    mean_type = diffusion.get("model_mean_type") or ("xstart" if diffusion.get("predict_xstart", False) else "epsilon")
    cfg["prediction_type"] = {"epsilon": "epsilon", "xstart": "sample", "v": "v_prediction"}[mean_type]
    return cfg


def _source_weights(src: str, ema: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta with "model" and "diffusion") from an exported .safetensors or a run/checkpoint folder."""
    from safetensors.torch import load_file
    from trainer.export import default_ema, json_path_for, run_weights
    if os.path.isfile(src):
        jpath = json_path_for(src)
        if not os.path.isfile(jpath):
            raise UsageError(f"{src}: no JSON config next to the weights (expected {jpath})")
        with open(jpath) as f:
            meta = json.load(f)
        return load_file(src, device="cpu"), meta
    if not os.path.isdir(src):
        raise UsageError(f"{src}: neither exported weights (.safetensors) nor a run/checkpoint folder")
    state, meta, _ = run_weights(src, ema or default_ema(src))
    return state, meta


def export_diffusers(src: str, out_dir: str, *, ema: str | None = None) -> str:
    """Write the diffusers folder for `src` (exported model.safetensors with its JSON, or a training run/checkpoint
    folder, EMA `ema` or the run's first) into `out_dir`; return out_dir. UsageError if UNet2DModel cannot
    express the model."""
    state, meta = _source_weights(src, ema)
    unet_cfg, unet_state = diffusers_unet(meta["model"], state)
    sched_cfg = diffusers_scheduler(meta["diffusion"])
    os.makedirs(os.path.join(out_dir, "unet"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    atomic_save_safetensors(os.path.join(out_dir, "unet", "diffusion_pytorch_model.safetensors"), unet_state,
                            metadata={"format": "pt"})
    atomic_write_json(os.path.join(out_dir, "unet", "config.json"), unet_cfg)
    atomic_write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), sched_cfg)
    atomic_write_json(os.path.join(out_dir, "model_index.json"),
                      {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                       "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]})
    return out_dir
