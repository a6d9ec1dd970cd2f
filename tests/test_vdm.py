"""Variational Diffusion Models (diffusion.vdm): schedules in closed form, the learned schedule's monotonicity, the
continuous loss as the limit of the T-step loss, its invariance to the schedule's interior shape, the variance
gradient, the prior and decoder against independent formulas, and exact ancestral sampling of a point mass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusion.losses import NATS_TO_BITS
from diffusion.presets import ModelConfig, count_params, create_model_from_config
from diffusion.vdm import (COND_HI, COND_LO, FixedSchedule, LearnedSchedule, VDMNet, alpha_sigma, build_vdm,
                           fourier_features, low_discrepancy_t, make_schedule, prior_kl, recon_nll, sample,
                           snr_curves)

SMALL = ModelConfig(image_size=8, in_channels=1, model_channels=16, num_res_blocks=1, attention_resolutions=(),
                    channel_mult=(1, 2), num_classes=None, learn_sigma=False, num_head_channels=16,
                    num_groups=4).to_dict()


def small_net(schedule: str = "learned", gmin: float = -13.3, gmax: float = 5.0, seed: int = 0) -> VDMNet:
    """A tiny VDMNet whose UNet output is not zero (the zero-initialised output convs are perturbed)."""
    torch.manual_seed(seed)
    net = build_vdm(SMALL, schedule, gmin, gmax)
    with torch.no_grad():
        for p in net["unet"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


class SmoothEps(torch.nn.Module):
    """A cheap eps_hat(z, gamma), smooth in both (the quadrature tests evaluate it at 10^4-10^5 times)."""

    def forward(self, z: torch.Tensor, cond: torch.Tensor, y=None) -> torch.Tensor:
        gamma = (cond.double() / 1000 * (COND_HI - COND_LO) + COND_LO).view(-1, 1, 1, 1)
        return torch.tanh(0.8 * z + 0.5 * torch.sin(0.7 * gamma)) * torch.sigmoid(gamma + 1) + 0.1 * z


def simpson(f: np.ndarray, a: float, b: float) -> float:
    """Composite Simpson rule for samples f on an odd number of equally spaced points of [a, b]."""
    h = (b - a) / (len(f) - 1)
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


@pytest.mark.parametrize("kind", ["cosine", "linear", "learned"])
def test_schedule_endpoints_monotone_and_exact_derivative(kind) -> None:
    torch.manual_seed(1)
    s = make_schedule(kind, -10.0, 6.0).double()
    t = torch.linspace(0, 1, 1001, dtype=torch.float64, requires_grad=True)
    g = s(t)
    auto = torch.autograd.grad(g.gamma.sum(), t)[0]
    torch.testing.assert_close(g.dgamma.detach(), auto, rtol=1e-6, atol=1e-6)
    g = g._replace(gamma=g.gamma.detach())
    assert abs(float(g.gamma[0]) + 10) < 1e-5 and abs(float(g.gamma[-1]) - 6) < 1e-5
    assert bool((g.gamma.diff() > 0).all()) and bool((g.dgamma > 0).all())


def test_fixed_schedules_are_cosine_and_ddpm_linear() -> None:
    """cosine: sigma/alpha = tan(phi) with phi linear in t (Improved DDPM's alpha_bar = cos^2(phi));
    linear: -log alpha^2 = softplus(gamma) = integral of a linear beta(t) with DDPM's ratio beta(1)/beta(0) = 200."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    phi = torch.atan(torch.exp(FixedSchedule("cosine", -9.0, 7.0)(t).gamma / 2))
    torch.testing.assert_close(phi.diff(), torch.full((100,), float(phi[1] - phi[0]), dtype=torch.float64))
    a2, _ = alpha_sigma(FixedSchedule("cosine", -9.0, 7.0)(t).gamma)
    torch.testing.assert_close(a2 ** 2, torch.cos(phi) ** 2)
    c = torch.nn.functional.softplus(FixedSchedule("linear", -9.0, 7.0)(t).gamma)
    beta = c.diff() / 0.01                                     # beta at the midpoints, exact for a quadratic c
    torch.testing.assert_close(beta.diff(), torch.full((99,), float(beta[1] - beta[0]), dtype=torch.float64))
    slope = float(beta[1] - beta[0]) / 0.01
    b0 = float(beta[0]) - 0.005 * slope
    assert abs((b0 + slope) / b0 - 200.0) < 1e-6


def test_learned_schedule_stays_monotone_after_adversarial_steps() -> None:
    """Any parameter values give an increasing schedule with gamma_min < gamma_max: 50 Adam steps pulling gamma
    towards a decreasing curve (and the endpoints towards each other) cannot break it."""
    torch.manual_seed(0)
    s = LearnedSchedule(-13.3, 5.0)
    with torch.no_grad():
        s.w2.mul_(-3)  # negative raw weights
        s.w1.fill_(-0.5)
    opt = torch.optim.Adam(s.parameters(), lr=0.2)
    t = torch.linspace(0, 1, 257)
    for _ in range(50):
        g = s(t)
        loss = ((g.gamma - (3 - 6 * t)) ** 2).mean() + (g.gamma_max - g.gamma_min).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        g = s(torch.linspace(0, 1, 4097))
    assert bool((g.gamma.diff() > 0).all()) and bool((g.dgamma > 0).all())
    assert float((g.gamma_max - g.gamma_min).detach()) > 0
    assert abs(float((g.gamma[0] - g.gamma_min).detach())) < 1e-5
    assert abs(float((g.gamma[-1] - g.gamma_max).detach())) < 1e-4
    assert float(s.w2.min()) < 0 and float(s.w1) != float(s.w1.abs())  # the raw parameters did go negative


def _diffusion_terms(net: VDMNet, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, steps: int) -> np.ndarray:
    """L_diffusion (nats) of one image at each time in t [N]: [N]."""
    n = t.shape[0]
    with torch.no_grad():
        out, _ = net.terms(x.expand(n, -1, -1, -1), t, noise.expand(n, -1, -1, -1), steps=steps)
    return out[:, 0].numpy()


def test_continuous_loss_is_the_limit_of_the_discrete_loss() -> None:
    """The T-step loss (every step once) approaches the quadrature of the continuous loss like 1/T."""
    torch.manual_seed(3)
    net = VDMNet(SmoothEps(), LearnedSchedule(-13.3, 5.0, hidden=64).double())
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (1, 1, 8, 8), generator=g).double() / 127.5 - 1
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    continuous = simpson(_diffusion_terms(net, x, noise, torch.linspace(0, 1, 40001, dtype=torch.float64), 0), 0, 1)
    Ts, errs = (10, 100, 1000, 10000), []
    for T in Ts:
        mid = (torch.arange(T, dtype=torch.float64) + 0.5) / T            # one t in each step's bin: every i once
        errs.append(abs(_diffusion_terms(net, x, noise, mid, T).mean() - continuous) / continuous)
    scaled = [e * T for e, T in zip(errs, Ts)]                            # O(1/T): e * T about constant
    assert all(b < a for a, b in zip(errs, errs[1:])) and max(scaled[1:]) < 1.5 * min(scaled[1:]), errs
    assert errs[-1] < 2e-3, errs


def test_loss_depends_only_on_the_endpoints() -> None:
    """With eps_hat a function of (z, gamma), E_t[0.5 gamma'(t) ||eps - eps_hat||^2] is the same for every schedule
    shape with the same endpoints (VDM eq. 18): cosine, DDPM-linear and a random learned shape, by quadrature."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (1, 1, 8, 8), generator=g).double() / 127.5 - 1
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grid = torch.linspace(0, 1, 40001, dtype=torch.float64)
    torch.manual_seed(5)
    learned = LearnedSchedule(-10.0, 4.0, hidden=64).double()
    with torch.no_grad():
        learned.w2.mul_(8)
        learned.b2.normal_(0, 4)
        learned.w1.fill_(0.05)                                   # a strongly curved shape
    values = {}
    for name, sched in (("cosine", FixedSchedule("cosine", -10, 4)), ("linear", FixedSchedule("linear", -10, 4)),
                        ("learned", learned)):
        values[name] = simpson(_diffusion_terms(VDMNet(SmoothEps(), sched), x, noise, grid, 0), 0.0, 1.0)
    ref = values["cosine"]
    for name, v in values.items():
        assert abs(v - ref) / ref < 1e-5, values
    other = VDMNet(SmoothEps(), FixedSchedule("cosine", -10.0, 2.0))                 # other endpoints: another loss
    assert abs(simpson(_diffusion_terms(other, x, noise, grid, 0), 0.0, 1.0) - ref) / ref > 1e-2
    curves = snr_curves(learned)                                             # the report's plot data
    assert curves["gamma_min"] == pytest.approx(-10.0) and curves["model"][0] == pytest.approx(10.0, abs=1e-6)


def test_variance_gradient_for_the_shape_plain_gradient_for_the_rest() -> None:
    """The shape of the learned schedule receives d/d(shape) mean(L_diffusion^2) (bits/dim), the endpoints and the
    UNet d/d(theta) mean(L) of the full bound, from one backward pass of the trainer's loss."""
    net = small_net().float().train()
    g = torch.Generator().manual_seed(6)
    B = 6
    x = torch.randint(0, 256, (B, 1, 8, 8), generator=g).float() / 127.5 - 1
    noise, t = torch.randn(x.shape, generator=g), low_discrepancy_t(B, g)
    per_dim = NATS_TO_BITS / 64

    def grads(fn, **kw):
        net.zero_grad()
        fn(net(x, t, noise, **kw)).backward()
        return {k: p.grad.clone() for k, p in net.named_parameters()}

    trick = grads(lambda o: (o[:, :3].sum(1) * per_dim).mean())
    plain = grads(lambda o: (o[:, :3].sum(1) * per_dim).mean(), variance_grad=False)
    square = grads(lambda o: ((o[:, 0] * per_dim) ** 2).mean(), variance_grad=False)
    shape = {"schedule.w1", "schedule.w2", "schedule.b2", "schedule.w3"}
    for k in trick:
        torch.testing.assert_close(trick[k], (square if k in shape else plain)[k], rtol=1e-4, atol=1e-6, msg=k)
    assert float(trick["schedule.w2"].abs().sum()) > 0 and float(trick["schedule.gamma_min"].abs()) > 0


class _Rewrap(torch.autograd.Function):
    """Identity with a new output tensor, as DeepSpeed ZeRO-3 wraps every module output (PreBackwardFunction)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _rewrap(module: torch.nn.Module, inputs: tuple, out):
    """Forward hook: the schedule's Gamma with every tensor replaced by a new one (nested tuples included)."""
    if isinstance(out, torch.Tensor):
        return _Rewrap.apply(out)
    return type(out)(*[_rewrap(module, inputs, v) for v in out]) if isinstance(out, tuple) and hasattr(out, "_fields") \
        else type(out)(_rewrap(module, inputs, v) for v in out)


@pytest.mark.parametrize("steps", [0, 10])
def test_variance_gradient_survives_rewrapped_outputs_and_accumulation(steps) -> None:
    """The schedule's outputs replaced by new tensors (what ZeRO-3 does to every module's outputs; the old hook on
    the returned shape tensors never fired then, and the shape got the plain gradient) and the batch of 6 split
    into micro-batches of 2 and 4 whose mean losses are weighted 2/6 and 4/6 (gradient accumulation): the same
    gradients as one plain batch, the shape's the variance gradient, everything else the plain one. float64 (the
    schedule computes in float32 inside: hence rtol 1e-5, not 1e-12; the T-step weight expm1(gamma_t - gamma_s)
    cancels strongly in d/dw1, 2e-4 relative in float32)."""
    net = small_net().double().train()
    g = torch.Generator().manual_seed(11)
    B = 6
    x = torch.randint(0, 256, (B, 1, 8, 8), generator=g).double() / 127.5 - 1
    noise, t = torch.randn(x.shape, generator=g, dtype=torch.float64), low_discrepancy_t(B, g).double()
    per_dim = NATS_TO_BITS / 64

    def grads(parts, fn, **kw):
        net.zero_grad()
        for sl in parts:
            (fn(net(x[sl], t[sl], noise[sl], steps=steps, **kw)) * (sl.stop - sl.start) / B).backward()
        return {k: p.grad.clone() for k, p in net.named_parameters()}

    whole, split = [slice(0, B)], [slice(0, 2), slice(2, B)]
    bound = lambda o: (o[:, :3].sum(1) * per_dim).mean()                  # noqa: E731 (the trainer's loss)
    plain = grads(whole, bound, variance_grad=False)
    square = grads(whole, lambda o: ((o[:, 0] * per_dim) ** 2).mean(), variance_grad=False)
    shape = {"schedule.w1", "schedule.w2", "schedule.b2", "schedule.w3"}
    handle = net["schedule"].register_forward_hook(_rewrap)
    try:
        for parts in (whole, split):
            trick = grads(parts, bound)
            for k in trick:
                torch.testing.assert_close(trick[k], (square if k in shape else plain)[k], rtol=1e-5, atol=1e-9,
                                           msg=f"{len(parts)} part(s): {k}")
    finally:
        handle.remove()
    assert float((square["schedule.w2"] - plain["schedule.w2"]).abs().max()) > 100 * 1e-6  # the check can fail


def test_prior_and_decoder_against_independent_formulas() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (3, 1, 4, 4), generator=g).double() / 127.5 - 1
    gmax, gmin = torch.tensor([2.5], dtype=torch.float64), torch.tensor([-7.0], dtype=torch.float64)
    a1, s1 = alpha_sigma(gmax)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(a1 * x, s1), torch.distributions.Normal(0, 1))
    torch.testing.assert_close(prior_kl(x, gmax), ref.flatten(1).sum(1))
    a0, s0 = alpha_sigma(gmin)
    z0 = a0 * x + s0 * 3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean, sd = (z0 / a0).numpy(), float(s0 / a0)
    xs = x.numpy()
    hi = np.where(xs > 0.999, np.inf, xs + 1 / 255)
    lo = np.where(xs < -0.999, -np.inf, xs - 1 / 255)
    p = stats.norm.cdf(hi, mean, sd) - stats.norm.cdf(lo, mean, sd)
    ref = -np.log(np.maximum(p, 1e-12)).reshape(3, -1).sum(1)
    np.testing.assert_allclose(recon_nll(x, z0, gmin).numpy(), ref, rtol=1e-6)


class PointMassOracle(torch.nn.Module):
    """The exact eps_hat for data that is always the image c: (z - alpha c) / sigma, from the UNet's inputs."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, z: torch.Tensor, cond: torch.Tensor, y=None) -> torch.Tensor:
        gamma = cond.double() / 1000 * (COND_HI - COND_LO) + COND_LO
        a, s = alpha_sigma(gamma.view(-1, 1, 1, 1))
        return (z - a * self.c) / s


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ancestral_sampling_of_a_point_mass_is_exact(steps) -> None:
    g = torch.Generator().manual_seed(8)
    c = torch.randint(0, 256, (1, 1, 8, 8), generator=g).double() / 127.5 - 1
    net = VDMNet(PointMassOracle(c), FixedSchedule("cosine", -16.0, 5.0))   # decoder sd e^-8: 11 sd to a bin edge
    out = sample(net, torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), steps, generator=g)
    levels = lambda v: ((v.double() + 1) * 127.5).round().long()         # noqa: E731 (the 256-level grid)
    assert torch.equal(levels(out), levels(c).expand(5, -1, -1, -1))
    torch.testing.assert_close(out.double(), levels(out).double() / 127.5 - 1, rtol=0, atol=1e-6)
    assert sample(net, torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64), steps, generator=g).shape == (2, 1, 8, 8)


def test_low_discrepancy_times_fourier_features_and_parameter_count() -> None:
    t = low_discrepancy_t(16, torch.Generator().manual_seed(9))
    assert sorted((t * 16).floor().long().tolist()) == list(range(16))
    z = torch.linspace(-1, 1, 8).view(1, 2, 2, 2)
    f = fourier_features(z, (6, 7))
    assert f.shape == (1, 10, 2, 2)
    for c in range(2):                                          # channel-major: channel c's sines at 2 + 2c, 2c + 3
        for j, n in enumerate((6, 7)):
            torch.testing.assert_close(f[:, 2 + 2 * c + j], torch.sin(2 ** n * math.pi * z[:, c]))
            torch.testing.assert_close(f[:, 6 + 2 * c + j], torch.cos(2 ** n * math.pi * z[:, c]))
    plain = build_vdm(SMALL, "cosine")
    assert count_params(plain) == count_params(create_model_from_config(SMALL))     # default: the same UNet
    wide = build_vdm(SMALL, "learned", fourier=(6, 7))
    extra = count_params(wide) - count_params(plain) - count_params(wide["schedule"])
    assert extra == 4 * 16 * 9                                # the input conv sees 1 + 4 channels instead of 1
    assert wide(torch.zeros(2, 1, 8, 8), torch.rand(2), torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_fourier_option_bad_input_is_one_usage_error() -> None:
    from data.cli import UsageError
    from trainer.vdm import parse_fourier
    assert parse_fourier("6, 7") == (6, 7) and parse_fourier("") == ()
    for bad in ("abc", "6;7", "40"):
        with pytest.raises(UsageError, match=r"--fourier"):
            parse_fourier(bad)


def test_evaluations_sample_draws_from_an_exported_vdm(tmp_path) -> None:
    """evaluations.sample takes an exported VDM: --respace N ancestral steps, the same images as diffusion.vdm.sample
    from the same seeds; DDIM, guidance and a respacing that is not a step count are refused with one line."""
    from data.cli import UsageError
    from data.seeds import derive_seed
    from evaluations.sample import sample as sample_cli, to_uint8
    from trainer.export import save_exported
    cfg = dict(SMALL, in_channels=3)
    torch.manual_seed(0)
    net = build_vdm(cfg, "learned")
    with torch.no_grad():
        for p in net["unet"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "vdm.safetensors")
    save_exported(path, net.state_dict(), cfg, {"kind": "vdm", "schedule": "learned", "gamma_min": -13.3,
                                                "gamma_max": 5.0, "fourier": [], "loss_steps": 0}, step=0, ema="model")
    s = sample_cli(path, 3, batch_size=2, respace="4", seed=5, progress=False)
    assert s.images.shape == (3, 8, 8, 3) and s.report["model_steps_per_image"] == 4
    g = torch.Generator().manual_seed(derive_seed(5, 0))
    want = to_uint8(sample(net.eval(), torch.randn(2, 3, 8, 8, generator=g), 4, generator=g))
    assert np.array_equal(s.images[:2], want)
    for kw, message in (({"ddim": 4}, "drop --ddim"), ({"guidance_scale": 1.0}, "drop --guidance-scale"),
                        ({"respace": "ddim4"}, "a VDM takes a number of equal steps")):
        with pytest.raises(UsageError, match=message):
            sample_cli(path, 2, progress=False, **kw)
