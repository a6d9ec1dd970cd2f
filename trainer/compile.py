"""torch.compile for training and inference, in one place: the trainer's `--compile` and the evaluations'
`compile=` / `--compile` (with channels_last and bf16 where the device supports them).

Training: `compile_engine` compiles the DeepSpeed engine's module IN PLACE (DeepSpeedEngine.compile, which calls
nn.Module.compile): parameter names, state dicts, checkpoints, the EMA's views of the fp32 masters and the export are
unchanged, and a run may resume with or without --compile. Shapes are static (`dynamic=False`): a training step
always sees the same micro-batch shape, so the first step compiles once and nothing recompiles after it.
ZeRO stages: 0, 1 and 2 compile the whole UNet into one graph; ZeRO-3 is refused (`ZERO3_REASON`).

Inference: `InferenceNet` wraps an eval-mode model as the callable the samplers take, (x [B, C, H, W] fp32,
t [B] int64, **kw) -> fp32 [B, C_out, H, W]; `warm_up` runs it once per batch shape so that compilation (and any
recompilation for a second shape, e.g. a ragged last batch) happens before the caller's timer starts.

Compiled kernels are cached on disk by inductor (FX graph and AOTAutograd caches, on by default; folder
TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER): the same model compiles in seconds the second time.
IDDPM_COMPILE_BACKEND (default inductor) picks another torch.compile backend, e.g. aot_eager to tell a dynamo or
autograd-tracing problem from an inductor one (the tests use it for the cheap trainer checks).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import torch

from data.cli import UsageError
from diffusion.unet import set_inference_caches

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("fp32", "bf16")
# Why ZeRO-3 is not compiled: DeepSpeed gathers each submodule's partitioned parameters in module pre-forward hooks
# (and frees them in post hooks) that dynamo cannot trace, so the graph breaks at every submodule; DeepSpeed's own
# answer, DeepCompile, is GPU-only. Measured (2 CPU ranks, the tests' small UNet, benchmarks/results/compile.md): it
# trains with the same losses, but as 38 graphs with 74 graph breaks, and a step is several times slower than eager.
ZERO3_REASON = ("--compile does not support --zero-stage 3 (DeepSpeed's ZeRO-3 parameter gathering runs in module "
                "hooks that break the compiled graph at every layer); use --zero-stage 0, 1 or 2, or --no-compile")


def backend() -> str:
    """The torch.compile backend: $IDDPM_COMPILE_BACKEND or inductor."""
    return os.environ.get("IDDPM_COMPILE_BACKEND") or "inductor"


def compile_options(mode: str = "default") -> dict[str, Any]:
    """Keyword arguments of torch.compile / nn.Module.compile for `mode` (one of MODES); static shapes.
    Modes other than "default" are inductor's and are dropped for another backend."""
    if mode not in MODES:
        raise UsageError(f"compile mode {mode!r}: choose one of {', '.join(MODES)}")
    return {"mode": None if mode == "default" or backend() != "inductor" else mode, "dynamic": False}


def compile_engine(engine: Any, zero_stage: int, mode: str = "default") -> None:
    """Compile a DeepSpeed engine's module in place (`backend()`). ZeRO-3 raises UsageError (see ZERO3_REASON)."""
    if zero_stage == 3:
        raise UsageError(ZERO3_REASON)
    engine.compile(backend=backend(), compile_kwargs=compile_options(mode))


def bf16_supported(device: torch.device) -> bool:
    """bf16 matmuls/convolutions in hardware: CUDA with bf16 support, or a CPU with AVX-512 BF16 and oneDNN."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported()
    return False


class InferenceNet:
    """An eval-mode model as the samplers' callable: channels_last input, bf16 autocast, torch.compile, each when
    asked; returns fp32 whatever runs inside.

    precision: "fp32" (results equal the eager model within fp32 rounding) or "bf16" (autocast; group norms stay
    fp32 in the UNet). channels_last: None = on for CUDA, off on CPU (oneDNN's blocked formats gain nothing there
    for these sizes). compile: False, True ("default" mode) or a mode of MODES. The model's weight-only caches are
    turned on (diffusion.unet.set_inference_caches: eager Upsample kernels computed once, same results bit for
    bit), so its weights must not be changed behind the version counter while this wrapper is in use.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, compile: bool | str = False,
                 precision: str = "fp32", channels_last: bool | None = None) -> None:
        if precision not in PRECISIONS:
            raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and not bf16_supported(device):
            raise UsageError(f"--precision bf16: device {device} has no bf16 support (needs a bf16 GPU or a CPU "
                             f"with AVX-512 BF16); use --precision fp32")
        self.device, self.precision = device, precision
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        set_inference_caches(self.model)  # weight-only work done once in eager mode (same results bit for bit)
        self.mode = None if compile is False else ("default" if compile is True else compile)
        self.fn: Callable[..., torch.Tensor] = self.model
        if self.mode is not None:
            self.fn = torch.compile(self.model, backend=backend(), **compile_options(self.mode))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.fn(x, t, **kw).float()

    def describe(self) -> dict[str, Any]:
        """The settings for a report: compile mode (None = eager), precision, channels_last."""
        return {"compile": self.mode, "precision": self.precision, "channels_last": self.channels_last}


def warm_up(net: Callable[..., torch.Tensor], batch_sizes: Iterable[int], shape: tuple[int, int, int],
            device: torch.device, num_classes: int | None = None) -> float:
    """Call `net` once per distinct batch size on zeros of `shape` (C, H, W) (labels 0 when `num_classes`);
    returns the seconds taken (compilation, when `net` compiles). Nothing of the caller's RNG is used."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in sorted(set(batch_sizes)):
            x = torch.zeros(b, *shape, device=device)
            t = torch.zeros(b, dtype=torch.int64, device=device)
            net(x, t, **({"y": torch.zeros(b, dtype=torch.int64, device=device)} if num_classes is not None else {}))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def add_speed_flags(p: Any) -> None:
    """--compile/--no-compile and --precision for an inference CLI (evaluations.sample, evaluations.nll)."""
    from data.cli import flag
    g = p.add_argument_group("speed")
    flag(g, "--compile", False, "torch.compile the model (inductor; compiled before the timer starts, cached on "
                                "disk under TORCHINDUCTOR_CACHE_DIR)")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32, or bf16 autocast where the device supports it (CUDA, AVX-512 BF16 CPUs)")
