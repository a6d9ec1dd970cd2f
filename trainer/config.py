"""One configuration object per training job: `TrainConfig`, built from recipe < config file < CLI flags.

Saved as JSON next to every checkpoint and read back on resume, so a run is never resumed with other
diffusion settings than it started with (flags that would change the model or the mathematics are refused).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import UsageError


@dataclass
class TrainConfig:
    # where
    data: str = ""                      # shard brace pattern, list (comma separated) or manifest path
    run_dir: str = ""                   # checkpoints/, tb/, samples/ and config.json go here
    # model (a diffusion.presets name plus overrides; None = the preset's own value)
    model_size: str = "tiny16"
    image_size: int | None = None
    num_classes: int | None = None      # 0 = unconditional
    dropout: float | None = None
    grad_checkpoint: bool = False       # activation checkpointing inside the UNet (use_checkpoint)
    # diffusion (create_diffusion kwargs)
    diffusion_steps: int = 4000
    noise_schedule: str = "cosine"
    loss: str = "hybrid"                # simple | hybrid | vlb
    vlb_weight: float = 0.001
    learn_sigma: bool = True
    timestep_sampler: str = "uniform"   # uniform | loss-second-moment
    sampler_sync: str = "torch"         # torch (NCCL/gloo all-gather) | mpi (mpi4py Allgather)
    label_dropout: float = 0.0          # probability of the null label (classifier-free guidance training)
    # optimisation
    total_steps: int = 1000
    global_batch: int = 128             # images per optimizer step, all ranks together
    micro_batch: int | None = None      # images per forward per rank; None = global_batch / world
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global gradient norm; 0 = off
    adam_betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"             # fp32 | bf16 | fp16 (fp16: CUDA only, dynamic loss scaling)
    zero_stage: int = 0
    ema: str = "0.9999"                 # comma-separated EMA rates kept in fp32
    seed: int = 0
    deepspeed_config: str = ""          # user JSON merged over the generated DeepSpeed config
    # data
    data_workers: int = 0
    flip: bool = True
    max_bad_fraction: float = 0.01
    # monitoring and checkpoints
    log_every: int = 50
    save_every: int = 1000
    keep: int = 3                       # checkpoints kept (the newest K)
    sample_every: int = 0               # EMA sample grid to TensorBoard every N steps; 0 = only at the end
    sample_grid: int = 0                # images in the grid; 0 = one row per class (<= 10) x 8, or 64
    sample_respacing: str = "50"        # respaced DDPM steps for the grid
    sample_guidance: float = 0.0        # classifier-free guidance scale for the grid (0 = off)
    nonfinite_patience: int = 20        # consecutive non-finite steps before stopping
    slurm_requeue: str = "off"          # on | off | auto (auto: when the job has Requeue=1): `scontrol requeue` after a preemption signal
    recipe: str = ""
    debug_hang_after_step: int = 0      # tests only: block after this step's checkpoint (to be killed)

    # ------------------------------------------------------------------ derived
    def ema_rates(self) -> list[str]:
        return [r.strip() for r in self.ema.split(",") if r.strip()]

    def diffusion_kwargs(self) -> dict[str, Any]:
        return dict(steps=self.diffusion_steps, noise_schedule=self.noise_schedule, learn_sigma=self.learn_sigma,
                    loss=self.loss, vlb_weight=self.vlb_weight)

    def model_overrides(self) -> dict[str, Any]:
        o: dict[str, Any] = {"learn_sigma": self.learn_sigma, "use_checkpoint": self.grad_checkpoint}
        for k in ("image_size", "num_classes", "dropout"):
            if getattr(self, k) is not None:
                o[k] = getattr(self, k)
        return o

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown configuration key(s) {', '.join(unknown)}")
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(float(b) for b in d["adam_betas"])
        return cls(**d)


# Recipes of the paper's ImageNet-64 runs (Nichol & Dhariwal 2021; flags of the improved-diffusion README):
# cosine schedule, T=4000, learned sigmas, Adam lr 1e-4 at batch 128; the class-conditional model compared
# against BigGAN-deep uses 192 channels (our 270M) at lr 3e-4, batch 2048. EMA 0.9999 throughout.
_IN64 = dict(image_size=64, diffusion_steps=4000, noise_schedule="cosine", learn_sigma=True, ema="0.9999",
             lr=1e-4, global_batch=128, weight_decay=0.0, save_every=10_000, log_every=100, sample_every=10_000)
RECIPES: dict[str, dict[str, Any]] = {
    # L_hybrid, uniform t, unconditional, 120M (128 channels, 3 res blocks), 1.5M steps
    "imagenet64-hybrid": dict(_IN64, model_size="120M", num_classes=0, loss="hybrid", total_steps=1_500_000),
    # L_vlb with the loss-aware (second-moment) importance sampler
    "imagenet64-vlb": dict(_IN64, model_size="120M", num_classes=0, loss="vlb",
                           timestep_sampler="loss-second-moment", total_steps=1_500_000),
    # class-conditional, 192 channels, lr 3e-4, batch 2048 (the BigGAN-deep comparison)
    "imagenet64-cond": dict(_IN64, model_size="270M", num_classes=1000, loss="hybrid", lr=3e-4,
                            global_batch=2048, precision="bf16", zero_stage=2),
}
for _size in ("30M", "70M", "120M", "270M"):  # the model-size sweep (hybrid loss, batch 128)
    RECIPES[f"imagenet64-scale-{_size}"] = dict(_IN64, model_size=_size, num_classes=0, loss="hybrid",
                                                total_steps=250_000)
# the `make demo` recipe: 16 px digits, tiny UNet, CFG label dropout, loss-aware sampler
RECIPES["digits-demo"] = dict(model_size="tiny16", image_size=16, num_classes=10, diffusion_steps=1000,
                              noise_schedule="cosine", loss="hybrid", timestep_sampler="loss-second-moment",
                              label_dropout=0.1, global_batch=64, lr=1e-3, warmup_steps=100, ema="0.995",
                              total_steps=600, log_every=50, save_every=200, sample_every=0,
                              sample_respacing="50", sample_guidance=2.0, grad_clip=1.0, flip=False)


# ------------------------------------------------------------------------------------- CLI parsing


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _opt_int(s: str) -> int | None:
    return None if s.lower() in ("none", "") else int(s)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        from trainer.errors import die
        die(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trainer.main", description="Train Improved DDPM with DeepSpeed (any launcher). "
                "Precedence: defaults < --recipe < --config FILE < flags. Re-running the same command resumes "
                "from RUN_DIR/checkpoints/latest. Exit codes: 0 done, 2 bad input, 3 non-finite loss, "
                "75 preempted (state saved; re-run to resume).", argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a("--recipe", help=f"named recipe: {', '.join(RECIPES)}")
    a("--config", help="JSON file of TrainConfig keys (e.g. the config.json of an earlier run)")
    a("--data", help="training shards: brace pattern, comma list, or manifest path")
    a("--run-dir", help="output folder (checkpoints/, tb/, samples/)")
    a("--model-size", help="diffusion.presets name: 30M, 70M, 120M, 270M, tiny16, tiny32")
    a("--image-size", type=_opt_int)
    a("--num-classes", type=_opt_int, help="classes for conditioning (0 = unconditional)")
    a("--dropout", type=float)
    a("--grad-checkpoint", type=_bool, metavar="BOOL", help="gradient (activation) checkpointing")
    a("--diffusion-steps", type=int)
    a("--noise-schedule", choices=["linear", "cosine"])
    a("--loss", choices=["simple", "hybrid", "vlb"])
    a("--vlb-weight", type=float)
    a("--learn-sigma", type=_bool, metavar="BOOL")
    a("--timestep-sampler", choices=["uniform", "loss-second-moment"])
    a("--sampler-sync", choices=["torch", "mpi"], help="all-gather of (t, loss) over torch.distributed or MPI")
    a("--label-dropout", type=float, help="probability of the null label, for classifier-free guidance")
    a("--total-steps", type=int)
    a("--global-batch", type=int, help="images per optimizer step over all ranks")
    a("--micro-batch", type=_opt_int, help="images per forward per rank (accumulation is derived)")
    a("--lr", type=float)
    a("--warmup-steps", type=int, help="linear learning-rate warm-up from 0")
    a("--weight-decay", type=float)
    a("--grad-clip", type=float, help="max gradient norm, 0 = off")
    a("--precision", choices=["fp32", "bf16", "fp16"])
    a("--zero-stage", type=int, choices=[0, 1, 2, 3])
    a("--ema", help="comma-separated EMA rates, e.g. 0.9999,0.9995")
    a("--seed", type=int)
    a("--deepspeed-config", help="DeepSpeed JSON merged over the generated one")
    a("--data-workers", type=int)
    a("--flip", type=_bool, metavar="BOOL")
    a("--max-bad-fraction", type=float)
    a("--log-every", type=int)
    a("--save-every", type=int)
    a("--keep", type=int, help="checkpoints to keep")
    a("--sample-every", type=int, help="EMA sample grid every N steps (0 = at the end only)")
    a("--sample-grid", type=int)
    a("--sample-respacing")
    a("--sample-guidance", type=float)
    a("--nonfinite-patience", type=int)
    a("--slurm-requeue", choices=["auto", "on", "off"])
    a("--debug-hang-after-step", type=int, help=argparse.SUPPRESS)
    a("--local_rank", "--local-rank", type=int, dest="local_rank", help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def _load_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{what} {path} must hold a JSON object")
    return d


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (+ recipe + config file) -> validated TrainConfig (world-size checks happen later)."""
    ns = vars(build_parser().parse_args(argv))
    ns.pop("local_rank", None)
    merged: dict[str, Any] = {}
    recipe = ns.pop("recipe", None)
    if recipe:
        if recipe not in RECIPES:
            raise UsageError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        merged.update(RECIPES[recipe], recipe=recipe)
    cfile = ns.pop("config", None)
    if cfile:
        merged.update(_load_json(cfile, "--config"))
    merged.update(ns)
    cfg = TrainConfig.from_dict(merged)
    validate(cfg)
    return cfg


def validate(c: TrainConfig) -> None:
    """Checks that need no process group; raise UsageError with one line."""
    if not c.data:
        raise UsageError("--data is required (shard pattern, list or manifest), e.g. --data 'shards/train-{000000..000003}.tar'")
    if not c.run_dir:
        raise UsageError("--run-dir is required (output folder)")
    for k in ("total_steps", "global_batch", "log_every", "save_every", "keep", "diffusion_steps", "nonfinite_patience"):
        if getattr(c, k) <= 0:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {getattr(c, k)}")
    if c.micro_batch is not None and c.micro_batch <= 0:
        raise UsageError(f"--micro-batch must be positive, got {c.micro_batch}")
    if not 0.0 <= c.label_dropout < 1.0:
        raise UsageError(f"--label-dropout must be in [0, 1), got {c.label_dropout}")
    if c.lr <= 0:
        raise UsageError(f"--lr must be positive, got {c.lr}")
    if c.warmup_steps < 0 or c.weight_decay < 0 or c.grad_clip < 0 or c.sample_every < 0:
        raise UsageError("--warmup-steps, --weight-decay, --grad-clip and --sample-every must be >= 0")
    rates = c.ema_rates()
    try:
        if any(not 0.0 < float(r) < 1.0 for r in rates):
            raise ValueError
    except ValueError:
        raise UsageError(f"--ema {c.ema!r}: give comma-separated rates in (0, 1), e.g. 0.9999,0.9995") from None
    if len(set(float(r) for r in rates)) != len(rates):
        raise UsageError(f"--ema {c.ema!r}: rates repeat")
    if c.precision == "fp16":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--precision fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling has no CPU path); "
                             "use --precision bf16 or fp32 on CPU")
    if c.deepspeed_config and not os.path.isfile(c.deepspeed_config):
        raise UsageError(f"--deepspeed-config {c.deepspeed_config} does not exist")
    from diffusion.presets import PRESETS
    if c.model_size not in PRESETS:
        raise UsageError(f"unknown --model-size {c.model_size!r}; choose one of {', '.join(PRESETS)}")


def batch_layout(c: TrainConfig, world: int) -> tuple[int, int]:
    """-> (micro_batch per rank, gradient accumulation steps) with global = micro * accum * world."""
    if c.global_batch % world:
        raise UsageError(f"--global-batch {c.global_batch} is not divisible by the {world} ranks; "
                         f"use a multiple of {world}")
    per_rank = c.global_batch // world
    micro = c.micro_batch or per_rank
    if per_rank % micro:
        raise UsageError(f"--global-batch {c.global_batch} over {world} ranks gives {per_rank} per rank, "
                         f"not a multiple of --micro-batch {micro}; pick micro-batch dividing {per_rank}")
    return micro, per_rank // micro


def deepspeed_config(c: TrainConfig, world: int, on_gpu: bool | None = None) -> dict[str, Any]:
    """The generated DeepSpeed config, with the user's JSON (if any) merged over it (nested dicts merge)."""
    if on_gpu is None:
        import torch
        on_gpu = torch.cuda.is_available()
    micro, accum = batch_layout(c, world)
    ds: dict[str, Any] = {
        "train_batch_size": c.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # on CPU, torch's fused AdamW (3.4x faster than its default per-tensor loop for 30M parameters on one
        # thread; DeepSpeed's CPU FusedAdam is a JIT-compiled op); on GPU, DeepSpeed's FusedAdam
        "optimizer": {"type": "AdamW", "params": {"lr": c.lr, "betas": list(c.adam_betas), "eps": 1e-8,
                                                  "weight_decay": c.weight_decay,
                                                  **({} if on_gpu else {"torch_adam": True, "fused": True})}},
        "gradient_clipping": c.grad_clip,
        "zero_optimization": {"stage": c.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # ZeRO-3 keeps DeepSpeed's default stage3_param_persistence_threshold (1e5 elements): smaller parameters stay
    # whole on every rank. 30M: 80 of 451 tensors, 88% of the weights, are partitioned; 270M: 99.8%. Tests set it
    # to 0 through --deepspeed-config to partition everything in tiny models.
    if not on_gpu and c.zero_stage in (1, 2):
        # gloo on CPU: one plain all-reduce of the gradient bucket instead of DeepSpeed's reduce-scatter and
        # multi-rank bucket paths (measured 2026-12-01, 30M fp32, 2 ranks x 1 thread: about 5% more images/s);
        # no contiguous gradient buffer: it is one more copy of every gradient in backward, and it exists to avoid
        # GPU memory fragmentation (30M fp32, 1 rank: backward 1.28 instead of 1.33 s)
        ds["zero_optimization"].update({"reduce_scatter": False, "use_multi_rank_bucket_allreduce": False,
                                        "contiguous_gradients": False})
    if c.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif c.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if c.deepspeed_config:
        _merge(ds, _load_json(c.deepspeed_config, "--deepspeed-config"))
    return ds


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


# settings that must not change when a run is resumed (they change the model or the mathematics)
FROZEN_ON_RESUME = ("model_size", "image_size", "num_classes", "diffusion_steps", "noise_schedule", "loss",
                    "vlb_weight", "learn_sigma", "timestep_sampler", "ema", "global_batch", "seed")
