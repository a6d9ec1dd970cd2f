"""Files and models for evaluation: the one inference loader, safe npz reading (never unpickles), image checks.

Errors are `data.cli.UsageError` (one line, exit code 2 in the CLIs); atomic writes come from `data.fsio`.
"""
from __future__ import annotations

import argparse
import os
import zipfile
from typing import Any, Callable

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, flag
from data.fsio import sha256_file


# ------------------------------------------------------------------------------------------------ models

def load_model(path: str, device: str | torch.device = "cpu", respacing: str = "", *,
               what: str = "--respace", super_res: bool = False) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Exported weights (trainer.export) -> (model in eval mode on `device`, diffusion, meta).

    The diffusion is the one the model was trained with (read from the JSON beside the weights), respaced by
    `respacing` ("" = all T steps, "250", "10,15,20", "ddim50"). A missing or broken file, or a respacing the
    process cannot take, is a UsageError; `what` names the option that set the respacing in that message.
    A super-resolution model (SuperResModel) is refused unless the caller provides low_res (`super_res`).
    """
    from diffusion import create_diffusion
    from trainer.export import load_exported
    if not os.path.isfile(path):
        raise UsageError(f"--model {path}: no such file (export one with python -m trainer.export RUN_DIR)")
    if _export_kind(path) == "encoder_classifier":
        raise UsageError(f"--model {path} is a classifier, not a diffusion model; pass it as --classifier")
    from evaluations.vdm_nll import is_vdm
    if is_vdm(path):  # a VDMNet (trainer.vdm): evaluations.sample and evaluations.nll have their own routes
        raise UsageError(f"--model {path} is a Variational Diffusion Model: evaluations.sample (--respace N) and "
                         f"evaluations.nll take it, this tool does not")
    try:
        model, dkw, meta = load_exported(path, device=device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"--model {path}: cannot load exported model ({e})") from None
    if meta["model"].get("super_res") and not super_res:
        raise UsageError(f"--model {path}: a super-resolution model needs low-resolution inputs (low_res); sample "
                         f"it with evaluations.sample --low-res LOW.npz, or call it: model(x, t, y, low_res=...)")
    try:
        diffusion = create_diffusion(**{**dkw, "timestep_respacing": respacing})
    except ValueError as e:                     # e.g. a respacing that does not divide the process
        raise UsageError(f"{what}: {e}") from None
    return model, diffusion, meta


def _export_kind(path: str) -> str | None:
    """The "kind" of the model config in the JSON beside exported weights (None: a UNet or no readable JSON)."""
    import json
    try:
        with open(os.path.splitext(path)[0] + ".json") as f:
            model = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model.get("kind") if isinstance(model, dict) else None


def load_classifier(path: str, device: str | torch.device = "cpu", *, what: str = "--classifier"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Exported classifier weights (a `--objective classifier` run, trainer.export) -> (EncoderClassifier in eval
    mode on `device`, meta: {"model": ClassifierConfig dict, "diffusion": the process it was trained for, ...}).
    A missing file, a diffusion model (UNet) or broken weights is a UsageError naming `what`."""
    import json
    from safetensors.torch import load_file
    from diffusion.classifier import KIND, create_classifier_from_config
    jpath = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path}: no such file (train one with --objective classifier, then trainer.export)")
    try:
        with open(jpath) as f:
            meta = json.load(f)
        model_cfg = meta["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{what} {path}: no readable JSON config beside it ({jpath}: {e})") from None
    if not isinstance(model_cfg, dict) or model_cfg.get("kind") != KIND:
        raise UsageError(f"{what} {path} is a diffusion model (UNet), not a classifier; pass a classifier exported "
                         f"from a --objective classifier run")
    try:
        model = create_classifier_from_config(model_cfg)
        model.load_state_dict(load_file(path, device="cpu"), strict=True)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        raise UsageError(f"{what} {path}: cannot load the classifier ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta


def inference_parser(prog: str, doc: str) -> ArgumentParser:
    """The parser of a CLI that runs a model on each rank (sample, nll): `--model` plus a "running" group
    (--clip/--no-clip, --device, --threads, --progress/--no-progress) named as the entry points' keywords."""
    p = ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="exported weights (model.safetensors with model.json beside it)")
    g = p.add_argument_group("running")
    flag(g, "--clip", True, "clip predicted x_0 to [-1, 1]")
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: this rank's GPU, else CPU)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    flag(g, "--progress", True, "progress bar on rank 0")
    return p


# ------------------------------------------------------------------------------------------------ reading

def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    return sha256_file(path)


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Read every array of an .npz (or a single .npy) without unpickling; pickled object arrays are refused."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    try:
        f = np.load(path, allow_pickle=False)
        if isinstance(f, np.ndarray):
            return {"arr_0": f}
        with f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise UsageError(f"{path}: contains pickled Python objects, which are refused for safety; "
                             f"save plain numeric arrays (np.savez(path, arr_0=uint8_images))") from None
        raise UsageError(f"{path}: not a readable .npz/.npy file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npz/.npy file ({e})") from None


def check_images(arr: Any, name: str) -> np.ndarray:
    """Check an image batch: uint8 [N, H, W, 3] with N >= 1 (guided-diffusion's sample/reference format)."""
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"{name}: expected an array of images, got {type(arr).__name__}")
    if arr.dtype != np.uint8:
        rng = (f" with values in [{arr.min():.3g}, {arr.max():.3g}]"
               if arr.size and np.issubdtype(arr.dtype, np.number) else "")
        raise UsageError(f"{name}: images must be uint8 in [0, 255], got dtype {arr.dtype}{rng}; "
                         f"convert e.g. ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1 or min(arr.shape[1:3]) < 1:
        raise UsageError(f"{name}: images must have shape [N, H, W, 3] (channels last, RGB), got {arr.shape}")
    return arr


def save_report(out_dir: str, report: dict[str, Any], *, stem: str, markdown: Callable[[dict], str],
                plot: Callable[[dict, str], Any], png: str) -> str:
    """Write `stem`.json, `stem`.md (from `markdown(report)`) and the figure `png` (`plot(report, path)`) into
    `out_dir`, each atomically. Returns the markdown."""
    from data.fsio import atomic_write_json, atomic_write_text
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, f"{stem}.json"), report)
    md = markdown(report)
    atomic_write_text(os.path.join(out_dir, f"{stem}.md"), md)
    plot(report, os.path.join(out_dir, png))
    return md
