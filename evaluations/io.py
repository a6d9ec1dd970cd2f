"""Files for evaluation: safe npz reading (never unpickles), image-batch checks, atomic writes, one-line CLI errors."""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from typing import Any, NoReturn

import numpy as np

# One implementation of atomic writes (temp name, fsync, rename, fsync folder) for the trainer and evaluations.
from trainer.fsio import atomic_write, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad user input (flags, files). Printed as one line on stderr; exit code 2."""


def die(msg: str, prog: str) -> NoReturn:
    """Print `prog: error: msg` (one line) on stderr and exit with code 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(msg).split())}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_BAD_INPUT)


# ------------------------------------------------------------------------------------------------ atomic writes

def atomic_save_npz(path: str, **arrays: np.ndarray) -> None:
    """np.savez to `path` atomically (the file object form, so numpy does not append '.npz' to the temp name)."""
    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, w)


# ------------------------------------------------------------------------------------------------ reading

def load_model(path: str, device: Any) -> tuple[Any, dict, dict]:
    """Exported weights (trainer.export) -> (model, diffusion kwargs, meta); a missing or broken file is a UsageError."""
    from trainer.export import load_exported
    if not os.path.isfile(path):
        raise UsageError(f"--model {path}: no such file (export one with python -m trainer.export RUN_DIR)")
    try:
        return load_exported(path, device=device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"--model {path}: cannot load exported model ({e})") from None


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


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
