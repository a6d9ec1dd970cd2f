"""The one atomic-write module: write to a temporary name in the same folder, fsync, rename, fsync the folder.

A crash at any point leaves either the old file or the new one, never half of one. Used by the shard writer,
the trainer's checkpoints and exports, and every evaluation output.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename inside it is durable (a no-op where the OS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it to `path` (the folder is created if needed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, w)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path: str, **arrays: Any) -> None:
    """np.savez to `path` atomically (through a file object, so numpy does not append '.npz' to the temp name)."""
    import numpy as np

    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, w)


def atomic_save_safetensors(path: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of torch tensors (made contiguous, on CPU) as safetensors, atomically."""
    from safetensors.torch import save_file
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def sha256_file(path: str, chunk: int = 1 << 23) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
