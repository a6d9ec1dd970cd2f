"""One sample of any webdataset -> (uint8 image [H, W, 3], class index): which member holds the image, where the
label comes from, and the two centre-crop resizes (ADM's and exact area).

Members of a sample share a key (``KEY.jpg``, ``KEY.cls``, ...; webdataset's convention, ``shards.split_key``).

- Image: the first of ``IMAGE_KEYS`` present. ``npy``: a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]
  (alpha dropped), read with ``allow_pickle=False``; the others are decoded by PIL and converted to RGB (alpha
  dropped, palette and grey expanded), as ADM's loader does.
- Label: the first of ``LABEL_KEYS`` that holds one. ``cls``/``class``/``label``: ASCII integer (an unparseable
  one makes the sample bad); ``json``: an object with an integer ``label`` or ``class`` field (other JSON, e.g.
  img2dataset's metadata, holds no label); ``txt``: an ASCII integer (any other text, e.g. a caption, holds no
  label). Whether a data set is labelled is decided by its first good sample.
- Resize to ``size`` x ``size`` (only images of another size; one of ``RESIZERS``):
  ``adm`` is guided-diffusion's ``center_crop_arr``: halve with PIL's BOX filter while the short side is at least
  2 x size, resize with BICUBIC so the short side is ``size``, then take the centre square (offsets rounded
  down). ``area`` takes the centre square first and area-averages it exactly (float64 overlap weights, one
  rounding).
"""
from __future__ import annotations

import io
import json
from typing import Callable

import numpy as np
from PIL import Image

IMAGE_KEYS = ("npy", "png", "jpg", "jpeg", "webp", "ppm", "bmp")
LABEL_KEYS = ("cls", "class", "label", "json", "txt")
DEFAULT_RESIZE = "adm"


# -------------------------------------------------------------------------------------------------- resize
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix: output pixel i = mean of the input over [i, i+1) * n_in / n_out (exact overlaps)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
    return np.clip(overlap, 0, None) / (n_in / n_out)


def area_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Exact area (box-filter) resize uint8 [h, w, 3] -> [size, size, 3], computed in float64 and rounded once.

    (PIL's Image.BOX rounds after each of its two passes: about +0.5 grey levels of bias on average.)
    """
    h, w = arr.shape[:2]
    out = np.tensordot(_area_weights(h, size), arr.astype(np.float64), axes=(1, 0))  # [size, w, 3]
    out = np.tensordot(out, _area_weights(w, size), axes=(1, 1))  # [size, 3, size]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(0, 2, 1).copy()


def _pil(img: Image.Image | np.ndarray) -> Image.Image:
    return Image.fromarray(img) if isinstance(img, np.ndarray) else img.convert("RGB")


def center_crop_area(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square, then exact area downsample to size x size. -> uint8 [size, size, 3]."""
    arr = img if isinstance(img, np.ndarray) else np.asarray(img.convert("RGB"), dtype=np.uint8)
    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    arr = arr[top:top + s, left:left + s]
    return np.ascontiguousarray(arr) if s == size else area_resize(arr, size)


def center_crop_adm(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr``: BOX-halve while the short side >= 2 size, BICUBIC to short side
    ``size``, centre crop. -> uint8 [size, size, 3]."""
    img = _pil(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


RESIZERS: dict[str, Callable[[Image.Image | np.ndarray, int], np.ndarray]] = {
    "adm": center_crop_adm, "area": center_crop_area}


# -------------------------------------------------------------------------------------------------- decode
def _npy(payload: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(payload), allow_pickle=False)
    if arr.dtype != np.uint8:
        raise ValueError(f"dtype {arr.dtype}, expected uint8")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"array of shape {arr.shape}, expected H x W (x 1, 3 or 4)")
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return arr[:, :, :3]


def decode_image(ext: str, payload: bytes, size: int | None = None, resize: str = DEFAULT_RESIZE) -> np.ndarray:
    """The bytes of an ``ext`` member -> uint8 [H, W, 3]; with ``size``, an image of another size is resized to
    [size, size, 3] with ``RESIZERS[resize]``. Raises ValueError (or PIL's errors) on undecodable data."""
    if ext == "npy":
        img: Image.Image | np.ndarray = _npy(payload)
        hw = img.shape[:2]
    else:
        img = Image.open(io.BytesIO(payload))
        img.load()
        img = img.convert("RGB")
        hw = (img.height, img.width)
    if size is not None and hw != (size, size):
        return RESIZERS[resize](img, size)
    return img if isinstance(img, np.ndarray) else np.asarray(img, dtype=np.uint8)


def _int(text: bytes | str | int) -> int:
    """An integer label from ASCII digits (surrounding white space allowed) or a JSON int; ValueError otherwise."""
    if isinstance(text, (bool, float)):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def find_label(buf: bytes, sample: dict[str, tuple[int, int]]) -> tuple[int | None, str | None]:
    """The sample's class index from the first of ``LABEL_KEYS`` that holds one: (label, None); (None, None) when
    no member holds a label; (None, why) when a cls/class/label member cannot be read as an integer."""
    for key in LABEL_KEYS:
        where = sample.get(key)
        if where is None:
            continue
        raw = buf[where[0]:where[0] + where[1]]
        if key == "json":
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            field = next((k for k in ("label", "class") if isinstance(obj, dict) and k in obj), None)
            if field is None:
                continue  # metadata without a label
            try:
                return _int(obj[field]), None
            except (TypeError, ValueError):
                return None, f"unparseable json '{field}' field"
        try:
            return _int(raw), None
        except ValueError:
            if key == "txt":
                continue  # a caption, not a label
            return None, f"unparseable label in .{key}"
    return None, None
