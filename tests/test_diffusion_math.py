"""Forward process, posterior, reverse-process variances, losses and bits/dim against closed forms."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion import GaussianDiffusion, create_diffusion, get_named_beta_schedule
from diffusion.losses import NATS_TO_BITS, discretized_gaussian_log_likelihood, normal_kl

torch.set_num_threads(1)


def const_model(out):
    """A model that ignores its input and returns `out` (and records the timesteps it was given)."""
    def model(x, t, **kw):
        model.ts.append(t.clone())
        return out
    model.ts = []
    return model


def test_q_sample_moments():
    D = create_diffusion(steps=100)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for i in (0, 10, 60, 99):
        t = torch.full((n,), i)
        xt = D.q_sample(x0, t, generator=torch.Generator().manual_seed(i))
        ab = D.alphas_cumprod[i]
        se = math.sqrt((1 - ab) / n)
        assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5 * se
        assert abs(xt.var().item() / (1 - ab) - 1) < 5 * math.sqrt(2 / n)
        mean, var, logvar = D.q_mean_variance(x0[:2], t[:2])
        assert torch.allclose(mean, torch.full_like(mean, math.sqrt(ab) * 0.7))
        assert torch.allclose(var, torch.full_like(var, 1 - ab)) and torch.allclose(logvar, var.log())


def test_posterior_is_the_product_of_gaussians():
    D = create_diffusion(steps=50, noise_schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 25, 48, 49])
    mean, var, logvar = D.q_posterior_mean_variance(x0, xt, t)
    for b, i in enumerate(t.tolist()):
        # q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, beta_t) * N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
        a, beta, abp = 1 - D.betas[i], D.betas[i], D.alphas_cumprod[i - 1]
        prec = a / beta + 1 / (1 - abp)
        m = (math.sqrt(a) / beta * xt[b] + math.sqrt(abp) / (1 - abp) * x0[b]) / prec
        torch.testing.assert_close(mean[b], m, rtol=1e-12, atol=1e-12)
        assert var[b].item() == pytest.approx(1 / prec, rel=1e-12)
        assert logvar[b].item() == pytest.approx(math.log(1 / prec), rel=1e-12)
    # the same product evaluated numerically on a grid for one coordinate
    i, x0s, xts = 10, 0.3, -0.5
    grid = np.linspace(-6, 6, 200_001)
    dens = norm.pdf(xts, math.sqrt(1 - D.betas[i]) * grid, math.sqrt(D.betas[i])) * \
        norm.pdf(grid, math.sqrt(D.alphas_cumprod[i - 1]) * x0s, math.sqrt(1 - D.alphas_cumprod[i - 1]))
    dens /= dens.sum()
    m, v, _ = D.q_posterior_mean_variance(torch.tensor([[x0s]], dtype=torch.float64),
                                          torch.tensor([[xts]], dtype=torch.float64), torch.tensor([i]))
    assert (grid * dens).sum() == pytest.approx(m.item(), abs=1e-6)
    assert ((grid - m.item()) ** 2 * dens).sum() == pytest.approx(v.item(), rel=1e-5)
    # at t = 0 the posterior is a point mass at x_0; its log variance is clipped to that of t = 1
    m0, v0, lv0 = D.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(m0, x0[:1])
    assert v0.item() == 0 and lv0.item() == pytest.approx(math.log(D.posterior_variance[1]))


def test_normal_kl():
    m = torch.randn(100, dtype=torch.float64)
    lv = torch.randn(100, dtype=torch.float64)
    assert torch.all(normal_kl(m, lv, m, lv).abs() < 1e-15)
    m2, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discretized_decoder_sums_to_one_over_256_bins(dtype):
    x = torch.linspace(-1, 1, 256, dtype=torch.float64).to(dtype)
    for mean, log_scale in [(0.0, -1.0), (0.37, -4.0), (-0.99, -6.0), (0.5, 1.0), (1.2, -3.0), (0.02, -9.0)]:
        lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        total = lp.double().exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-9 if dtype == torch.float64 else 1e-5), (mean, log_scale)
    # an interior bin against scipy's normal CDF
    sd = math.exp(-2.0)
    lp = discretized_gaussian_log_likelihood(torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.15], dtype=torch.float64),
                                             torch.tensor([-2.0], dtype=torch.float64))
    ref = norm.cdf(0.2 + 1 / 255, 0.15, sd) - norm.cdf(0.2 - 1 / 255, 0.15, sd)
    assert lp.exp().item() == pytest.approx(ref, rel=1e-10)


def test_learned_range_interpolates_in_log_space():
    D = create_diffusion(steps=20)
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 5, 19])
    for v, expect in [(1.0, np.log(D.betas)), (-1.0, D.posterior_log_variance_clipped),
                      (0.0, 0.5 * np.log(D.betas) + 0.5 * D.posterior_log_variance_clipped)]:
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        lv = D.p_mean_variance(const_model(out), x, t)["log_variance"]
        for b, i in enumerate(t.tolist()):
            assert torch.allclose(lv[b], torch.tensor(expect[i], dtype=torch.float64), rtol=1e-13)


def test_fixed_variances():
    small = create_diffusion(steps=20, learn_sigma=False, sigma_small=True)
    large = create_diffusion(steps=20, learn_sigma=False)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 7])
    vs = small.p_mean_variance(const_model(torch.zeros_like(x)), x, t)["variance"].flatten()
    vl = large.p_mean_variance(const_model(torch.zeros_like(x)), x, t)["variance"].flatten()
    assert vs[0] == 0 and vs[1] == pytest.approx(small.posterior_variance[7])
    assert vl[0] == pytest.approx(large.posterior_variance[1]) and vl[1] == pytest.approx(large.betas[7])


def test_respacing_that_keeps_every_step_equals_the_original():
    full = create_diffusion(steps=50)
    spaced = create_diffusion(steps=50, timestep_respacing="50")
    assert type(spaced).__name__ == "SpacedDiffusion" and spaced.num_timesteps == 50
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(spaced, name), getattr(full, name), rtol=1e-12, atol=1e-15)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    out = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64).clamp(-1, 1)
    t = torch.tensor([0, 1, 25, 49])
    a, b = full.p_mean_variance(const_model(out), x, t), spaced.p_mean_variance(const_model(out), x, t)
    for k in ("mean", "log_variance", "pred_xstart"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


def test_respaced_process_keeps_marginals_and_calls_model_with_original_timesteps():
    full = create_diffusion(steps=100)
    sp = create_diffusion(steps=100, timestep_respacing="ddim10")
    keep = sorted(range(0, 100, 10))
    np.testing.assert_allclose(sp.alphas_cumprod, full.alphas_cumprod[keep], rtol=1e-12)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    model = const_model(torch.zeros(1, 2, 2, 2, dtype=torch.float64))
    sp.ddim_sample_loop(model, (1, 1, 2, 2), noise=x)
    assert [int(t) for t in model.ts] == keep[::-1]
    model.ts.clear()
    sp.training_losses(model, x, torch.tensor([3]))
    assert [int(t) for t in model.ts] == [30]


def test_training_losses_forms_and_stop_gradient():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (4, 2, 4, 4), generator=g).double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 10, 19])
    for loss in ("hybrid", "vlb", "simple"):
        D = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 20), loss_type=loss, vlb_weight=0.001)
        param = torch.nn.Parameter(torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64).clamp(-1, 1))
        out = D.training_losses(lambda x, t, **kw: param, x0, t, noise=noise)
        mse = ((noise - param[:, :2].detach()) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out["mse"], mse)
        ref = {"hybrid": mse + 0.001 * 20 * out["vb"], "vlb": 20 * out["vb"], "simple": mse}[loss]
        torch.testing.assert_close(out["loss"], ref)
        (grad_vb,) = torch.autograd.grad(out["vb"].sum(), param, allow_unused=True) if out["vb"].requires_grad else (None,)
        if loss == "hybrid":  # L_t reaches only the variance channels
            assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
        elif loss == "vlb":
            assert grad_vb[:, :2].abs().max() > 0 and grad_vb[:, 2:].abs().max() > 0
        else:
            assert grad_vb is None  # a detached diagnostic


def test_exact_model_has_zero_kl_and_mse():
    """With fixed beta~ variances, a model that outputs the true noise gives mse = 0 and L_t = 0 for t > 0."""
    D = create_diffusion(steps=30, learn_sigma=False, sigma_small=True, loss="hybrid")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = D.training_losses(lambda x, t, **kw: noise, x0, torch.tensor([1, 15, 29]), noise=noise)
    assert out["mse"].abs().max() < 1e-20 and out["vb"].abs().max() < 1e-10


def test_vb_terms_match_explicit_kl_and_decoder_nll():
    D = create_diffusion(steps=10)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (2, 1, 2, 2), generator=g).double() / 127.5 - 1
    xt = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = torch.cat([torch.randn(x0.shape, generator=g, dtype=torch.float64) * 0.1, torch.full_like(x0, 0.3)], 1)
    t = torch.tensor([0, 4])
    vb = D.vb_terms_bpd(const_model(out), x0, xt, t, clip_denoised=False)["output"]
    p = D.p_mean_variance(const_model(out), xt, t, clip_denoised=False)
    # t = 4: KL between two Gaussians, summed by hand with scipy-free closed form
    qm, qv, _ = D.q_posterior_mean_variance(x0, xt, t)
    pm, pv = p["mean"][1], p["variance"][1]
    kl = 0.5 * (torch.log(pv / qv[1]) + (qv[1] + (qm[1] - pm) ** 2) / pv - 1)
    assert vb[1].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-12)
    # t = 0: decoder NLL with scipy
    sd = p["variance"][0].sqrt().flatten().numpy()
    mu, xs = p["mean"][0].flatten().numpy(), x0[0].flatten().numpy()
    probs = [norm.cdf(min(x + 1 / 255, np.inf) if x < 0.999 else np.inf, m, s)
             - (norm.cdf(x - 1 / 255, m, s) if x > -0.999 else 0.0) for x, m, s in zip(xs, mu, sd)]
    assert vb[0].item() == pytest.approx(-np.mean(np.log(np.maximum(probs, 1e-12))) / math.log(2), rel=1e-8)


def test_prior_bpd_and_calc_bpd_loop():
    D = create_diffusion(steps=12)
    x0 = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(2, 1, 2, 4)
    ab = D.alphas_cumprod[-1]
    ref = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0 ** 2)
    torch.testing.assert_close(D.prior_bpd(x0), ref.mean(dim=(1, 2, 3)) * NATS_TO_BITS)
    model = lambda x, t, **kw: torch.cat([0.1 * x, torch.zeros_like(x)], 1)
    res = D.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(0))
    assert res["vb"].shape == res["mse"].shape == res["xstart_mse"].shape == (2, 12)
    torch.testing.assert_close(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"])
    assert torch.all(res["vb"] >= 0) and torch.all(torch.isfinite(res["total_bpd"]))


@pytest.mark.parametrize("call, match", [
    (lambda D, x: D.q_sample(x, torch.tensor([0, 10])), r"t out of range: timesteps must lie in \[0, 9\]"),
    (lambda D, x: D.q_sample(x, torch.tensor([-1, 0])), r"t out of range"),
    (lambda D, x: D.q_sample(x, torch.tensor([0, 1, 2])), "shape mismatch: t has shape"),
    (lambda D, x: D.q_sample(x, torch.tensor([0.5, 1.0])), "integer tensor"),
    (lambda D, x: D.q_sample(x, torch.tensor([0, 1]), noise=torch.zeros(2, 3)), "shape mismatch: noise"),
    (lambda D, x: D.training_losses(lambda x, t: x, x, torch.tensor([0, 1])), "shape mismatch: model output"),
    (lambda D, x: D.p_sample_loop(lambda x, t: x, (2, 2), noise=torch.zeros(3, 2)), "shape mismatch: noise"),
    (lambda D, x: D.q_posterior_mean_variance(x, x[:1], torch.tensor([0])), "shape mismatch: x_start"),
    (lambda D, x: next(D.sample_loop_progressive(lambda x, t: x, (2, 2), method="euler")), "unknown sampling method"),
    (lambda D, x: D.p_sample_loop(lambda x, t: x, (2, 2), eta=0.5), "eta=0.5 is a DDIM setting"),
    (lambda D, x: D.ddim_sample_loop(lambda x, t: x, (2, 2), eta=-1.0), "eta must be >= 0"),
])
def test_bad_inputs(call, match):
    D = create_diffusion(steps=10)
    with pytest.raises(ValueError, match=match):
        call(D, torch.zeros(2, 2))


def test_low_precision_inputs_compute_in_float32():
    """bf16 data or model outputs never enter the arithmetic: losses come out float32 and match a float32 run."""
    D = create_diffusion(steps=50)
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randint(0, 256, (3, 2, 4, 4), generator=g).float() / 127.5 - 1)
    noise = torch.randn(x0.shape, generator=g)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1)
    t = torch.tensor([0, 20, 49])
    ref = D.training_losses(lambda x, t, **kw: out, x0, t, noise=noise)
    low = D.training_losses(lambda x, t, **kw: out.bfloat16(), x0, t, noise=noise)
    assert all(v.dtype == torch.float32 for v in low.values())
    torch.testing.assert_close(low["loss"], ref["loss"], rtol=3e-2, atol=3e-2)
    xt = D.q_sample(x0.bfloat16(), t, noise=noise.bfloat16())
    assert xt.dtype == torch.bfloat16
    torch.testing.assert_close(xt.float(), D.q_sample(x0, t, noise=noise), rtol=1e-2, atol=1e-2)


def test_unrescaled_hybrid_loss_on_a_respaced_process_is_refused():
    """vlb_weight 1/T is improved-diffusion's hybrid loss without rescale_learned_sigmas (mse + L_t at any
    respacing in the original code); on a respaced process ours would weigh L_t by T'/T: refused with one line.
    The rescaled loss (0.001, the original's T'/1000 L_t) and the full process are computed as before."""
    import pytest
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 3])

    def model(x_t, ts, **kw):
        return torch.zeros(x_t.shape[0], 6, *x_t.shape[2:])
    full = create_diffusion(steps=100, learn_sigma=True, loss="hybrid", vlb_weight=1 / 100)
    assert torch.isfinite(full.training_losses(model, x, t)["loss"]).all()
    spaced = create_diffusion(steps=100, learn_sigma=True, loss="hybrid", vlb_weight=1 / 100, timestep_respacing="10")
    with pytest.raises(ValueError, match=r"vlb_weight 1/100 .* respaced to 10 steps.*timestep_respacing ''"):
        spaced.training_losses(model, x, t)
    rescaled = create_diffusion(steps=100, learn_sigma=True, loss="hybrid", vlb_weight=0.001, timestep_respacing="10")
    out = rescaled.training_losses(model, x, t)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.001 * 10 * out["vb"])
