"""The CUDA path against a float64 CPU reference: the hybrid training losses with their gradients, and a DDIM
trajectory, of the small all-block UNet (random weights). Each helper also runs on CPU in float32 in the normal
suite, so the comparison code itself is exercised everywhere; the `gpu` tests (run by benchmarks/gpu_check.sh)
compare CUDA float32 with TF32 off to the same float64 reference."""
from __future__ import annotations

import pytest
import torch

from test_compile import small_model

T = 100


def losses_and_grads(device: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Hybrid-loss terms [B] and the flat gradient of the mean loss, on `device` in `dtype`, returned on the CPU
    as float64. Batch, timesteps (0, last, two between) and noise are fixed on the CPU."""
    from diffusion import create_diffusion
    diffusion = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, loss="hybrid")
    m = small_model().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1).to(device, dtype)
    noise = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(device, dtype)
    t = torch.tensor([0, 7, 50, T - 1], device=device)
    y = torch.tensor([0, 1, 2, 0], device=device)
    out = diffusion.training_losses(m, x0, t, model_kwargs={"y": y}, noise=noise)
    out["loss"].mean().backward()
    grad = torch.cat([p.grad.flatten() for p in m.parameters()])
    return {k: v.detach().double().cpu() for k, v in out.items()}, grad.double().cpu()


def ddim_trajectory(device: str, dtype: torch.dtype, steps: int = 10) -> torch.Tensor:
    """x_0 [4, 3, 8, 8] of deterministic DDIM (`steps` respaced steps, no clipping: every value counts) from fixed x_T, float64 CPU."""
    from diffusion import create_diffusion
    diffusion = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True, timestep_respacing=f"ddim{steps}")
    m = small_model().eval().to(device=device, dtype=dtype)
    xT = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    y = torch.tensor([0, 1, 2, 0], device=device)
    return diffusion.ddim_sample_loop(m, (4, 3, 8, 8), noise=xT, model_kwargs={"y": y},
                                     clip_denoised=False).double().cpu()


def check_losses(device: str) -> None:
    ref, ref_grad = losses_and_grads("cpu", torch.float64)
    got, grad = losses_and_grads(device, torch.float32)
    assert ref["loss"].abs().min() > 1e-3  # a real signal at every timestep
    for k in ("loss", "mse", "vb"):
        torch.testing.assert_close(got[k], ref[k], rtol=2e-4, atol=1e-6)
    assert (grad - ref_grad).norm() <= 2e-4 * ref_grad.norm()


def check_ddim(device: str) -> None:
    ref = ddim_trajectory("cpu", torch.float64)
    got = ddim_trajectory(device, torch.float32)
    assert ref.std() > 1  # unclipped x_0 of random weights: values of order 10
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


def test_cpu_float32_losses_and_gradients_match_float64() -> None:
    check_losses("cpu")


def test_cpu_float32_ddim_matches_float64() -> None:
    check_ddim("cpu")


@pytest.fixture
def cuda_fp32():
    """CUDA with TF32 off (so float32 means float32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield "cuda"
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
def test_cuda_losses_and_gradients_match_float64_cpu(cuda_fp32) -> None:
    check_losses(cuda_fp32)


@pytest.mark.gpu
def test_cuda_ddim_matches_float64_cpu(cuda_fp32) -> None:
    check_ddim(cuda_fp32)
