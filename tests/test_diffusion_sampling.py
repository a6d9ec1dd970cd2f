"""DDPM / DDIM sampling: determinism, inversion, reproducible noise, parity with diffusers' schedulers."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusion import create_diffusion

torch.set_num_threads(1)


def gaussian_optimal_eps(D, s2):
    """The exact E[eps | x_t] for data ~ N(0, s2 I): sqrt(1 - abar) x_t / (abar s2 + 1 - abar)."""
    ab = torch.tensor(D.alphas_cumprod if not hasattr(D, "original_num_steps") else
                      create_diffusion(steps=D.original_num_steps, learn_sigma=False).alphas_cumprod)

    def model(x, t, **kw):
        a = ab[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return torch.sqrt(1 - a) * x / (a * s2 + 1 - a)
    return model


def test_ddim_eta0_is_deterministic_and_generator_reproducible():
    D = create_diffusion(steps=40, learn_sigma=False)
    model = gaussian_optimal_eps(D, 0.25)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = D.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    b = D.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = D.ddim_sample_loop(model, noise.shape, noise=noise, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)
    for loop in (D.p_sample_loop, lambda *a, **k: D.ddim_sample_loop(*a, eta=0.5, **k)):
        x1 = loop(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(7))
        x2 = loop(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(7))
        x3 = loop(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(8))
        assert torch.equal(x1, x2) and not torch.allclose(x1, x3)


def test_named_loops_are_the_one_sampling_loop_and_keyword_only():
    D = create_diffusion(steps=12, timestep_respacing="6")
    model = lambda x, t, **kw: torch.cat([0.3 * x, torch.tanh(x)], 1)
    noise = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    for method, loop, progressive, kw in [("ddpm", D.p_sample_loop, D.p_sample_loop_progressive, {}),
                                          ("ddim", D.ddim_sample_loop, D.ddim_sample_loop_progressive, {"eta": 0.7})]:
        run = lambda f, **k: f(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(3), **kw, **k)
        steps = list(run(D.sample_loop_progressive, method=method))
        assert len(steps) == 6
        assert all(torch.equal(a["sample"], b["sample"]) for a, b in zip(steps, run(progressive), strict=True))
        assert torch.equal(run(loop), steps[-1]["sample"])
        with pytest.raises(TypeError):
            loop(model, noise.shape, noise)
    x, t = noise.double(), torch.tensor([5, 2])
    for step in (D.p_sample, D.ddim_sample, D.ddim_reverse_sample, D.p_mean_variance):
        with pytest.raises(TypeError):
            step(model, x, t, False)
    with pytest.raises(TypeError):
        D.training_losses(model, x, t, None)
    with pytest.raises(TypeError):
        D.calc_bpd_loop(model, x, False)


def test_ddim_inversion_round_trips():
    # exact for a model whose output does not depend on x_t (each inversion step is then the sampling step's inverse)
    D = create_diffusion(steps=30, learn_sigma=False, timestep_respacing="ddim10")
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    const = lambda x, t, **kw: eps
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    xT = D.ddim_reverse_sample_loop(const, x0)
    back = D.ddim_sample_loop(const, x0.shape, noise=xT, clip_denoised=False)
    torch.testing.assert_close(back, x0, rtol=1e-9, atol=1e-9)
    # close for the exact score of Gaussian data, where DDIM integrates the probability-flow ODE
    D = create_diffusion(steps=500, learn_sigma=False)
    model = gaussian_optimal_eps(D, 0.25)
    x0 = 0.5 * torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xT = D.ddim_reverse_sample_loop(model, x0)
    back = D.ddim_sample_loop(model, x0.shape, noise=xT, clip_denoised=False)
    assert (back - x0).abs().max() < 2e-2
    assert abs(xT.std().item() - 1) < 0.3  # the latent looks like N(0, I)


def test_p_sample_loop_matches_data_distribution_for_gaussian_data():
    """With the exact model for N(0, s2) data and fixed beta~ variances, DDPM samples have variance about s2."""
    D = create_diffusion(steps=100, learn_sigma=False, sigma_small=True)
    x = D.p_sample_loop(gaussian_optimal_eps(D, 0.09), (4000, 1), clip_denoised=False,
                        generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item()) < 0.03 and x.var().item() == pytest.approx(0.09, rel=0.1)


def float64_tables(sched, T):
    """Give a diffusers scheduler float64 tables built from the cosine closed form (it keeps float32 ones)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    sched.betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [999, 700, 300, 20, 1, 0])
def test_ddpm_step_parity_with_diffusers_learned_range(t, dtype):
    """Same model output [eps, v] and noise -> same x_0 prediction, log variance and x_{t-1} as diffusers.

    Where they differ, at t = 0: diffusers takes the lower end of the learned range as log(1e-20) (the posterior
    variance there is 0), we take the clipped posterior log variance log(beta~_1) as improved-diffusion does. The
    sample is still the same, because neither adds noise at t = 0; only the reported variance (and thus the
    decoder likelihood) differs, and ours stays finite. With diffusers' own float32 tables the tolerance is
    float32's: there 1 - abar near t = 0 keeps only about 4 significant digits; with float64 tables the two agree
    to 1e-10."""
    T = 1000
    D = create_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                          clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    if dtype == torch.float64:
        float64_tables(sched, T)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
    out = torch.cat([torch.randn(2, 3, 8, 8, generator=g, dtype=dtype),
                     torch.rand(2, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1], dim=1)
    ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(99))
    tt = torch.full((2,), t)
    ours = D.p_mean_variance(lambda *a, **k: out, x, tt, clip_denoised=True)
    torch.testing.assert_close(ours["pred_xstart"], ref.pred_original_sample, **tol)
    ps = D.p_sample(lambda *a, **k: out, x, tt, generator=torch.Generator().manual_seed(99))["sample"]
    torch.testing.assert_close(ps, ref.prev_sample, **tol)  # same noise from the same generator
    ref_logvar = sched._get_variance(t, predicted_variance=out[:, 3:])
    v = (out[:, 3:] + 1) / 2
    if t > 0:
        torch.testing.assert_close(ours["log_variance"], ref_logvar.to(dtype), **tol)
    else:
        expect = v * math.log(D.betas[0]) + (1 - v) * math.log(D.posterior_variance[1])
        torch.testing.assert_close(ours["log_variance"], expect, **tol)
        torch.testing.assert_close(ref_logvar, v * math.log(D.betas[0]) + (1 - v) * math.log(1e-20), **tol)


@pytest.mark.parametrize("eta, clip", [(0.0, False), (0.5, False), (0.0, True)])
def test_ddim_loop_parity_with_diffusers(eta, clip):
    """DDIM over 50 of 1000 steps ("ddim50" = diffusers' "leading" spacing with set_alpha_to_one=True).

    With clipping, diffusers keeps the raw epsilon unless use_clipped_model_output=True; we (like
    improved-diffusion) always re-derive epsilon from the clipped x_0, so the comparison sets that flag. Both run
    on float64 tables (see float64_tables) and agree to 1e-10."""
    T = 1000
    D = create_diffusion(steps=T, learn_sigma=False, timestep_respacing="ddim50")
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=clip,
                          set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", prediction_type="epsilon")
    float64_tables(sched, T)
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == D.timestep_map[::-1].tolist()
    model = lambda x, t, **kw: 0.8 * x + 0.1 * torch.sin(t.to(x.dtype) / 100).reshape(-1, 1, 1, 1)
    xT = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = D.ddim_sample_loop(model, xT.shape, noise=xT, eta=eta, clip_denoised=clip,
                              generator=torch.Generator().manual_seed(11))
    g, x = torch.Generator().manual_seed(11), xT
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((2,), int(t))), int(t), x, eta=eta, generator=g,
                       use_clipped_model_output=clip).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
