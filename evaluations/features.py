"""Feature extractors for sample-quality metrics, and per-file feature caching.

Three extractors, each mapping uint8 images [B, H, W, 3] to a dict of float32 tensors:
  "pool"    [B, Dp]  global features (FID, precision/recall)
  "spatial" [B, Ds]  spatial features (sFID)
  "logits"  [B, C]   classifier logits (Inception Score)

- `InceptionExtractor`: TensorFlow's FID Inception-v3 (the 2015-12-05 graph) as ported by torch-fidelity
  (TF1-exact bilinear resize to 299, TF padding quirks). pool = pool_3 (2048); logits = pool_3 @ W of
  softmax/logits without the bias (1008, what guided-diffusion's evaluator feeds the softmax); spatial = the first
  7 channels of mixed_6/conv (= torch-fidelity's Mixed_6d.branch1x1 output, 17x17) flattened in TF's NHWC
  order, 17*17*7 = 2023, as guided-diffusion defines sFID. The weights file
  (`weights-inception-2015-12-05-6726825d.pth`, or a .safetensors of the same state dict) comes from
  `--inception-weights` or $IDDPM_INCEPTION_WEIGHTS and is read with `torch.load(weights_only=True)`;
  nothing is downloaded.
- `StandinExtractor`: a fixed, seeded random conv net for tests and CPU smoke runs. Its numbers are NOT
  comparable to published FID/IS values.
- `PixelsExtractor`: the pixels themselves in [0, 1] (area-downsampled to at most 32x32), for small data sets
  such as the bundled 16x16 digits where Inception features mean little and no weights are at hand.

torch-fidelity is installed without its dependencies (it wants torchvision, which cannot live beside our torch),
and its package __init__ imports torchvision. `_fidelity_module` imports only the Inception module: it registers
a bare package object for `torch_fidelity` (with the package's real __path__, as the import system allows for any
package) just long enough to import the submodule, so the package __init__ never runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.cli import UsageError
from data.fsio import atomic_save_npz
from evaluations.io import check_images, file_sha256, load_npz
from evaluations.metrics import check_features, feature_statistics

INCEPTION_ENV = "IDDPM_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
FEATURES = ("inception", "standin", "pixels")  # the names create_extractor knows


# ------------------------------------------------------------------------------------------------ Inception

def _fidelity_module() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3, imported without running torch_fidelity/__init__.py."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name]
    if "torch_fidelity" in sys.modules:            # the real package is already imported: use it
        return importlib.import_module(name)
    spec = importlib.util.find_spec("torch_fidelity")  # locates the package; does not execute it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("torch-fidelity is not installed; run `pip install --no-deps torch-fidelity` "
                         "(it provides the TF-compatible Inception-v3)")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("torch_fidelity") is pkg:
            del sys.modules["torch_fidelity"]    # a later real `import torch_fidelity` runs its __init__ normally


def resolve_inception_weights(path: str | None) -> str:
    """The weights path from the flag or $IDDPM_INCEPTION_WEIGHTS; one clear error when it is missing."""
    path = path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise UsageError(f"Inception weights not given: download {INCEPTION_URL} on a machine with internet, "
                         f"then pass --inception-weights PATH or set {INCEPTION_ENV}=PATH")
    if not os.path.isfile(path):
        raise UsageError(f"Inception weights not found at {path}: put {INCEPTION_FILE} ({INCEPTION_URL}) there, "
                         f"or point --inception-weights / {INCEPTION_ENV} at it")
    return path


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, without unpickling arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad weights file
        raise UsageError(f"{path}: not a loadable tensor state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path}: expected a flat dict of tensors (torch-fidelity's Inception state dict)")
    return sd


class InceptionExtractor(nn.Module):
    """TF-FID Inception-v3 via torch-fidelity. `weights=None` only with `random_init=True` (shape tests)."""

    comparable = True

    def __init__(self, weights: str | None = None, *, random_init: bool = False):
        super().__init__()
        mod = _fidelity_module()
        if random_init:
            state, self.name = None, "inception-v3-RANDOM-INIT"
        else:
            path = resolve_inception_weights(weights)
            state, self.name = load_state_dict_file(path), "inception-v3-tf-" + file_sha256(path)[:16]

        class _Net(mod.FeatureExtractorInceptionV3):
            def load_state_dict(self, sd, strict=True, assign=False):  # keeps random init when sd is None
                return None if sd is None else super().load_state_dict(sd, strict=strict, assign=assign)

        # The class fetches its weights through the module-level `load_state_dict_from_url` (which would download
        # and unpickle); route that single call to the state dict we already read safely.
        with mock.patch.object(mod, "load_state_dict_from_url", lambda *a, **k: state):
            self.net = _Net("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=None)
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab_spatial)

    def _grab_spatial(self, module, inputs, output: torch.Tensor) -> None:
        # mixed_6/conv: [B, 192, 17, 17] -> first 7 channels, flattened in TF's NHWC order -> [B, 2023]
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: uint8 [B, H, W, 3] -> {"pool" [B, 2048], "spatial" [B, 2023], "logits" [B, 1008]}."""
        pool, logits = self.net(images.permute(0, 3, 1, 2).contiguous())
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


# ------------------------------------------------------------------------------------------------ stand-in

class StandinExtractor(nn.Module):
    """Fixed random conv net (seeded), for tests and CPU smoke runs. NOT comparable to published numbers.

    uint8 [B, H, W, 3] -> resize to 32x32 -> conv 3->32 s2 -> conv 32->64 s2 (spatial: first 7 channels of
    8x8, NHWC, 448) -> conv 64->256 -> mean over space (pool, 256) -> linear 256->10 (logits).
    """

    comparable = False

    def __init__(self, seed: int = 0):
        super().__init__()
        self.name = f"standin-v1-seed{seed}"
        g = torch.Generator().manual_seed(seed)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 256, 3, 1, 1)
        self.fc = nn.Linear(256, 10)
        for m in (self.c1, self.c2, self.c3, self.fc):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        spatial = x[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        pool = F.relu(self.c3(x)).mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


# ------------------------------------------------------------------------------------------------ pixels

def area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Exact area (box-filter) resampling weights [n_out, n_in], float64, rows summing to 1: output pixel j
    averages the input interval [j * n_in / n_out, (j + 1) * n_in / n_out), fractional pixels weighted by overlap."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    i = torch.arange(n_in, dtype=torch.float64)[None, :]
    return (torch.minimum(hi, i + 1) - torch.maximum(lo, i)).clamp_(min=0) / (n_in / n_out)


class PixelsExtractor(nn.Module):
    """Pixel features for small images (e.g. the 16x16 digits). NOT comparable to published numbers.

    uint8 [B, H, W, 3] -> / 255 -> exact area downsample to (min(H, max_side), min(W, max_side)) -> flattened in
    HWC order: pool = spatial [B, h*w*3] (so sFID equals FID; 768 dims at 16x16, at most 3072), logits = one zero
    column [B, 1] (no classifier: the Inception Score is 1 by construction). `max_side` bounds the covariance
    ((h*w*3)^2 float64: 75 MB at 32x32).
    """

    comparable = False

    def __init__(self, max_side: int = 32):
        super().__init__()
        if max_side < 1:
            raise UsageError(f"pixels features: max_side must be >= 1, got {max_side}")
        self.max_side, self.name = max_side, f"pixels-v1-max{max_side}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float().div(255.0)                            # [B, H, W, 3] in [0, 1]
        h, w = x.shape[1:3]
        if h > self.max_side or w > self.max_side:
            rows = area_matrix(h, min(h, self.max_side)).to(x)
            cols = area_matrix(w, min(w, self.max_side)).to(x)
            x = torch.einsum("oh,bhwc,pw->bopc", rows, x, cols)
        pool = x.reshape(x.shape[0], -1)
        return {"pool": pool, "spatial": pool, "logits": pool.new_zeros(pool.shape[0], 1)}


def create_extractor(kind: str, inception_weights: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """'inception' (needs the weights file), 'standin' or 'pixels' (`FEATURES`)."""
    if kind == "inception":
        net = InceptionExtractor(inception_weights)
    elif kind == "standin":
        net = StandinExtractor()
    elif kind == "pixels":
        net = PixelsExtractor()
    else:
        raise UsageError(f"--features {kind}: choose one of {', '.join(FEATURES)}")
    return net.to(device)


# ------------------------------------------------------------------------------------------------ running

class _Moments:
    """Streaming mean / covariance in float64, shifted by the first batch's mean for numerical stability."""

    def __init__(self) -> None:
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self.shift, cov


def extract(images: np.ndarray, extractor: nn.Module, batch_size: int = 64, device: str | torch.device = "cpu",
            progress: Callable[[Iterator], Iterator] | None = None) -> dict[str, np.ndarray]:
    """Run the extractor over uint8 images [N, H, W, 3].

    Returns pool [N, Dp] and logits [N, C] (float32) plus mu/sigma (pool statistics) and mu_s/sigma_s (spatial
    statistics, accumulated batch by batch so spatial features never sit in memory all at once), float64.
    """
    check_images(images, "images")
    if images.shape[0] < 2:
        raise UsageError(f"need at least 2 images for feature statistics, got {images.shape[0]}")
    pools, logits, spatial = [], [], _Moments()
    starts = range(0, images.shape[0], batch_size)
    for i in (progress(starts) if progress else starts):
        out = extractor(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device))
        for k in ("pool", "spatial", "logits"):
            check_features(out[k], f"{k} features of images {i}..{i + batch_size - 1}")
        pools.append(out["pool"].float().cpu().numpy())
        logits.append(out["logits"].float().cpu().numpy())
        spatial.update(out["spatial"].float().cpu().numpy())
    pool = np.concatenate(pools)
    mu, sigma = feature_statistics(pool, "pool features")
    mu_s, sigma_s = spatial.result()
    return {"pool": pool, "logits": np.concatenate(logits), "mu": mu, "sigma": sigma, "mu_s": mu_s,
            "sigma_s": sigma_s}


def cached_features(path: str, images: np.ndarray, extractor: nn.Module, cache_dir: str | None,
                    batch_size: int = 64, device: str | torch.device = "cpu",
                    progress: Callable[[Iterator], Iterator] | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """`extract` with a cache keyed by (SHA-256 of the input file, extractor name) -> (features, from_cache)."""
    if cache_dir is None:
        return extract(images, extractor, batch_size, device, progress), False
    key = f"{file_sha256(path)}-{extractor.name}.npz"
    cpath = os.path.join(cache_dir, key)
    if os.path.isfile(cpath):
        try:
            cached = load_npz(cpath)
            if {"pool", "logits", "mu", "sigma", "mu_s", "sigma_s"} <= set(cached) and \
                    cached["pool"].shape[0] == images.shape[0]:
                return cached, True
        except UsageError:
            pass                                    # unreadable cache entry: recompute and overwrite it
    feats = extract(images, extractor, batch_size, device, progress)
    atomic_save_npz(cpath, **feats)
    return feats, False
