"""One configuration object per training job: `TrainConfig`, nested sections built from
defaults < recipe < config file < flags, saved as `config.json` next to every checkpoint and read back on resume
(settings marked frozen must not change: they change the model, the mathematics or the data order).

`python -m trainer.main --help` shows every setting, grouped by section, with its default, unit and allowed values.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from data.cli import ArgumentParser, UsageError
from trainer import configlib
from trainer.configlib import option


def _resizers() -> list[str]:
    from data.decode import RESIZERS
    return list(RESIZERS)


def _objectives() -> list[str]:
    from trainer.objective import OBJECTIVES, load_builtin_objectives
    load_builtin_objectives()
    return list(OBJECTIVES)


@dataclass
class RunSection:
    run_dir: str = option("", "output folder: checkpoints/, tb/, samples/, config.json (required)")
    seed: int = option(0, "seed of the initial weights, noise, timesteps and data order", frozen=True)
    recipe: str = ""  # the --recipe the run started from (recorded in config.json; not a setting of its own)
    force_unlock: bool = option(False, "take over RUN_DIR/lock even when its holder may be alive (only for a run known "
                                "to be dead on another host; a dead process on this host is taken over anyway)")
    collective_timeout: float = option(300.0, "a collective (all-gather, barrier) making no progress this long ends "
                                       "the job with exit 69 instead of hanging", unit="s", lower=1.0)


@dataclass
class DataSection:
    source: str = option("", "training shards: manifest path, brace pattern or comma list (required)", flag="--data")
    workers: int = option(0, "data loader worker processes per rank", lower=0)
    flip: bool = option(True, "random horizontal flips")
    image_size: int | None = option(None, "centre-crop and resize every image of another size to this side when "
                                    "read (shards of mixed sizes need it); default: images as stored", unit="px",
                                    lower=1, frozen=True, flag="--data-image-size")
    resize: str = option("adm", "read-time resize of --data-image-size: adm (guided-diffusion's center_crop_arr) "
                         "or area (centre crop, exact area average); see docs/data.md", choices=_resizers)
    max_bad_fraction: float = option(0.01, "stop when more than this fraction of samples is unreadable",
                                     lower=0.0, upper=1.0)


@dataclass
class ObjectiveSection:
    name: str = option("iddpm", lambda: f"what is trained: {', '.join(_objectives())}, package.module:Class "
                       "or path/to/file.py:Class",
                       frozen=True, flag="--objective", metavar="NAME")
    sampler_sync: str = option("torch", "all-gather of the objective's synced state (e.g. the loss-aware "
                               "sampler's losses) over torch.distributed (NCCL/gloo) or MPI",
                               choices=lambda: ("torch", "mpi"))
    options: Any = None  # the objective's own Options instance (its settings live under objective.NAME)


@dataclass
class OptimSection:
    total_steps: int = option(1000, "optimizer steps to train", lower=1)
    global_batch: int = option(128, "images per optimizer step, all ranks together", lower=1, frozen=True)
    micro_batch: int | None = option(None, "images per forward per rank (accumulation derived); none = "
                                     "global batch / ranks", lower=1)
    lr: float = option(1e-4, "peak learning rate (AdamW)", lower=0.0, lower_open=True)
    warmup_steps: int = option(0, "linear learning-rate warm-up from 0", unit="steps", lower=0)
    weight_decay: float = option(0.0, "AdamW weight decay", lower=0.0)
    grad_clip: float = option(1.0, "max global gradient norm (0 = off)", lower=0.0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", metavar="B1,B2")
    precision: str = option("fp32", "training precision (fp16: CUDA only, dynamic loss scaling)",
                            choices=lambda: ("fp32", "bf16", "fp16"))
    zero_stage: int = option(0, "DeepSpeed ZeRO stage", choices=lambda: (0, 1, 2, 3))
    ema: str = option("0.9999", "comma-separated EMA rates kept in fp32", frozen=True, metavar="RATES")
    phema: str = option("", "post-hoc EMA: relative stds (sigma_rel) of the power-function EMAs tracked for "
                        "reconstruction after training (EDM2), e.g. 0.05,0.10; empty = off", frozen=True,
                        metavar="SIGMA_RELS")
    phema_every: int = option(0, "snapshot interval of the power-function EMAs (0 = with every checkpoint)",
                              unit="images", lower=0)
    phema_dtype: str = option("fp16", "precision of the post-hoc EMA snapshots", choices=lambda: ("fp16", "bf16"))
    compile: bool = option(False, "torch.compile every trained network (inductor, static shapes; ZeRO 0-2; the first "
                           "step compiles, cached on disk: see trainer/compile.py)")
    deepspeed_config: str = option("", "DeepSpeed JSON merged over the generated config", metavar="FILE")
    nonfinite_patience: int = option(20, "consecutive non-finite-loss steps before stopping", unit="steps",
                                     lower=1)
    rollback: int = option(0, "on --nonfinite-patience: reload the last checkpoint, keep the data position (the "
                           "offending batches are skipped) and scale the learning rate by --rollback-lr-factor; at most "
                           "this many times per run (0 = stop with exit 3)", lower=0)
    rollback_lr_factor: float = option(0.5, "learning-rate factor applied at each rollback", lower=0.0, upper=1.0,
                                       lower_open=True)


@dataclass
class CheckpointSection:
    save_every: int = option(1000, "checkpoint interval", unit="steps", lower=1)
    keep: int = option(3, "checkpoints kept (the newest)", lower=1)
    slurm_requeue: str = option("off", "`scontrol requeue` after a preemption signal (auto: when the job has "
                                "Requeue=1)", choices=lambda: ("auto", "on", "off"))


@dataclass
class LogSection:
    log_every: int = option(50, "TensorBoard and console interval", unit="steps", lower=1)
    sample_every: int = option(0, "EMA preview grid interval (0 = at the end only)", unit="steps", lower=0)
    sample_grid: int = option(0, "images in the grid (0 = 8 per class for <= 10 classes, else 64)", lower=0)
    sample_respacing: str = option("50", "respaced DDPM steps of the preview grid")
    sample_guidance: float = option(0.0, "classifier-free guidance scale of the grid (0 = off)", lower=0.0)


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def ema_rates(self) -> list[str]:
        """The classic EMA rates, e.g. ["0.9999"]."""
        return [r.strip() for r in self.optim.ema.split(",") if r.strip()]

    def phema_sigmas(self) -> list[str]:
        """The relative stds of the tracked power-function EMAs, e.g. ["0.05", "0.10"]."""
        return [r.strip() for r in self.optim.phema.split(",") if r.strip()]

    def ema_profiles(self) -> list[str]:
        """Every EMA the trainer keeps: the classic rates, then `phema_<sigma_rel>` for each power-function EMA."""
        from trainer.ema import PHEMA_PREFIX
        return self.ema_rates() + [PHEMA_PREFIX + s for s in self.phema_sigmas()]

    def to_dict(self) -> dict[str, Any]:
        """The nested config as JSON (`config.json`); the objective's options sit under objective.NAME."""
        d = configlib.to_dict(self)
        opts = d["objective"].pop("options")
        if opts:
            d["objective"][self.objective.name] = opts
        return d


TITLES = {"run": "run", "data": "data", "objective": "objective", "optim": "optimisation (DeepSpeed)",
          "checkpoint": "checkpoints and preemption", "log": "logging and preview grids"}


# Recipes of the paper's ImageNet-64 runs (Nichol & Dhariwal 2021; flags of the improved-diffusion README):
# cosine schedule, T=4000, learned sigmas, Adam lr 1e-4 at batch 128; the class-conditional model compared
# against BigGAN-deep uses 192 channels (our 270M) at lr 3e-4, batch 2048. EMA 0.9999 throughout.
def _in64(size: str, classes: int, loss: str, steps: int, **optim: Any) -> dict[str, Any]:
    return {"objective": {"iddpm": {
                "model": {"size": size, "image_size": 64, "num_classes": classes},
                "diffusion": {"steps": 4000, "noise_schedule": "cosine", "learn_sigma": True, "loss": loss}}},
            "optim": {"ema": "0.9999", "lr": 1e-4, "global_batch": 128, "weight_decay": 0.0, "total_steps": steps,
                      **optim},
            "checkpoint": {"save_every": 10_000}, "log": {"log_every": 100, "sample_every": 10_000}}


RECIPES: dict[str, dict[str, Any]] = {
    # L_hybrid, uniform t, unconditional, 120M (128 channels, 3 res blocks), 1.5M steps
    "imagenet64-hybrid": _in64("120M", 0, "hybrid", 1_500_000),
    # L_vlb with the loss-aware (second-moment) importance sampler
    "imagenet64-vlb": configlib.merge(_in64("120M", 0, "vlb", 1_500_000),
                                      {"objective": {"iddpm": {"timestep_sampler": "loss-second-moment"}}}),
    # class-conditional, 192 channels, lr 3e-4, batch 2048 (the BigGAN-deep comparison)
    "imagenet64-cond": _in64("270M", 1000, "hybrid", 1_500_000, lr=3e-4, global_batch=2048, precision="bf16",
                             zero_stage=2),
    # the `make demo` recipe: 16 px digits, tiny UNet, CFG label dropout, loss-aware sampler
    "digits-demo": {
        "objective": {"iddpm": {"model": {"size": "tiny16", "image_size": 16, "num_classes": 10},
                                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "loss": "hybrid"},
                                "timestep_sampler": "loss-second-moment", "label_dropout": 0.1}},
        "optim": {"global_batch": 64, "lr": 1e-3, "warmup_steps": 100, "ema": "0.995", "total_steps": 600,
                  "grad_clip": 1.0},
        "data": {"flip": False}, "checkpoint": {"save_every": 200},
        "log": {"log_every": 50, "sample_every": 0, "sample_respacing": "50", "sample_guidance": 2.0}},
}
for _size in ("30M", "70M", "120M", "270M"):  # the model-size sweep (hybrid loss, batch 128)
    RECIPES[f"imagenet64-scale-{_size}"] = _in64(_size, 0, "hybrid", 250_000)


# ------------------------------------------------------------------------------------- parsing


def _objective_name(given: str | None, cfile: dict[str, Any], recipe: dict[str, Any]) -> str:
    """--objective from the flags, else the config file, else the recipe, else the default."""
    for src in (cfile, recipe):
        given = given or (src.get("objective") or {}).get("name")
    return given or ObjectiveSection.name


def build_parser(name: str = ObjectiveSection.name) -> ArgumentParser:
    """The generated CLI: one group per config section, plus the settings of objective `name` (its Options, nested
    sections included: e.g. iddpm's model and diffusion)."""
    from trainer.objective import get_objective
    others = [k for k in _objectives() if k != name]
    p = ArgumentParser(prog="trainer.main", description=(
        "Train a diffusion objective with DeepSpeed (any launcher). Precedence: defaults < --recipe < --config FILE "
        "< flags. Re-running the same command resumes from RUN_DIR/checkpoints/latest. Exit codes: 0 done, "
        "2 bad input, 3 non-finite loss, 75 preempted (state saved; re-run to resume)."),
        epilog=f"The settings shown are those of objective {name}; `--objective NAME --help` shows another's "
               f"({', '.join(others)}).")
    p.add_argument("--recipe", metavar="NAME", help=f"named recipe: {', '.join(RECIPES)}")
    p.add_argument("--config", metavar="FILE", help="JSON config (e.g. RUN_DIR/config.json of an earlier run)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    seen: dict[str, str] = {}
    configlib.add_flags(p, TrainConfig, TITLES, seen=seen)
    options = get_objective(name).Options
    if options is not None:
        configlib.add_flags(p, options, configlib.section_titles(options, f"objective.{name}", f"objective {name}"),
                            f"objective.{name}", seen)
    return p


def load_json(path: str, what: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{what} {path} must hold a JSON object")
    return d


def upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """A config of the trainer before 2026-12-08, which kept the UNet and the diffusion in the global sections
    `model` and `diffusion`, in today's layout: they move under objective.NAME where its options have such a
    section (keys it lacks are dropped: e.g. a classifier never used model.size), model.compile becomes
    optim.compile. Today's configs are returned unchanged (a copy)."""
    from trainer.objective import get_objective
    d = copy.deepcopy(d)
    if "model" not in d and "diffusion" not in d:
        return d
    model, diffusion = d.pop("model", None) or {}, d.pop("diffusion", None) or {}
    for key, section in (("model", model), ("diffusion", diffusion)):
        if not isinstance(section, dict):
            raise UsageError(f"configuration: section {key} must be a JSON object")
    if "compile" in model:
        d.setdefault("optim", {})["compile"] = model.pop("compile")
    obj = d.setdefault("objective", {})
    if not isinstance(obj, dict):
        return d  # from_dict names the bad section
    name = obj.get("name", ObjectiveSection.name)
    options = get_objective(name).Options
    hints = typing.get_type_hints(options) if options is not None else {}
    for key, section in (("model", model), ("diffusion", diffusion)):
        if dataclasses.is_dataclass(hints.get(key)) and section:
            keep = {f.name for f in dataclasses.fields(hints[key])}
            obj.setdefault(name, {})[key] = {**{k: v for k, v in section.items() if k in keep},
                                             **obj.get(name, {}).get(key, {})}
    return d


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Nested dict -> validated TrainConfig, the objective's options (under objective.NAME) included."""
    from trainer.objective import get_objective
    d = upgrade(d)
    d.pop("frozen", None)  # config.json records the frozen networks' files (trainer.networks): not a setting
    obj = d.get("objective")
    opts = {k: obj.pop(k) for k in list(obj) if k not in ("name", "sampler_sync")} if isinstance(obj, dict) else {}
    cfg = configlib.from_dict(TrainConfig, d)
    name = cfg.objective.name
    cls = get_objective(name)
    own = opts.pop(name, {})
    if opts:
        raise UsageError(f"settings of objective {sorted(opts)[0]!r} given, but the objective is {name!r}")
    if cls.Options is not None:
        cfg.objective.options = configlib.from_dict(cls.Options, own, f"objective.{name}")
    elif own:
        raise UsageError(f"objective {name!r} has no settings, got objective.{name}.{sorted(own)[0]}")
    return cfg


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (+ recipe + config file) -> validated TrainConfig (world-size checks happen later)."""
    from trainer.objective import get_objective
    pre = argparse.ArgumentParser(add_help=False)  # what decides the rest: recipe, config file, objective
    for name in ("--recipe", "--config", "--objective"):
        pre.add_argument(name)
    known = pre.parse_known_args(argv)[0]
    recipe = {}
    if known.recipe:
        if known.recipe not in RECIPES:
            raise UsageError(f"unknown recipe {known.recipe!r}; choose one of {', '.join(RECIPES)}")
        recipe = configlib.merge(copy.deepcopy(RECIPES[known.recipe]), {"run": {"recipe": known.recipe}})
    cfile = upgrade(load_json(known.config, "--config")) if known.config else {}
    name = _objective_name(known.objective, cfile, recipe)
    options = get_objective(name).Options
    given = vars(build_parser(name).parse_args(argv))
    flags = configlib.flags_to_dict(given, TrainConfig)
    if options is not None:
        configlib.merge(flags, configlib.flags_to_dict(given, options, f"objective.{name}", ["objective", name]))
    merged = configlib.merge(configlib.merge(recipe, cfile), flags)
    cfg = config_from_dict(merged)
    validate(cfg)
    return cfg


def validate(c: TrainConfig) -> None:
    """Checks across fields that need no process group; raise UsageError with one line."""
    if not c.data.source:
        raise UsageError("data.source (--data) is required (shard pattern, list or manifest), e.g. "
                         "--data 'shards/train-{000000..000003}.tar'")
    if not c.run.run_dir:
        raise UsageError("run.run_dir (--run-dir) is required (output folder)")
    rates = c.ema_rates()
    try:
        if any(not 0.0 < float(r) < 1.0 for r in rates):
            raise ValueError
    except ValueError:
        raise UsageError(f"optim.ema (--ema) {c.optim.ema!r}: give comma-separated rates in (0, 1), "
                         f"e.g. 0.9999,0.9995") from None
    if len(set(float(r) for r in rates)) != len(rates):
        raise UsageError(f"optim.ema (--ema) {c.optim.ema!r}: rates repeat")
    sigmas = c.phema_sigmas()
    if sigmas:
        from trainer.phema import check_sigma_rel
        try:
            values = [check_sigma_rel(s) for s in sigmas]
        except UsageError as e:
            raise UsageError(f"optim.phema (--phema) {c.optim.phema!r}: {e}") from None
        if len(set(values)) != len(values):
            raise UsageError(f"optim.phema (--phema) {c.optim.phema!r}: relative stds repeat")
    if c.optim.precision == "fp16":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("optim.precision (--precision) fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling "
                             "has no CPU path); use --precision bf16 or fp32 on CPU")
    if c.optim.compile and c.optim.zero_stage == 3:
        from trainer.compile import ZERO3_REASON
        raise UsageError(ZERO3_REASON)
    if c.optim.deepspeed_config and not os.path.isfile(c.optim.deepspeed_config):
        raise UsageError(f"optim.deepspeed_config (--deepspeed-config) {c.optim.deepspeed_config} does not exist")
    from trainer.objective import get_objective
    get_objective(c.objective.name).validate(c)  # the objective's own checks


def frozen_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Flags of frozen settings that differ between a saved config.json and `cfg` (objective options included)."""
    from trainer.objective import get_objective
    new, saved = cfg.to_dict(), upgrade(saved)
    changed = configlib.frozen_changes(TrainConfig, saved, new)
    opts, name = get_objective(cfg.objective.name).Options, cfg.objective.name
    if opts is not None and not changed:  # the objective's own settings are compared once the sections agree
        changed = configlib.frozen_changes(opts, saved["objective"].get(name, {}), new["objective"].get(name, {}))
    return changed


# ------------------------------------------------------------------------------------- derived


def batch_layout(c: TrainConfig, world: int) -> tuple[int, int]:
    """-> (micro_batch per rank, gradient accumulation steps) with global = micro * accum * world."""
    gb = c.optim.global_batch
    if gb % world:
        raise UsageError(f"optim.global_batch (--global-batch) {gb} is not divisible by the {world} ranks; "
                         f"use a multiple of {world}")
    per_rank = gb // world
    micro = c.optim.micro_batch or per_rank
    if per_rank % micro:
        raise UsageError(f"--global-batch {gb} over {world} ranks gives {per_rank} per rank, not a multiple of "
                         f"--micro-batch {micro}; pick a micro-batch dividing {per_rank}")
    return micro, per_rank // micro


def deepspeed_config(c: TrainConfig, world: int, on_gpu: bool | None = None) -> dict[str, Any]:
    """The generated DeepSpeed config, with the user's JSON (if any) merged over it (nested dicts merge)."""
    if on_gpu is None:
        import torch
        on_gpu = torch.cuda.is_available()
    o = c.optim
    micro, accum = batch_layout(c, world)
    ds: dict[str, Any] = {
        "train_batch_size": o.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # torch's fused AdamW on every device: on CPU 3.4x faster than its per-tensor loop (30M parameters, one
        # thread); on GPU fused kernels like DeepSpeed's FusedAdam, without that op's just-in-time
        # nvcc build on every new node (which needs a CUDA toolkit matching torch there)
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.adam_betas), "eps": 1e-8,
                                                  "weight_decay": o.weight_decay, "torch_adam": True, "fused": True}},
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": o.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # ZeRO-3 keeps DeepSpeed's default stage3_param_persistence_threshold (1e5 elements): smaller parameters stay
    # whole on every rank (30M: 80 of 451 tensors, 88% of the weights, are partitioned; 270M: 99.8%).
    if not on_gpu and o.zero_stage in (1, 2):
        # gloo on CPU: one plain all-reduce of the gradient bucket instead of DeepSpeed's reduce-scatter and
        # multi-rank bucket paths, and no contiguous gradient buffer (one more copy of every gradient in backward,
        # there to avoid GPU memory fragmentation); figures in docs/trainer.md
        ds["zero_optimization"].update({"reduce_scatter": False, "use_multi_rank_bucket_allreduce": False,
                                        "contiguous_gradients": False})
    if o.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif o.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if o.deepspeed_config:
        configlib.merge(ds, load_json(o.deepspeed_config, "--deepspeed-config"))
    return ds
