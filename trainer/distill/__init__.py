"""The progressive-distillation objective (Salimans & Ho 2022): a student of N/2 steps learns, in one DDIM step,
what its N-step teacher does in two (eta 0, clipped x_0). Every round is an ordinary training run of the trainer.

    python -m trainer.main --objective distill --teacher T.safetensors --teacher-steps 256 --data D --run-dir R ...
    python -m trainer.distill ...   (the rounds N -> N/2 -> ... -> K, see trainer/distill/__main__.py)

The student starts from the teacher's weights (same network; a learned-sigma teacher keeps its 2C outputs, whose
variance half DDIM with eta 0 never reads) and predicts v (default) whatever the teacher predicts: for an epsilon
teacher the x_0 implied by its output at high noise is (x_t - sqrt(1-abar) eps)/sqrt(abar), unbounded as abar -> 0,
so the paper's student is v-parameterized. Starting a v-student from epsilon weights is a change of meaning of the
output; `--substeps 1` trains that conversion as a round of its own (target: ONE teacher DDIM step, N -> N steps),
which the rounds driver runs first for a teacher that is not v already. Loss: max(SNR_t, 1) |x~ - x_0_hat|^2
(truncated SNR, mean over pixels), t uniform over the student's steps.

Guidance (Meng et al. 2023, stage one), class-conditional teachers only; either way the student needs ONE forward
per step. `--teacher-guidance W`: the target is built from the teacher under classifier-free guidance at the fixed
scale W, and the student is sampled without guidance. `--teacher-guidance-range WMIN,WMAX`: every example draws its
own w uniform in [WMIN, WMAX]; the target is built from the teacher guided at that w and the student, a UNet with
guidance_embed (an embedding of w added to the timestep embedding, zero-initialised, so it starts as the teacher),
is called with the same w. A teacher that is such a student already (later rounds) is called with w, unguided.
The student is sampled at any scale in the range: `evaluations.sample --guidance-scale W` (required for it).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from data.cli import UsageError
from diffusion import ClassifierFreeGuidance, create_diffusion
from diffusion.distill import is_power_of_two, teacher_ddim_target
from diffusion.gaussian_diffusion import MEAN_TYPES, GaussianDiffusion
from diffusion.losses import mean_flat
from diffusion.presets import create_model_from_config
from trainer.configlib import option
from trainer.networks import DEFAULT, Network, frozen
from trainer.objective import Batch, Net, Objective, register_objective


@dataclass
class DistillOptions:
    teacher: str = option("", "exported teacher weights (model.safetensors with model.json beside it; required)",
                          frozen=True, metavar="FILE")
    teacher_steps: int = option(0, "DDIM steps N of the teacher (a power of two; the student takes N / substeps)",
                                lower=1, frozen=True)
    substeps: int = option(2, "teacher DDIM steps per student step (1 = convert the parameterization at N steps)",
                           choices=lambda: (1, 2), frozen=True)
    student_mean_type: str = option("v", "what the student predicts", choices=lambda: MEAN_TYPES, frozen=True)
    teacher_guidance: float = option(0.0, "classifier-free guidance scale w of a class-conditional teacher "
                                     "(distilled into the student; 0 = off)", lower=0.0, frozen=True)
    teacher_guidance_range: str = option("", "WMIN,WMAX: distill classifier-free guidance at a scale drawn per "
                                         "example, uniform in [WMIN, WMAX]; the student takes w as an input "
                                         "(guidance_embed). Needs a class-conditional teacher; excludes "
                                         "--teacher-guidance", frozen=True, metavar="WMIN,WMAX")
    teacher_clip: bool = option(True, "clip the teacher's x_0 predictions to [-1, 1]", frozen=True)


def load_teacher(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any], dict]:
    """Exported teacher -> (model in eval mode, its create_diffusion kwargs, meta); UsageError naming --teacher."""
    from trainer.export import load_exported
    if not path:
        raise UsageError("objective.distill.teacher (--teacher) is required: exported weights model.safetensors")
    if not os.path.isfile(path):
        raise UsageError(f"--teacher {path}: no such file (export one with python -m trainer.export RUN_DIR)")
    try:
        model, dkw, meta = load_exported(path, device=device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--teacher {path}: cannot load exported model ({e})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dkw, meta


def parse_guidance_range(text: str | None) -> tuple[float, float] | None:
    """"WMIN,WMAX" -> (WMIN, WMAX) with 0 <= WMIN < WMAX, both finite; "" or None -> None; UsageError otherwise."""
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--teacher-guidance-range {text!r}: give two scales WMIN,WMAX, e.g. 0,4") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise UsageError(f"--teacher-guidance-range {text}: need 0 <= WMIN < WMAX (finite)")
    return lo, hi


def check_plan(dkw: dict[str, Any], model_cfg: dict[str, Any], teacher_steps: int, substeps: int,
               guidance: float, image_size: int | None, what: str = "--teacher",
               guidance_range: tuple[float, float] | None = None, teacher_meta: dict | None = None) -> None:
    """Refuse, with one line, a teacher / step count / guidance / data combination that cannot be distilled.
    teacher_meta: the teacher's model.json (its "distill" entry tells the range a guidance-distilled one learned)."""
    T, own = int(dkw["steps"]), int(dkw.get("distilled_steps") or 0)
    if not is_power_of_two(teacher_steps) or teacher_steps < 2 or teacher_steps > T:
        raise UsageError(f"--teacher-steps {teacher_steps}: must be a power of two in [2, {T}] (halved each round)")
    if own and own != teacher_steps:
        raise UsageError(f"{what} is a {own}-step student: use --teacher-steps {own}")
    if teacher_steps // substeps < 1:
        raise UsageError(f"--teacher-steps {teacher_steps} with --substeps {substeps} leaves no student step")
    if guidance > 0 and not model_cfg.get("num_classes"):
        raise UsageError(f"--teacher-guidance {guidance}: the teacher is unconditional (no classes to guide)")
    if guidance > 0 and own:
        raise UsageError(f"--teacher-guidance {guidance}: {what} is a distilled student, which already carries the "
                         f"guidance of its first round; use 0")
    embed = bool(model_cfg.get("guidance_embed"))
    learned = ((teacher_meta or {}).get("distill") or {}).get("teacher_guidance_range")
    if guidance_range is not None:
        flag = f"--teacher-guidance-range {guidance_range[0]:g},{guidance_range[1]:g}"
        if guidance > 0:
            raise UsageError(f"{flag} and --teacher-guidance {guidance} exclude each other: a fixed or a sampled scale")
        if not model_cfg.get("num_classes"):
            raise UsageError(f"{flag}: the teacher is unconditional (no classes to guide)")
        if own and not embed:
            raise UsageError(f"{flag}: {what} is a distilled student without a guidance input; a sampled scale is "
                             f"distilled in the first round only")
        if learned and not learned[0] <= guidance_range[0] < guidance_range[1] <= learned[1]:
            raise UsageError(f"{flag}: {what} learned guidance scales in [{learned[0]:g}, {learned[1]:g}] only")
    elif embed:
        raise UsageError(f"{what} is a guidance-distilled student (it takes a guidance scale w): pass "
                         f"--teacher-guidance-range" + (f" (it learned {learned[0]:g},{learned[1]:g})"
                                                        if learned else ""))
    size = model_cfg.get("image_size")
    if image_size is not None and size is not None and int(size) != int(image_size):
        raise UsageError(f"{what} was trained on {size} px images but the data are {image_size} px; use data of "
                         f"the teacher's size")


def data_image_size(source: str) -> int | None:
    """The image side of a training source when its manifest tells it (None otherwise)."""
    from data.sources import resolve
    try:
        shape = resolve(source).shape
    except UsageError:
        return None  # the trainer reports a bad source itself
    return int(shape[0]) if shape else None


def student_kwargs(teacher_dkw: dict[str, Any], student_steps: int, mean_type: str) -> dict[str, Any]:
    """create_diffusion kwargs of the student: the teacher's process, its own K-step grid, its parameterization."""
    kw = {k: v for k, v in teacher_dkw.items() if k not in ("timestep_respacing", "predict_xstart")}
    return {**kw, "model_mean_type": mean_type, "distilled_steps": int(student_steps)}


@register_objective("distill")
class Distill(Objective):
    """Student index j uniform in [0, K); x_t = q_sample(x_0) at the student's timestep (the teacher's index
    r j + r - 1, r = substeps); target from the teacher's r DDIM steps; loss = max(SNR, 1) |target - x_0_hat|^2."""

    Options = DistillOptions
    console = ("xmse",)
    kind = "ddpm"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        o = self.options
        self.teacher, dkw, meta = load_teacher(o.teacher)
        self.model_cfg = dict(meta["model"])
        self.guidance_range = parse_guidance_range(o.teacher_guidance_range)
        check_plan(dkw, self.model_cfg, o.teacher_steps, o.substeps, o.teacher_guidance,
                   cfg.data.image_size or (data_image_size(cfg.data.source) if cfg.data.source else None),
                   guidance_range=self.guidance_range, teacher_meta=meta)
        self.teacher_embed = bool(self.model_cfg.get("guidance_embed"))  # the teacher takes w itself
        if self.guidance_range is not None:
            self.model_cfg["guidance_embed"] = True  # the student's config (exported as such)
        self.num_classes = int(self.model_cfg.get("num_classes") or 0)
        self.teacher_diffusion: GaussianDiffusion = create_diffusion(**{**dkw, "timestep_respacing": "",
                                                                        "distilled_steps": o.teacher_steps})
        self.student_steps = o.teacher_steps // o.substeps
        self.diffusion_kw = student_kwargs(dkw, self.student_steps, o.student_mean_type)
        self.diffusion = create_diffusion(**self.diffusion_kw)
        self.teacher_path = os.path.abspath(o.teacher)

    def networks(self) -> dict[str, Network]:
        """The student (trained, from the teacher's weights) and the teacher (frozen: its file's sha256 is recorded,
        a resume with another teacher file is refused)."""
        return {DEFAULT: Network(self.build_model()), "teacher": frozen(self.teacher, self.teacher_path)}

    def build_model(self) -> torch.nn.Module:
        """The teacher's network with the teacher's weights (the student's starting point); with a sampled guidance
        scale plus a zero-initialised w embedding (a teacher without one: `load_unguided`)."""
        model = create_model_from_config(self.model_cfg)
        if self.guidance_range is not None and not self.teacher_embed:
            model.load_unguided(self.teacher.state_dict())
        else:
            model.load_state_dict(self.teacher.state_dict())
        return model

    def export_config(self) -> dict[str, Any]:
        o = self.options
        return {"model": self.model_cfg, "diffusion": self.diffusion_kw,
                "distill": {"teacher": self.teacher_path, "teacher_steps": o.teacher_steps, "substeps": o.substeps,
                            "student_steps": self.student_steps, "teacher_guidance": o.teacher_guidance,
                            "teacher_guidance_range": list(self.guidance_range) if self.guidance_range else None}}

    def loss(self, net: Net, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        size = self.model_cfg.get("image_size")
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            raise UsageError(f"--teacher was trained on {size} px images but a batch holds {tuple(x.shape[-2:])} px")
        r, K = self.options.substeps, self.student_steps
        j = torch.randint(0, K, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        x_t = self.diffusion.q_sample(x, j, noise=noise)
        kw = {"y": y} if self.num_classes else {}
        teacher = self.nets.get("teacher", self.teacher)  # the loop's: on the run's device, in its precision
        teacher_fn, teacher_kw = teacher, kw
        if self.options.teacher_guidance > 0:
            teacher_fn = ClassifierFreeGuidance(teacher_fn, self.options.teacher_guidance, self.num_classes)
        if self.guidance_range is not None:  # w [B] ~ U[WMIN, WMAX]: the student's input, the teacher's scale
            lo, hi = self.guidance_range
            w = lo + (hi - lo) * torch.rand(x.shape[0], generator=generator, device=x.device)
            kw = {**kw, "w": w}
            if self.teacher_embed:
                teacher_kw = kw
            else:
                teacher_fn = ClassifierFreeGuidance(teacher, w, self.num_classes)
        target = teacher_ddim_target(teacher_fn, self.teacher_diffusion, x_t, r * j + r - 1, substeps=r,
                                     clip=self.options.teacher_clip, model_kwargs=teacher_kw)
        out = net(x_t, self.diffusion.map_timesteps(j), **kw)
        x0 = self.diffusion._predict_xstart(x_t.to(out.dtype), j, out[:, :x.shape[1]])
        xmse = mean_flat((target.to(x0.dtype) - x0) ** 2)
        loss = self.diffusion._extract("truncated_snr", j, x0).flatten() * xmse
        metrics = {"loss": loss.detach(), "xmse": xmse.detach()}
        quartile = (j * 4 // K).clamp(max=3)
        for q in range(4):  # by quarter of the student's steps (NaN: the sample is in another quarter)
            metrics[f"loss_q{q}"] = torch.where(quartile == q, loss.detach(), torch.full_like(loss.detach(), math.nan))
        return loss, metrics

    def preview(self, model: torch.nn.Module, device: torch.device, seed: int) -> tuple[torch.Tensor, int]:
        """The student's own K DDIM steps (eta 0) from fixed noise; labels cycle through the classes; a student of
        a sampled guidance scale at the middle of the range."""
        n = self.cfg.log.sample_grid or 64
        g = torch.Generator(device=device).manual_seed(seed)
        size, ch = self.model_cfg["image_size"], self.model_cfg.get("in_channels", 3)
        noise = torch.randn(n, ch, size, size, generator=g, device=device)
        kw = {"y": torch.arange(n, device=device) % self.num_classes} if self.num_classes else {}
        if self.guidance_range is not None:
            kw["w"] = torch.full((n,), sum(self.guidance_range) / 2, device=device)
        with torch.no_grad():
            x = self.diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=kw, device=device)
        return x, int(math.ceil(math.sqrt(n)))
