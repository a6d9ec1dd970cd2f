"""Consolidated weights that leave the trainer: safetensors + JSON config.

    python -m trainer.export RUN_DIR --ema 0.9999 --out model.safetensors
    python -m trainer.export RUN_DIR --format diffusers --out-dir DIR      (trainer/export_diffusers.py)

writes `model.safetensors` (fp32 state dict) and `model.json`
`{"kind": how it is sampled, "model": ModelConfig dict, "diffusion": create_diffusion kwargs, "step": int,
"ema": str}` (plus the objective's own entries, e.g. "distill": the round's plan for a distilled student; a
guidance-distilled one has model.guidance_embed true). An objective with several networks exports every network it
declares exported, into the one file, each tensor named `<network>.<parameter>`, and lists them under "networks";
a network without EMA contributes its raw weights whatever --ema says.
Checkpoints keep EMA and model weights already consolidated (gathered across ZeRO partitions when saved),
so export works from any ZeRO stage without DeepSpeed.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from data.cli import ArgumentParser, UsageError, run_cli
from data.fsio import atomic_save_safetensors, atomic_write_json
from trainer.networks import DEFAULT, weights_file


def json_path_for(path: str) -> str:
    """`model.safetensors` -> `model.json`."""
    root, _ = os.path.splitext(path)
    return root + ".json"


def save_exported(path: str, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                  diffusion_kwargs: dict[str, Any], *, step: int, ema: str,
                  extra: dict[str, Any] | None = None) -> tuple[str, str]:
    """Write `path` (safetensors, fp32 tensors) and its JSON sibling atomically; return both paths.

    `ema` names the weights: an EMA rate such as "0.9999", or "model" for the raw (non-averaged) weights;
    `extra`: further JSON entries (e.g. "distill").
    """
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    atomic_save_safetensors(path, tensors, metadata={"format": "pt", "ema": str(ema), "step": str(int(step))})
    meta = {**(extra or {}), "model": dict(model_config), "diffusion": dict(diffusion_kwargs), "step": int(step),
            "ema": str(ema)}
    jpath = json_path_for(path)
    atomic_write_json(jpath, meta)
    return path, jpath


MAX_CONFIG_INT = 1 << 16  # no size field of a UNet config (channels, blocks, image side, classes) is this large


def weights_numel(path: str) -> int:
    """Elements of every tensor of a safetensors file, from its header (nothing else is read)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
        return total


def check_model_size(cfg: dict[str, Any], path: str) -> None:
    """Refuse (ValueError, one phrase) a model config with absurd sizes, or one that does not describe the weights
    in `path`, or needs more memory than this machine has, before anything is allocated: the model is built on
    the meta device and its state-dict elements compared with the file's header."""
    from diffusion.presets import create_model_from_config
    for k, v in cfg.items():
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CONFIG_INT or \
                isinstance(v, (list, tuple)) and (len(v) > 64 or any(isinstance(x, (int, float)) and
                                                                       abs(x) > MAX_CONFIG_INT for x in v)):
            raise ValueError(f"model.{k} = {str(v)[:40]} in {json_path_for(path)} is not a plausible size (edited?)")
    with torch.device("meta"):
        numel = sum(t.numel() for t in create_model_from_config(cfg).state_dict().values())
    have = weights_numel(path)
    if numel != have:
        raise ValueError(f"{json_path_for(path)} describes a model of {numel / 1e6:.2f}M weights, {path} holds "
                         f"{have / 1e6:.2f}M: the JSON does not belong to these weights")
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 8 * numel > free:  # the fp32 file read plus the fp32 model
        raise ValueError(f"the model needs about {8 * numel / 2**30:.1f} GiB to load ({numel / 1e6:.0f}M fp32 "
                         f"weights, twice), this machine has {free / 2**30:.1f} GiB free")


def load_exported(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Load an exported model -> (model in eval mode on `device`, diffusion kwargs, full meta dict).

    No pickle is involved: safetensors for tensors, JSON for the configuration.
    """
    from safetensors.torch import load_file
    from diffusion.presets import create_model_from_config
    jpath = json_path_for(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported weights at {path}")
    if not os.path.isfile(jpath):
        raise FileNotFoundError(f"no JSON config next to the weights: expected {jpath}")
    with open(jpath) as f:
        meta = json.load(f)
    check_model_size(meta["model"], path)
    model = create_model_from_config(meta["model"])
    state = load_file(path, device="cpu")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, dict(meta["diffusion"]), meta


# ---------------------------------------------------------------------------------------------- CLI


def resolve_checkpoint(run_dir: str) -> str:
    """RUN_DIR (or a checkpoint folder) -> the checkpoint folder to export from."""
    if os.path.isfile(os.path.join(run_dir, "meta.json")):
        return run_dir
    ck = os.path.join(run_dir, "checkpoints")
    latest = os.path.join(ck, "latest")
    if not os.path.isfile(latest):
        raise UsageError(f"no checkpoint in {run_dir} (expected {latest}); train first or pass a checkpoint folder")
    with open(latest) as f:
        name = f.read().strip()
    path = os.path.join(ck, name)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise UsageError(f"{latest} points to {path}, which is not a complete checkpoint")
    return path


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def export_run(run_dir: str, ema: str, out: str) -> tuple[str, str]:
    """Export EMA `ema` (a rate such as 0.9999, a tracked power-function EMA such as phema_0.05, or "model") from
    the latest checkpoint of `run_dir` to `out`."""
    state, meta, key = run_weights(run_dir, ema)
    return save_exported(out, state, meta.get("model", {}), meta.get("diffusion", {}), step=int(meta["step"]), ema=key,
                         extra=export_extra(meta))


def export_extra(meta: dict[str, Any]) -> dict[str, Any]:
    """The entries of an exported file's JSON beyond model/diffusion/step/ema, from its checkpoint's meta.json: the
    "kind", the objective's own entries (e.g. "distill") and, for several networks, the exported "networks"."""
    extra = {k: v for k, v in meta.items() if k not in CHECKPOINT_ONLY}
    if "networks" in meta:
        extra["networks"] = sorted(exported_networks(meta))
    return extra


# entries of a checkpoint's meta.json that describe the run, not the exported file
CHECKPOINT_ONLY = ("objective", "ema_rates", "rollbacks", "step", "world_size", "files", "model", "diffusion",
                   "networks")


def exported_networks(meta: dict[str, Any]) -> dict[str, dict[str, bool]]:
    """{network: {"ema": bool, "export": True}} of the networks a checkpoint exports (older runs: "model")."""
    nets = meta.get("networks") or {DEFAULT: {"ema": True, "export": True}}
    return {k: v for k, v in nets.items() if v.get("export", True)}


def default_ema(run_dir: str) -> str:
    """The run's first EMA rate, or "model" for a run without EMAs."""
    with open(os.path.join(resolve_checkpoint(run_dir), "meta.json")) as f:
        rates = json.load(f).get("ema_rates", [])
    return str(rates[0]) if rates else "model"


def run_weights(run_dir: str, ema: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state dict, checkpoint meta with "model"/"diffusion"/"step", the EMA's name) of EMA `ema` (see export_run)
    in the latest checkpoint of `run_dir`."""
    from safetensors.torch import load_file
    ckpt = resolve_checkpoint(run_dir)
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    rates = [str(r) for r in meta.get("ema_rates", [])]
    key = ema
    if ema != "model":
        try:
            key = next(r for r in rates if r == ema or (_number(r) is not None and _number(r) == _number(ema)))
        except StopIteration:
            raise UsageError(f"--ema {ema}: this run keeps EMA rates {','.join(rates) or '(none)'}; "
                             f"pick one of them or 'model'") from None
    nets = exported_networks(meta)
    state: dict[str, torch.Tensor] = {}
    for name, spec in nets.items():
        src = os.path.join(ckpt, weights_file(name, key if key != "model" and spec.get("ema", True) else None))
        if not os.path.isfile(src):
            raise UsageError(f"checkpoint {ckpt} lacks {os.path.basename(src)}")
        prefix = "" if list(nets) == [DEFAULT] else name + "."
        state.update({prefix + k: v for k, v in load_file(src, device="cpu").items()})
    return state, meta, key


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, "trainer.export", argv)


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog="trainer.export",
                                description="Export consolidated (EMA) weights of a training run to safetensors + JSON.")
    p.add_argument("run_dir", help="training run folder (its checkpoints/latest is used) or one checkpoint folder")
    p.add_argument("--ema", default=None,
                   help="EMA to export: a rate, e.g. 0.9999 (default: the run's first), a tracked power-function EMA "
                        "(phema_0.05), or 'model' for the raw weights")
    p.add_argument("--out", default=None, help="output .safetensors path (default RUN_DIR/model_ema<rate>.safetensors)")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors",
                   help="safetensors: our weights + JSON (--out); diffusers: a folder with unet/ (UNet2DModel) and "
                        "scheduler/ (DDPMScheduler) subfolders (--out-dir); see trainer/export_diffusers.py")
    p.add_argument("--out-dir", default=None, help="output folder of --format diffusers")
    a = p.parse_args(argv)
    if a.format == "diffusers":
        from trainer.export_diffusers import export_diffusers
        if a.out_dir is None or a.out is not None:
            raise UsageError("--format diffusers writes a folder: pass --out-dir DIR (not --out)")
        print(f"wrote {export_diffusers(a.run_dir, a.out_dir, ema=a.ema)}")
        return 0
    if a.out_dir is not None:
        raise UsageError("--out-dir is for --format diffusers; --format safetensors writes one file: pass --out FILE")
    if a.ema is None:
        a.ema = default_ema(a.run_dir)
    out = a.out or os.path.join(a.run_dir, f"model_ema{a.ema}.safetensors")
    if not out.endswith(".safetensors"):
        raise UsageError(f"--out {out}: the file name must end in .safetensors")
    w, j = export_run(a.run_dir, a.ema, out)
    print(f"wrote {w} and {j}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
