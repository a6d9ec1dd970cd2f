"""Draw N samples from an exported model on any number of ranks into one npz (guided-diffusion's format).

    python -m evaluations.sample --model model.safetensors --num-samples N --batch-size B --out samples.npz \
        [--respace 250 | --ddim 50 --eta 0] [--guidance-scale W] [--labels LABELS.npy | --class-label K] [--seed S] \
        [--classifier CLF.safetensors --classifier-scale S]

Launch with python, torchrun/deepspeed, srun or mpiexec: the N samples are cut into ceil(N / B) global batches and
batch b runs on rank b % world. Batch b draws its labels, x_T and every sampler noise from a CPU generator seeded by
data.seeds.derive_seed(seed, b), so the result does not depend on the number of ranks or on the device's RNG. Each
finished batch is saved atomically under OUT.parts/; a killed job re-run with the same command keeps them and does
the rest. Rank 0 then writes OUT (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N] for class-conditional models and
classifier guidance) and OUT.json (settings, throughput) atomically, and removes OUT.parts/. --classifier guides
with a noise-aware classifier (DDPM: mean shift, DDIM: score shift; unconditional models too; docs/evaluations.md).
A guidance-distilled student (model.guidance_embed, trainer.distill --teacher-guidance-range) takes the scale as an
input: --guidance-scale W is required for it and costs ONE forward per step (no conditional/unconditional pair).

From Python, `sample(model, num_samples, ...)` returns the images and labels (on rank 0) and writes nothing but
the optional resume folder `parts_dir`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, exit_without_teardown, run_cli
from data.fsio import atomic_save_npz, atomic_write_json
from data.runlock import LockHeld, RunLock
from data.seeds import derive_seed
from evaluations import dist
from evaluations.io import inference_parser, load_model, load_npz
from evaluations.vdm_nll import is_vdm
from trainer.compile import add_speed_flags
from trainer.sync import gather_rows

PROG = "evaluations.sample"


@dataclass(frozen=True)
class Samples:
    """What `sample` returns on rank 0."""
    images: np.ndarray                  # uint8 [N, H, W, 3]
    labels: np.ndarray | None           # int64 [N] for a class-conditional model, else None
    report: dict[str, Any]              # settings, shape, ranks, device, sampled_this_run, resumed_batches,
                                        # seconds, images_per_second, model_steps_per_image
    reused: bool = False                # True: a finished earlier output (`reuse`) was returned, nothing sampled


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded to the nearest of 256 levels)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_labels(labels: str | np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """Integer labels [n] (int64) from an array or a .npy/.npz (first array, or arr_1 when it is a sample batch)."""
    name = f"--labels {labels}" if isinstance(labels, str) else "labels"
    if isinstance(labels, str):
        arrays = load_npz(labels)
        y = arrays.get("arr_1", next(iter(arrays.values())))
    else:
        y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{name}: expected a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) < n:
        raise UsageError(f"{name}: holds {len(y)} labels but --num-samples is {n}")
    if y.min() < 0 or y.max() >= num_classes:
        raise UsageError(f"{name}: labels must lie in [0, {num_classes - 1}], got [{y.min()}, {y.max()}]")
    return y[:n].astype(np.int64)


def check_options(num_samples: int, batch_size: int, respace: str | None, ddim: int | None, eta: float,
                  guidance_scale: float | None, labels: Any, class_label: int | None, classifier: str | None = None,
                  classifier_scale: float = 1.0) -> None:
    """Refuse contradictory or out-of-range sampling options (UsageError, one line)."""
    if num_samples < 1 or batch_size < 1:
        raise UsageError("--num-samples and --batch-size must be positive integers")
    if ddim is not None and respace:
        raise UsageError("--ddim N already sets the respacing ('ddimN'); drop --respace")
    if ddim is not None and ddim < 1:
        raise UsageError(f"--ddim {ddim}: the number of DDIM steps must be positive")
    if eta < 0 or (eta and not ddim):
        raise UsageError("--eta must be >= 0 and only applies with --ddim")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise UsageError("--guidance-scale must be >= 0")
    if labels is not None and class_label is not None:
        raise UsageError("give either --labels or --class-label, not both")
    if not classifier_scale >= 0:
        raise UsageError(f"--classifier-scale {classifier_scale}: must be >= 0 (0 = unguided)")


def sample_batch(diffusion, model, shape: tuple[int, ...], seed: int, *, num_classes: int | None,
                 labels: np.ndarray | None, ddim: bool, eta: float, clip: bool, device: torch.device,
                 cond_fn: Any = None, conditional_model: bool = True, low_res: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch: labels (uniform unless given), x_T and step noise from a CPU generator seeded by `seed`.
    low_res: uint8 [B, h, w, C], the inputs of a super-resolution model (passed to it in [-1, 1], NCHW).
    cond_fn: classifier guidance (labels reach it as y). An unconditional model guided by a classifier
    (conditional_model False) draws its labels from a generator of its own, derive_seed(seed, 1), so that its
    images at guidance scale 0 equal unguided sampling bitwise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = {}
    y = None
    if num_classes is not None:
        gy = g if conditional_model else torch.Generator(device="cpu").manual_seed(derive_seed(seed, 1))
        y = torch.from_numpy(labels) if labels is not None else torch.randint(num_classes, (shape[0],), generator=gy)
        kwargs["y"] = y.to(device)
    if low_res is not None:
        kwargs["low_res"] = torch.from_numpy(low_res).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    noise = torch.randn(shape, generator=g).to(device)
    common = dict(noise=noise, clip_denoised=clip, model_kwargs=kwargs, device=device, generator=g, cond_fn=cond_fn)
    with torch.no_grad():
        x = diffusion.ddim_sample_loop(model, shape, eta=eta, **common) if ddim else \
            diffusion.p_sample_loop(model, shape, **common)
    return to_uint8(x), (y.numpy().astype(np.int64) if y is not None else None)


@dataclass(frozen=True)
class _Job:
    """A loaded model and everything that determines the samples."""
    net: Any                            # the model, wrapped for classifier-free guidance when asked
    diffusion: Any
    labels: np.ndarray | None           # int64 [N] fixed labels, or None (uniform per batch / unconditional)
    num_classes: int | None
    shape: tuple[int, int, int]         # (C, H, W) of one image
    settings: dict[str, Any]            # parts on disk and a finished output are reused only when this matches
    cond_fn: Any = None                 # classifier guidance (diffusion.guidance.classifier_cond_fn), or None
    conditional_model: bool = True      # False: an unconditional model whose labels only steer the classifier
    forwards_per_step: int = 1          # model forwards per sampling step (2: classifier-free guidance)
    low_res: np.ndarray | None = None   # uint8 [N, h, w, C]: a super-resolution model's inputs, image i's in row i


def _prepare(model: str, device: torch.device, *, num_samples: int, batch_size: int, respace: str | None,
             ddim: int | None, eta: float, guidance_scale: float | None, labels: str | np.ndarray | None,
             class_label: int | None, seed: int, clip: bool, classifier: str | None = None,
             classifier_scale: float = 1.0, compile: bool | str = False, precision: str = "fp32",
             low_res: str | np.ndarray | None = None) -> _Job:
    from trainer.compile import InferenceNet
    respacing = f"ddim{ddim}" if ddim else (respace or "")
    vdm = is_vdm(model)
    if vdm:
        net, diffusion, meta = _load_vdm(model, device, respace, ddim, guidance_scale, classifier, compile, precision)
        respacing = str(diffusion.num_timesteps)
    else:
        net, diffusion, meta = load_model(model, device, respacing, what="--respace/--ddim", super_res=True)
    small, small_labels = _low_res(low_res, meta, model, num_samples, compile)
    if small_labels is not None and labels is None and class_label is None and meta["model"].get("num_classes"):
        labels = small_labels  # the low-resolution batch's labels (as guided-diffusion's super_res_sample)
    num_classes = meta["model"].get("num_classes")
    conditional, cond_fn, guide = num_classes is not None, None, {}
    if classifier is not None:
        cond_fn, num_classes = _classifier_guidance(classifier, classifier_scale, net, meta, device)
        guide = {"classifier": os.path.abspath(classifier), "classifier_scale": classifier_scale}
    fixed = None
    if labels is not None or class_label is not None:
        if num_classes is None:
            raise UsageError("--labels/--class-label given but the model is unconditional")
        if labels is not None:
            fixed = load_labels(labels, num_samples, num_classes)
        elif not 0 <= class_label < num_classes:
            raise UsageError(f"--class-label {class_label}: must lie in [0, {num_classes - 1}]")
        else:
            fixed = np.full(num_samples, class_label, dtype=np.int64)
    if not vdm:  # (a VDM samples through diffusion.vdm.sample, which needs the VDMNet itself)
        net = InferenceNet(net, device, compile=compile, precision=precision)  # after the classifier took its dtype
    embedded = bool(meta["model"].get("guidance_embed"))
    net = guided(net, meta, guidance_scale, model)
    guidance_scale = guidance_scale or 0.0
    settings = {"model": os.path.abspath(model), "model_step": meta.get("step"), "model_ema": meta.get("ema"),
                "num_samples": num_samples, "batch_size": batch_size, "seed": seed,
                "sampler": "ddim" if ddim else "ddpm", "timestep_respacing": respacing, "eta": eta,
                "guidance_scale": guidance_scale, "clip_denoised": clip, "class_label": class_label,
                "labels": hashlib.sha256(fixed.tobytes()).hexdigest()[:16] if fixed is not None else None, **guide,
                **({"precision": precision} if precision != "fp32" else {}),
                **({"guidance": "embedded"} if embedded else {}),
                **({"low_res": hashlib.sha256(small.tobytes()).hexdigest()[:16]} if small is not None else {})}
    size = meta["model"]["image_size"]
    if not conditional and classifier is not None:
        net = _DropLabels(net)
    return _Job(net, diffusion, fixed, num_classes, (meta["model"].get("in_channels", 3), size, size), settings,
                cond_fn, conditional, 2 if guidance_scale and not embedded else 1, small)


def guided(net: Any, meta: dict[str, Any], guidance_scale: float | None, model: str) -> Any:
    """The exported model `net` (meta: its model.json) as sampled at `guidance_scale`: a guidance-distilled student
    (guidance_embed) takes the scale as its input w (required; one forward per step), a class-conditional model
    gets classifier-free guidance when the scale is > 0, others are returned as they are. UsageError (naming the
    --model path `model`) when the scale cannot apply."""
    from diffusion.guidance import ClassifierFreeGuidance, EmbeddedGuidance
    m = meta["model"]
    if m.get("guidance_embed"):  # the scale is the model's input w: one forward per step
        if guidance_scale is None:
            learned = (meta.get("distill") or {}).get("teacher_guidance_range")
            raise UsageError(f"--model {model} is guidance-distilled (it takes the guidance scale as an input): pass "
                             f"--guidance-scale W" + (f" (it learned {learned[0]:g} to {learned[1]:g})"
                                                      if learned else ""))
        return EmbeddedGuidance(net, guidance_scale)
    if not guidance_scale:
        return net
    if m.get("num_classes") is None:
        raise UsageError("--guidance-scale needs a class-conditional model (this one is unconditional)")
    if not m.get("null_label", True):
        raise UsageError("--guidance-scale: this model has no null-label row (converted from a checkpoint "
                         "trained without label dropout), so classifier-free guidance is undefined; use 0")
    return ClassifierFreeGuidance(net, guidance_scale, int(m["num_classes"]))


def _load_vdm(model: str, device: torch.device, respace: str | None, ddim: int | None, guidance_scale: float | None,
              classifier: str | None, compile: bool | str, precision: str) -> tuple[Any, Any, dict[str, Any]]:
    """A Variational Diffusion Model (trainer.vdm) -> (VDMNet, its ancestral sampler, meta): `--respace N` equal
    steps of t (default 1000); DDIM, guidance, --compile and bf16 are refused with one line."""
    from diffusion.vdm import AncestralSampler
    from evaluations.vdm_nll import load_vdm
    for given, flag in ((ddim, "--ddim"), (guidance_scale, "--guidance-scale"), (classifier, "--classifier"),
                        (compile, "--compile"), (precision != "fp32", "--precision bf16")):
        if given:
            raise UsageError(f"--model {model} is a Variational Diffusion Model: it samples with ancestral steps "
                             f"(--respace N) only; drop {flag}")
    if respace is not None and not (respace.isdigit() and int(respace) >= 1):
        raise UsageError(f"--respace {respace}: a VDM takes a number of equal steps of t, e.g. --respace 256")
    net, meta = load_vdm(model, device)
    return net, AncestralSampler(int(respace) if respace else 1000), meta


def _low_res(low_res: str | np.ndarray | None, meta: dict[str, Any], model: str, n: int, compile: bool | str
             ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A super-resolution model's inputs: (uint8 [n, h, w, C] from an array or a sample batch .npz's arr_0, the
    batch's arr_1 labels [n] or None); (None, None) for other models. UsageError for a missing or unfit batch."""
    m = meta["model"]
    if not m.get("super_res"):
        if low_res is not None:
            raise UsageError(f"--low-res is for super-resolution models; --model {model} is not one")
        return None, None
    if low_res is None:
        raise UsageError(f"--model {model} is a super-resolution model: give its low-resolution inputs, "
                         f"--low-res LOW.npz (arr_0 uint8 [N, h, w, {m.get('in_channels', 3)}], e.g. samples of a "
                         f"base model)")
    if compile:
        raise UsageError("--compile is not supported for super-resolution models yet; drop it")
    name, ys = f"--low-res {low_res}" if isinstance(low_res, str) else "low_res", None
    if isinstance(low_res, str):
        arrays = load_npz(low_res)
        x, ys = arrays.get("arr_0"), arrays.get("arr_1")
    else:
        x = np.asarray(low_res)
    c, size = m.get("in_channels", 3), m["image_size"]
    if x is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != c or not 1 <= x.shape[1] <= size \
            or not 1 <= x.shape[2] <= size:
        raise UsageError(f"{name}: expected arr_0 uint8 [N, h, w, {c}] with h, w <= {size}, got "
                         f"{None if x is None else (x.dtype, x.shape)}")
    if len(x) < n:
        raise UsageError(f"{name}: holds {len(x)} images but --num-samples is {n}")
    ok = ys is not None and ys.ndim == 1 and len(ys) >= n and np.issubdtype(ys.dtype, np.integer)
    return np.ascontiguousarray(x[:n]), (ys[:n].astype(np.int64) if ok else None)


class _DropLabels:
    """An unconditional model called with the classifier's labels y: they are dropped before the model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        return self.model(x, t, **kw)


def _classifier_guidance(path: str, scale: float, model: torch.nn.Module, meta: dict[str, Any],
                         device: torch.device) -> tuple[Any, int]:
    """Load and check the classifier at `path` against the diffusion model -> (cond_fn or None at scale 0, the
    number of classes). It runs on the model's device in the model's parameter dtype."""
    from diffusion.guidance import classifier_cond_fn
    from evaluations.io import load_classifier
    clf, cmeta = load_classifier(path, device)
    c, m = cmeta["model"], meta["model"]
    for key, default in (("image_size", None), ("in_channels", 3)):
        if c.get(key, default) != m.get(key, default):
            raise UsageError(f"--classifier {path}: {key} {c.get(key, default)} but the model's is "
                             f"{m.get(key, default)}; use a classifier trained for this model's images")
    if m.get("num_classes") is not None and c["num_classes"] != m["num_classes"]:
        raise UsageError(f"--classifier {path}: {c['num_classes']} classes but the model has {m['num_classes']}")
    cd, md = cmeta.get("diffusion") or {}, meta.get("diffusion") or {}
    for key in ("steps", "noise_schedule"):
        if key in cd and key in md and cd[key] != md[key]:
            raise UsageError(f"--classifier {path} was trained for diffusion {key} {cd[key]}, the model uses "
                             f"{md[key]}; its timesteps would not match")
    clf.to(next(model.parameters()).dtype)
    return (classifier_cond_fn(clf, scale) if scale > 0 else None), int(c["num_classes"])


def _part(parts: str, b: int) -> str:
    return os.path.join(parts, f"batch-{b:07d}.npz")


def _read_part(path: str, n: int) -> dict[str, np.ndarray] | None:
    try:
        arr = load_npz(path)
    except UsageError:
        return None
    return arr if "arr_0" in arr and arr["arr_0"].shape[0] == n and arr["arr_0"].dtype == np.uint8 else None


def _finished(out: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The report (OUT.json) of a finished output OUT made with `settings`, else None."""
    jpath = os.path.splitext(out)[0] + ".json"
    if not (os.path.isfile(out) and os.path.isfile(jpath)):
        return None
    with open(jpath) as f:
        done = json.load(f)
    return done if done.get("settings") == settings else None


def _claim_parts(parts: str, settings: dict[str, Any], ranks: dist.Ranks, force: bool = False) -> RunLock | None:
    """Rank 0 takes `parts`.lock (one sampler per parts folder: data.runlock; `force`: whoever holds it), creates
    `parts`/settings.json or checks the one there; every rank must see it (shared disk). Returns rank 0's lock
    (release it when done)."""
    problem, lock = None, None
    if ranks.is_main:
        try:
            lock = RunLock(parts.rstrip("/") + ".lock", what=f"the sampling parts folder {parts}",
                           force=force).acquire()
        except LockHeld as e:
            problem = str(e)
    if ranks.is_main and problem is None:
        for note in lock.notes:
            print(f"{PROG}: {note}", file=sys.stderr, flush=True)
        os.makedirs(parts, exist_ok=True)
        cfg = os.path.join(parts, "settings.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                old = json.load(f)
            if old != settings:
                diff = sorted(k for k in settings if old.get(k) != settings[k])
                problem = (f"{parts} holds batches made with other settings ({', '.join(diff)}); "
                           f"delete it or use another --out")
        else:
            atomic_write_json(cfg, settings)
    # Every rank learns whether rank 0 found a problem, so none is left waiting at a barrier.
    if dist.all_reduce_sum(torch.tensor([problem is not None], dtype=torch.int64)).item():
        if lock:
            lock.release()
        raise UsageError(problem or "rank 0 refused the existing parts folder (see its message)")
    hidden = not os.path.isfile(os.path.join(parts, "settings.json"))
    if dist.all_reduce_sum(torch.tensor([hidden], dtype=torch.int64)).item():
        if lock:
            lock.release()
        raise UsageError(f"{parts} is not visible from every rank; --out must be on a shared file system")
    return lock


def _sample_share(job: _Job, todo: list[int], *, n: int, bs: int, seed: int, ddim: bool, eta: float, clip: bool,
                  device: torch.device, parts: str | None, bar: str | None
                  ) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Sample the global batches `todo`: each is saved to `parts` when given, else kept (returned by index).
    `bar`: the description of a tqdm progress bar (None: no bar)."""
    it = todo
    if bar is not None:
        from tqdm import tqdm
        it = tqdm(todo, desc=bar, unit="batch")
    kept = {}
    for b in it:
        m = min(bs, n - b * bs)
        imgs, ys = sample_batch(job.diffusion, job.net, (m, *job.shape), derive_seed(seed, b),
                                num_classes=job.num_classes, ddim=ddim, eta=eta, clip=clip, device=device,
                                cond_fn=job.cond_fn, conditional_model=job.conditional_model,
                                labels=None if job.labels is None else job.labels[b * bs:b * bs + m],
                                low_res=None if job.low_res is None else job.low_res[b * bs:b * bs + m])
        if parts is None:
            kept[b] = (imgs, ys)
        else:
            atomic_save_npz(_part(parts, b), arr_0=imgs, **({"arr_1": ys} if ys is not None else {}))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return kept


def _from_parts(parts: str, n: int, bs: int) -> tuple[np.ndarray, np.ndarray | None]:
    """All batches read back from `parts` in order -> (images [N, H, W, 3], labels [N] or None)."""
    xs, ys = [], []
    for b in range((n + bs - 1) // bs):
        part = _read_part(_part(parts, b), min(bs, n - b * bs))
        if part is None:
            raise UsageError(f"batch {b} is missing from {parts} after all ranks finished (shared file system?)")
        xs.append(part["arr_0"])
        if "arr_1" in part:
            ys.append(part["arr_1"])
    return np.concatenate(xs), (np.concatenate(ys) if ys else None)


def _gathered(kept: dict[int, tuple[np.ndarray, np.ndarray | None]], job: _Job, n: int, bs: int, world: int
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Every rank's in-memory batches, all-gathered in rank order and put back in batch order."""
    c, h, w = job.shape
    mine = sorted(kept)
    x = np.concatenate([kept[b][0] for b in mine]) if mine else np.zeros((0, h, w, c), np.uint8)
    x = gather_rows(torch.from_numpy(x)).numpy()
    n_batches = (n + bs - 1) // bs
    # Rank r holds batches r, r + world, ...: the image index of every gathered row, in gathered order.
    where = np.concatenate([np.arange(b * bs, min(n, b * bs + bs))
                            for r in range(world) for b in range(r, n_batches, world)])
    images = np.empty_like(x)
    images[where] = x
    if job.num_classes is None:
        return images, None
    y = np.concatenate([kept[b][1] for b in mine]) if mine else np.zeros(0, np.int64)
    labels = np.empty(n, np.int64)
    labels[where] = gather_rows(torch.from_numpy(y)).numpy()
    return images, labels


def sample(model: str, num_samples: int, *, batch_size: int = 16, respace: str | None = None,
           ddim: int | None = None, eta: float = 0.0, guidance_scale: float | None = None,
           labels: str | np.ndarray | None = None, class_label: int | None = None, seed: int = 0,
           clip: bool = True, device: str | None = None, threads: int | None = None, progress: bool = True,
           parts_dir: str | None = None, reuse: str | None = None, classifier: str | None = None,
           classifier_scale: float = 1.0, compile: bool | str = False, precision: str = "fp32",
           force_unlock: bool = False, low_res: str | np.ndarray | None = None) -> Samples | None:
    """Draw `num_samples` images from exported weights `model` on every rank of the launch; rank 0 gets them.

    respace: respaced DDPM ("250", "10,15,20"); ddim: DDIM with this many steps and `eta`; guidance_scale: w of
    classifier-free guidance (None or 0 = off; required, and the model's input w, for a guidance_embed model);
    labels: N integer labels (array or .npy/.npz path) or class_label: one
    class for all (default: uniform random); seed: batch b uses derive_seed(seed, b); clip: clip predicted x_0
    to [-1, 1]; device: default this rank's GPU, else CPU; threads: torch CPU threads.
    classifier: exported noise-aware classifier (`--objective classifier`) guiding with `classifier_scale` s
    (Dhariwal & Nichol 2021): DDPM shifts the mean by s Sigma grad log p(y|x_t), DDIM the score; with an
    unconditional model the labels (uniform, or given) only steer the classifier and are returned.
    parts_dir: each finished batch is saved there (atomically) and batches of an interrupted call with the same
    settings are reused; it must be shared by all ranks. None: batches stay in memory and are all-gathered.
    reuse: a finished output .npz (with its .json report beside it) of an earlier call; when its settings equal
    this call's, its arrays are returned without sampling (`Samples.reused`).
    compile: torch.compile the model (True or a mode of trainer.compile.MODES), warmed up on every batch shape
    before the timer starts; precision: "fp32" or "bf16" (autocast, where the device supports it); CUDA runs
    channels_last (trainer.compile.InferenceNet).
    low_res: a super-resolution model's inputs (required for one, refused for others): uint8 [>= N, h, w, C], an
    array or a .npz whose arr_0 holds them (e.g. a base model's samples; its arr_1 labels are used when neither
    `labels` nor `class_label` is given); image i upsamples low_res[i].
    With several ranks a gloo process group is opened and left open (`evaluations.dist.shutdown` closes it).
    Returns `Samples` on rank 0 and None on the other ranks.
    """
    check_options(num_samples, batch_size, respace, ddim, eta, guidance_scale, labels, class_label, classifier,
                  classifier_scale)
    ranks, dev = dist.init(device, threads)
    job = _prepare(model, dev, num_samples=num_samples, batch_size=batch_size, respace=respace, ddim=ddim,
                   eta=eta, guidance_scale=guidance_scale, labels=labels, class_label=class_label, seed=seed,
                   clip=clip, classifier=classifier, classifier_scale=classifier_scale, compile=compile,
                   precision=precision, low_res=low_res)
    if reuse is not None and (done := _finished(reuse, job.settings)) is not None:
        if not ranks.is_main:
            return None
        arrays = load_npz(reuse)
        return Samples(arrays["arr_0"], arrays.get("arr_1"),
                       {**done, "sampled_this_run": 0, "images_per_second": None}, reused=True)
    lock = _claim_parts(parts_dir, job.settings, ranks, force_unlock) if parts_dir is not None else None
    n, bs = num_samples, batch_size
    mine = list(range(ranks.rank, (n + bs - 1) // bs, ranks.world))
    todo = [b for b in mine if parts_dir is None or _read_part(_part(parts_dir, b), min(bs, n - b * bs)) is None]
    warm = 0.0
    if compile and todo:  # compilation (one graph per batch shape) is kept out of the timed region
        from trainer.compile import warm_up
        warm = warm_up(job.net, {min(bs, n - b * bs) for b in todo}, job.shape, dev, job.num_classes)
    t0 = time.time()
    kept = _sample_share(job, todo, n=n, bs=bs, seed=seed, ddim=bool(ddim), eta=eta, clip=clip, device=dev,
                         parts=parts_dir,
                         bar=f"sampling ({ranks.world} rank{'s' if ranks.world > 1 else ''})"
                         if ranks.is_main and progress else None)
    made = sum(min(bs, n - b * bs) for b in todo)
    stats = gather_rows(torch.tensor([[made, len(mine) - len(todo), time.time() - t0]], dtype=torch.float64))
    if parts_dir is None:
        images, ys = _gathered(kept, job, n, bs, ranks.world)
    else:
        dist.barrier()
        images, ys = _from_parts(parts_dir, n, bs) if ranks.is_main else (None, None)
        if lock:
            lock.release()
    if not ranks.is_main:
        return None
    made_total, resumed, wall = int(stats[:, 0].sum()), int(stats[:, 1].sum()), float(stats[:, 2].max())
    report = {"settings": job.settings, "shape": list(images.shape), "ranks": ranks.world, "device": str(dev),
              "sampled_this_run": made_total, "resumed_batches": resumed, "seconds": round(wall, 3),
              "images_per_second": round(made_total / wall, 3) if wall > 0 and made_total else None,
              "model_steps_per_image": job.diffusion.num_timesteps * job.forwards_per_step,
              "compile": compile if compile is not True else "default", "precision": precision,
              "warmup_seconds": round(warm, 3)}
    return Samples(images, ys, report)


# ------------------------------------------------------------------------------------------------ CLI

def save(out: str, samples: Samples) -> None:
    """OUT (arr_0 images, arr_1 labels when conditional) and OUT.json (report), atomically; OUT.parts/ removed."""
    atomic_save_npz(out, arr_0=samples.images, **({"arr_1": samples.labels} if samples.labels is not None else {}))
    atomic_write_json(os.path.splitext(out)[0] + ".json", {**samples.report, "out": os.path.abspath(out)})
    shutil.rmtree(out + ".parts", ignore_errors=True)


def build_parser() -> ArgumentParser:
    p = inference_parser(PROG, __doc__)
    p.add_argument("--num-samples", type=int, required=True, help="total number of images N")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (global batches are split over ranks)")
    p.add_argument("--out", required=True, help="output .npz file (arr_0 uint8 [N,H,W,3], arr_1 labels)")
    p.add_argument("--respace", default=None, help="respaced DDPM, e.g. 250, 100, 50 or '10,15,20' (default: full T)")
    p.add_argument("--ddim", type=int, default=None, help="DDIM with this many steps (respacing 'ddimN')")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale w (default off; two forwards per step); a guidance-distilled "
                        "model (guidance_embed) requires it and takes w as an input (one forward per step)")
    p.add_argument("--labels", default=None, help=".npy/.npz of N integer labels (default: uniform random)")
    p.add_argument("--class-label", type=int, default=None, help="sample only this class")
    p.add_argument("--classifier", default=None, help="noise-aware classifier (exported from a --objective "
                   "classifier run) for classifier guidance; works with unconditional models too")
    p.add_argument("--classifier-scale", type=float, default=None,
                   help="classifier guidance scale s (default 1 with --classifier; 0 = unguided)")
    p.add_argument("--seed", type=int, default=0, help="base seed; batch b uses a seed derived from (seed, b)")
    p.add_argument("--low-res", default=None, metavar="LOW.npz",
                   help="super-resolution models: their low-resolution inputs, arr_0 uint8 [N, h, w, 3] (e.g. the "
                        "samples of a 64 px model; their arr_1 labels are used unless --labels/--class-label)")
    p.add_argument("--force-unlock", action="store_true",
                   help="take OUT.parts.lock even if another sampler seems to hold it (its process is dead on another "
                        "host); a holder that is gone on this host or silent for long is taken over without it")
    add_speed_flags(p)
    return p


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    if not a.out.endswith(".npz"):
        raise UsageError(f"--out {a.out}: the file name must end in .npz")
    if a.classifier_scale is not None and a.classifier is None:
        raise UsageError("--classifier-scale needs --classifier (a classifier to guide with)")
    parts = a.out + ".parts"
    try:
        s = sample(a.model, a.num_samples, batch_size=a.batch_size, respace=a.respace, ddim=a.ddim, eta=a.eta,
                   guidance_scale=a.guidance_scale, labels=a.labels, class_label=a.class_label, seed=a.seed,
                   clip=a.clip, device=a.device, threads=a.threads, progress=a.progress, parts_dir=parts,
                   reuse=None if os.path.isdir(parts) else a.out, classifier=a.classifier,
                   classifier_scale=1.0 if a.classifier_scale is None else a.classifier_scale, compile=a.compile,
                   precision=a.precision, force_unlock=a.force_unlock, low_res=a.low_res)
    finally:
        dist.shutdown()
    if s is None:
        return 0
    if not s.reused:
        save(a.out, s)
    r = {**s.report, "out": os.path.abspath(a.out)}
    ips = r["images_per_second"]
    print(f"wrote {r['out']} {tuple(r['shape'])}: {r['sampled_this_run']} images sampled on {r['ranks']} rank(s) "
          f"in {r['seconds']:.1f} s" + (f" ({ips:.2f} images/s)" if ips else "")
          + (f", {r['resumed_batches']} batches resumed" if r["resumed_batches"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    exit_without_teardown(main)  # several ranks: no interpreter teardown after the work is saved (data.cli)
