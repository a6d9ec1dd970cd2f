"""Checkpoints of openai/improved-diffusion and openai/guided-diffusion -> our exported format.

    python -m trainer.convert openai CKPT.pt --flags "--image_size 64 --num_channels 128 --num_res_blocks 3
        --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine" --out model.safetensors

writes model.safetensors + model.json (trainer.export's format), which evaluations.sample / nll / evaluate load
unchanged. --flags are the model and diffusion flags exactly as those projects' READMEs write them; training
and sampling flags (lr, batch_size, use_fp16, timestep_respacing, ...) are accepted and ignored.

Kinds: UNetModel; SuperResModel (--large_size/--small_size flags); EncoderUNetModel, the noise-aware classifier
(--classifier_* flags; diffusion.classifier). Defaults differ between the two codebases: improved-diffusion's
rescale_timesteps and rescale_learned_sigmas default to True, guided-diffusion's to False, and improved-diffusion
has only the legacy attention order. --codebase auto picks guided-diffusion when a flag only it has is given
(num_head_channels, resblock_updown, use_new_attention_order, channel_mult, use_fp16, classifier_*), else
improved-diffusion.

Mapping: openai's TimestepEmbedSequential lists (input_blocks, middle_block, output_blocks) are walked in order
next to our enc/mid/dec; conv1d attention weights [3C, C, 1] become Linear [3C, C]; the legacy attention order
(rows per head: q|k|v) is permuted to ours (q|k|v, each per head), the new order is ours already. rescale_timesteps
becomes ModelConfig.timestep_scale = 1000 / T; class-conditional checkpoints have no null-label row
(null_label = False: classifier-free guidance is refused with one line). The file is read with
torch.load(weights_only=True): no code in it runs.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any

import torch

from data.cli import ArgumentParser, UsageError, run_cli
from data.fsio import atomic_write_json

MODEL_FLAGS = {  # flag -> (type, improved-diffusion default, guided-diffusion default)
    "image_size": (int, 64, 64), "num_channels": (int, 128, 128), "num_res_blocks": (int, 2, 2),
    "num_heads": (int, 4, 4), "num_heads_upsample": (int, -1, -1), "num_head_channels": (int, -1, -1),
    "attention_resolutions": (str, "16,8", "16,8"), "channel_mult": (str, "", ""), "dropout": (float, 0.0, 0.0),
    "class_cond": (bool, False, False), "use_checkpoint": (bool, False, False),
    "use_scale_shift_norm": (bool, True, True), "resblock_updown": (bool, False, False),
    "use_fp16": (bool, False, False), "use_new_attention_order": (bool, False, False),
    "learn_sigma": (bool, False, False), "sigma_small": (bool, False, False), "diffusion_steps": (int, 1000, 1000),
    "noise_schedule": (str, "linear", "linear"), "timestep_respacing": (str, "", ""), "use_kl": (bool, False, False),
    "predict_xstart": (bool, False, False), "rescale_timesteps": (bool, True, False),
    "rescale_learned_sigmas": (bool, True, False), "large_size": (int, 256, 256), "small_size": (int, 64, 64),
    "classifier_use_fp16": (bool, False, False), "classifier_width": (int, 128, 128),
    "classifier_depth": (int, 2, 2), "classifier_attention_resolutions": (str, "32,16,8", "32,16,8"),
    "classifier_use_scale_shift_norm": (bool, True, True), "classifier_resblock_updown": (bool, True, True),
    "classifier_pool": (str, "attention", "attention"),
}
GUIDED_ONLY = {"num_head_channels", "resblock_updown", "use_new_attention_order", "channel_mult", "use_fp16"}
IGNORED_FLAGS = {  # training / sampling options of those scripts: no effect on the weights' meaning
    "lr", "weight_decay", "lr_anneal_steps", "batch_size", "microbatch", "ema_rate", "log_interval",
    "save_interval", "resume_checkpoint", "fp16_scale_growth", "schedule_sampler", "data_dir", "val_data_dir",
    "noised", "iterations", "anneal_lr", "eval_interval", "clip_denoised", "num_samples", "use_ddim",
    "model_path", "classifier_path", "classifier_scale", "base_samples", "out_dir",
}
CHANNEL_MULT = {"improved": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)},
                "guided": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                           64: (1, 2, 3, 4)}}
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
KINDS = ("auto", "unet", "superres", "classifier")


def _to_bool(name: str, v: str) -> bool:
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise UsageError(f"--flags: --{name} {v!r} is not a boolean (True/False)")


def parse_flags(text: str, codebase: str = "auto") -> tuple[dict[str, Any], str, set[str]]:
    """'--image_size 64 --learn_sigma True ...' -> (every MODEL_FLAGS value, defaults filled in for the codebase,
    the codebase "improved" or "guided", the names given)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"--flags: cannot split {text!r} ({e})") from None
    given: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("--"):
            raise UsageError(f"--flags: expected '--name value', got {w!r}")
        name, eq, value = w[2:].partition("=")
        if not eq:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise UsageError(f"--flags: --{name} has no value (write e.g. --{name} True)")
            value, i = words[i + 1], i + 1
        given[name.replace("-", "_")] = value
        i += 1
    unknown = sorted(set(given) - set(MODEL_FLAGS) - IGNORED_FLAGS)
    if unknown:
        raise UsageError(f"--flags: unknown flag(s) {', '.join('--' + u for u in unknown)}; "
                         f"known: {', '.join(sorted(MODEL_FLAGS))}")
    if codebase == "auto":  # the classifier exists in guided-diffusion only
        guided = GUIDED_ONLY & set(given) or any(g.startswith("classifier_") for g in given)
        codebase = "guided" if guided else "improved"
    col = 1 if codebase == "improved" else 2
    out: dict[str, Any] = {}
    for name, spec in MODEL_FLAGS.items():
        typ, default = spec[0], spec[col]
        if name not in given:
            out[name] = default
        elif typ is bool:
            out[name] = _to_bool(name, given[name])
        else:
            try:
                out[name] = typ(given[name])
            except ValueError:
                raise UsageError(f"--flags: --{name} {given[name]!r} is not a {typ.__name__}") from None
    if codebase == "improved" and (out["use_new_attention_order"] or out["num_head_channels"] != -1):
        raise UsageError("--flags: improved-diffusion has no num_head_channels / use_new_attention_order; "
                         "pass --codebase guided")
    return out, codebase, set(given) & set(MODEL_FLAGS)


def _attention_px(spec: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in spec.split(",") if r.strip())
    except ValueError:
        raise UsageError(f"--flags: --{name} {spec!r}: expected comma-separated pixel sizes, e.g. 16,8") from None


def _channel_mult(f: dict[str, Any], codebase: str, size: int, superres: bool) -> tuple[float, ...]:
    if f["channel_mult"]:
        try:
            return tuple(float(m) if "." in m else int(m) for m in f["channel_mult"].split(","))
        except ValueError:
            raise UsageError(f"--flags: --channel_mult {f['channel_mult']!r}: expected e.g. 1,2,3,4") from None
    table = SR_CHANNEL_MULT if superres else CHANNEL_MULT[codebase]
    if size not in table:
        raise UsageError(f"--flags: {codebase}-diffusion has no default channel_mult for "
                         f"{'--large_size' if superres else '--image_size'} {size} (known: {sorted(table)}); "
                         f"pass --channel_mult")
    return table[size]


def diffusion_kwargs(f: dict[str, Any]) -> dict[str, Any]:
    """Our create_diffusion kwargs for the openai flags. Their losses: use_kl -> vlb; learned sigma with
    rescale_learned_sigmas -> mse + T/1000 L_t (our hybrid, vlb_weight 0.001), without it -> mse + L_t
    (vlb_weight 1/T); fixed sigma -> mse."""
    T = f["diffusion_steps"]
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise UsageError(f"--flags: --noise_schedule {f['noise_schedule']!r}: expected linear or cosine")
    if f["use_kl"]:
        loss, w = "vlb", 0.001
    elif f["learn_sigma"]:
        loss, w = "hybrid", (0.001 if f["rescale_learned_sigmas"] else 1.0 / T)
    else:
        loss, w = "simple", 0.001
    return {"steps": T, "noise_schedule": f["noise_schedule"], "learn_sigma": f["learn_sigma"],
            "sigma_small": f["sigma_small"], "loss": loss, "vlb_weight": w, "predict_xstart": f["predict_xstart"]}


def model_config(f: dict[str, Any], codebase: str, kind: str) -> dict[str, Any]:
    """Our model config dict (ModelConfig, or ClassifierConfig for kind "classifier") for the parsed flags."""
    if kind == "classifier":
        size = f["image_size"]
        mult = _channel_mult({**f, "channel_mult": ""}, "guided", size, False)
        if any(int(m) != m for m in mult):
            raise UsageError(f"classifier at image_size {size}: fractional channel_mult {mult} is not supported")
        return {"kind": "encoder_classifier", "image_size": size, "in_channels": 3,
                "model_channels": f["classifier_width"], "num_res_blocks": f["classifier_depth"],
                "attention_resolutions": [r for r in _attention_px(f["classifier_attention_resolutions"],
                                                                   "classifier_attention_resolutions")
                                          if r in [size // 2 ** i for i in range(len(mult))]],
                "channel_mult": [int(m) for m in mult], "num_classes": 1000, "num_head_channels": 64,
                "use_scale_shift_norm": f["classifier_use_scale_shift_norm"],
                "resblock_updown": f["classifier_resblock_updown"], "pool": f["classifier_pool"]}
    superres = kind == "superres"
    size = f["large_size"] if superres else f["image_size"]
    mult = _channel_mult(f, codebase, size, superres)
    reached = [size // 2 ** i for i in range(len(mult))]  # openai ignores attention at sizes never reached
    attn = [r for r in _attention_px(f["attention_resolutions"], "attention_resolutions") if r in reached]
    return {"image_size": size, "in_channels": 3, "model_channels": f["num_channels"],
            "num_res_blocks": f["num_res_blocks"], "attention_resolutions": attn, "channel_mult": list(mult),
            "num_classes": 1000 if f["class_cond"] else None, "learn_sigma": f["learn_sigma"],
            "dropout": f["dropout"], "num_heads": f["num_heads"], "num_head_channels": f["num_head_channels"],
            "num_heads_upsample": f["num_heads_upsample"], "use_scale_shift_norm": f["use_scale_shift_norm"],
            "resblock_updown": f["resblock_updown"], "null_label": False, "super_res": superres,
            "timestep_scale": 1000.0 / f["diffusion_steps"] if f["rescale_timesteps"] else 1.0}


# ------------------------------------------------------------------------------------------------ weights


class _Mapper:
    """Moves openai-named tensors into our names, consuming each source key once."""

    def __init__(self, src: dict[str, torch.Tensor], legacy: bool) -> None:
        self.src, self.out, self.legacy = dict(src), {}, legacy

    def take(self, theirs: str, ours: str, names: tuple[str, ...] = ("weight", "bias")) -> None:
        for p in names:
            if f"{theirs}.{p}" in self.src:
                self.out[f"{ours}.{p}"] = self.src.pop(f"{theirs}.{p}")

    def res(self, theirs: str, ours: str) -> None:
        for a, b in [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "emb"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "skip")]:
            self.take(f"{theirs}.{a}", f"{ours}.{b}")

    def attn(self, theirs: str, ours: str, heads: int) -> None:
        self.take(f"{theirs}.norm", f"{ours}.norm")
        for p in ("weight", "bias"):
            w = self.src.pop(f"{theirs}.qkv.{p}", None)
            if w is None:
                continue
            w = w.reshape(w.shape[0], -1) if p == "weight" else w
            if self.legacy:  # rows [head][q|k|v][ch] -> [q|k|v][head][ch]
                w = w.unflatten(0, (heads, 3, -1)).transpose(0, 1).flatten(0, 2)
            self.out[f"{ours}.qkv.{p}"] = w
            pw = self.src.pop(f"{theirs}.proj_out.{p}", None)
            if pw is not None:
                self.out[f"{ours}.proj.{p}"] = pw.reshape(pw.shape[0], -1) if p == "weight" else pw

    def block(self, model: torch.nn.Module, where: str, i: int, body: str, attn: str | None) -> None:
        """Our `where`[i] (a UNetBlock) from openai's modules `body` (ResBlock, Downsample or Upsample) and `attn`."""
        from diffusion.unet import ResBlock
        blk, ours = getattr(model, where)[i], f"{where}.{i}"
        if isinstance(blk.body, ResBlock):
            self.res(body, f"{ours}.body")
        elif hasattr(blk.body, "op"):
            self.take(f"{body}.op", f"{ours}.body.op")
        else:  # our Upsample holds its conv's weight and bias itself
            self.take(f"{body}.conv", f"{ours}.body")
        if blk.attn is not None:
            self.attn(attn, f"{ours}.attn", blk.attn.num_heads)


def _walk(m: _Mapper, model: torch.nn.Module, classifier: bool) -> None:
    """openai's input_blocks[1:] are our enc 1:1; an output block [res, attn?, upsample?] is one or two of our dec."""
    m.take("time_embed.0", "time_embed.0")
    m.take("time_embed.2", "time_embed.2")
    m.take("label_emb", "label_emb", ("weight",))
    m.take("input_blocks.0.0", "conv_in")
    for i in range(len(model.enc)):
        m.block(model, "enc", i, f"input_blocks.{i + 1}.0", f"input_blocks.{i + 1}.1")
    m.block(model, "mid", 0, "middle_block.0", "middle_block.1")
    m.block(model, "mid", 1, "middle_block.2", None)
    m.take("out.0", "norm_out")
    if classifier:
        m.take("out.2", "pool", ("positional_embedding",))
        m.take("out.2.qkv_proj", "pool.qkv")  # ADM's pool uses the new (q|k|v, then heads) order: no permutation
        m.take("out.2.c_proj", "pool.c_proj")
        m.take("out.3", "pool.proj")
        return
    ob, nxt = -1, 1
    for d, blk in enumerate(model.dec):
        if blk.takes_skip:
            ob += 1
            m.block(model, "dec", d, f"output_blocks.{ob}.0", f"output_blocks.{ob}.1")
            nxt = 2 if blk.attn is not None else 1
        else:
            m.block(model, "dec", d, f"output_blocks.{ob}.{nxt}", None)
    m.take("out.2", "conv_out")


def convert_state(src: dict[str, torch.Tensor], model: torch.nn.Module, *, legacy: bool,
                  classifier: bool = False) -> dict[str, torch.Tensor]:
    """openai state dict -> our state dict for `model` (float32, our shapes). UsageError naming the first
    leftover, missing or mis-shaped weights when the flags do not describe the checkpoint."""
    m = _Mapper(src, legacy)
    _walk(m, model, classifier)
    ours = model.state_dict()
    missing = [k for k in ours if k not in m.out]
    bad = [f"{k} {tuple(m.out[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
           if k in m.out and m.out[k].numel() != v.numel()]
    if m.src or missing or bad:
        parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                 (("unused checkpoint weights", sorted(m.src)), ("weights the flags need but the checkpoint lacks",
                  missing), ("shape mismatches", bad)) if keys]
        raise UsageError(f"the checkpoint does not match the flags ({'; '.join(parts)}); "
                         f"check --flags (and --codebase)")
    return {k: m.out[k].reshape(v.shape).float().contiguous() for k, v in ours.items()}


def load_openai_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, read with weights_only=True (no code runs); a {"state_dict": ...} or
    {"model": ...} wrapper is unwrapped."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused (code objects), truncated or not a torch file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{path}: not a loadable state dict with weights_only=True ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def _kind(kind: str, given: set[str]) -> str:
    if kind != "auto":
        return kind
    if any(g.startswith("classifier_") for g in given):
        return "classifier"
    return "superres" if {"large_size", "small_size"} & given else "unet"


def convert_openai(ckpt: str, flags: str, out: str, *, codebase: str = "auto", kind: str = "auto") -> tuple[str, str]:
    """Convert an improved-/guided-diffusion checkpoint `ckpt` described by `flags` (their command-line flags) to
    `out` (.safetensors) + its JSON; returns both paths. kind: unet, superres, classifier or auto (from flags)."""
    from diffusion.classifier import create_classifier_from_config
    from diffusion.presets import create_model_from_config
    from trainer.export import json_path_for, save_exported
    f, codebase, given = parse_flags(flags, codebase)
    kind = _kind(kind, given)
    cfg = model_config(f, codebase, kind)
    try:
        model = (create_classifier_from_config if kind == "classifier" else create_model_from_config)(cfg)
    except ValueError as e:
        raise UsageError(f"--flags describe no valid model: {e}") from None
    legacy = kind == "classifier" or not f["use_new_attention_order"]  # create_classifier never sets it
    state = convert_state(load_openai_checkpoint(ckpt), model, legacy=legacy, classifier=kind == "classifier")
    dkw = diffusion_kwargs(f)
    save_exported(out, state, cfg, dkw, step=0, ema="converted")
    jpath = json_path_for(out)
    with open(jpath) as fh:
        meta = json.load(fh)
    meta["converted_from"] = {"checkpoint": os.path.abspath(ckpt), "codebase": f"{codebase}-diffusion",
                              "kind": kind, "flags": flags, "attention_order": "legacy" if legacy else "new"}
    atomic_write_json(jpath, meta)
    return out, jpath


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, "trainer.convert", argv)


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog="python -m trainer.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    o = sub.add_parser("openai", help="an improved-diffusion / guided-diffusion checkpoint (.pt)",
                       description="Convert an openai/improved-diffusion or openai/guided-diffusion checkpoint.")
    o.add_argument("checkpoint", help="the .pt file (a torch.save'd state dict; read with weights_only=True)")
    o.add_argument("--flags", required=True,
                   help="the model and diffusion flags the checkpoint was trained with, as in those READMEs, e.g. "
                        "\"--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                        "--diffusion_steps 4000 --noise_schedule cosine\"")
    o.add_argument("--out", required=True, help="output .safetensors (the JSON config is written beside it)")
    o.add_argument("--codebase", choices=("auto", "improved", "guided"), default="auto",
                   help="whose flag defaults apply (auto: guided if a guided-only flag is given)")
    o.add_argument("--kind", choices=KINDS, default="auto",
                   help="unet, superres (SuperResModel) or classifier (EncoderUNetModel); auto: from the flags")
    a = p.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        raise UsageError(f"--out {a.out}: the file name must end in .safetensors")
    w, j = convert_openai(a.checkpoint, a.flags, a.out, codebase=a.codebase, kind=a.kind)
    print(f"wrote {w} and {j}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
