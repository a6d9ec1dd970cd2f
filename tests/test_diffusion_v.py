"""v-prediction (Salimans & Ho 2022) against closed forms and against the same model in epsilon form; the loss
parity bullets of #14 (simple + learned sigma refused; hybrid + fixed sigma trains and reports the mse alone)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion


def _abar(T: int) -> np.ndarray:
    """The cosine schedule's alpha-bars, computed here from Nichol & Dhariwal eq. 17 (betas clipped at 0.999)."""
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = np.minimum(1 - np.array(f[1:]) / np.array(f[:-1]), 0.999)
    return np.cumprod(1 - betas)


def _data(seed: int, shape=(4, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1
    return x0, torch.randn(shape, generator=g, dtype=torch.float64), g


def test_v_loss_is_truncated_snr_weighted_x_error_and_zero_for_the_true_v():
    T = 20
    D = create_diffusion(steps=T, learn_sigma=False, loss="simple", model_mean_type="v")
    x0, noise, g = _data(0)
    t = torch.tensor([0, 5, 12, 19])
    ab = torch.as_tensor(_abar(T))[t].reshape(-1, 1, 1, 1)
    true_v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    out = D.training_losses(lambda x, tt, **kw: true_v, x0, t, noise=noise)
    assert out["mse"].abs().max() < 1e-12
    v_hat = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = D.training_losses(lambda x, tt, **kw: v_hat, x0, t, noise=noise)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * v_hat
    snr = (ab / (1 - ab)).flatten()
    ref = torch.maximum(snr, torch.ones_like(snr)) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-10, atol=1e-12)
    assert snr[0] > 1 and snr[-1] < 1  # both branches of the truncation are exercised


def _eps_net(seed: int):
    """A fixed nonlinear epsilon 'network' with learned-variance channels: [B, C] -> [B, 2C]."""
    w = torch.randn(2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5

    def net(x, t, **kw):
        eps = torch.tanh(torch.einsum("oc,bchw->bohw", w, x) + t.double().reshape(-1, 1, 1, 1) / 50)
        return torch.cat([eps, torch.tanh(x)], dim=1)
    return net


def _as_v(net, D):
    """The same model in v form: v = sqrt(abar) eps - sqrt(1 - abar) x_0(x_t, eps); the model sees original t."""
    ab_of = {int(k): float(a) for k, a in zip(D.timestep_map, D.alphas_cumprod)}

    def vnet(x, t, **kw):
        out = net(x, t)
        eps = out[:, :2]
        ab = torch.tensor([ab_of[int(k)] for k in t], dtype=torch.float64).reshape(-1, 1, 1, 1)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return torch.cat([ab.sqrt() * eps - (1 - ab).sqrt() * x0, out[:, 2:]], dim=1)
    return vnet


@pytest.mark.parametrize("respacing", ["", "ddim5"])
def test_v_model_samples_and_nll_like_the_same_model_in_epsilon_form(respacing):
    kw = dict(steps=20, learn_sigma=True, loss="hybrid", timestep_respacing=respacing)
    De, Dv = create_diffusion(**kw), create_diffusion(**kw, model_mean_type="v")
    net = _eps_net(1)
    vnet = _as_v(net, Dv)
    x0, noise, _ = _data(2)
    for method in ("ddim", "ddpm"):
        a = De.sample_loop_progressive(net, noise.shape, method=method, noise=noise,
                                       generator=torch.Generator().manual_seed(3))
        b = Dv.sample_loop_progressive(vnet, noise.shape, method=method, noise=noise,
                                       generator=torch.Generator().manual_seed(3))
        for sa, sb in zip(a, b):
            torch.testing.assert_close(sa["sample"], sb["sample"], rtol=1e-9, atol=1e-9)
    ba = De.calc_bpd_loop(net, x0, generator=torch.Generator().manual_seed(4))
    bb = Dv.calc_bpd_loop(vnet, x0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ba["total_bpd"], bb["total_bpd"], rtol=1e-9, atol=1e-9)


def test_hybrid_with_fixed_sigma_trains_and_reports_the_mse_alone():
    D = create_diffusion(steps=20, learn_sigma=False, sigma_small=True, loss="hybrid")
    x0, noise, g = _data(5)
    param = torch.nn.Parameter(torch.randn(x0.shape, generator=g, dtype=torch.float64))
    out = D.training_losses(lambda x, t, **kw: param, x0, torch.tensor([0, 3, 10, 19]), noise=noise)
    torch.testing.assert_close(out["loss"], out["mse"])
    assert bool((out["vb"] > 0).all()) and not out["vb"].requires_grad  # still reported, as a diagnostic
    # a learned variance keeps the vb term
    Dl = create_diffusion(steps=20, learn_sigma=True, loss="hybrid")
    p2 = torch.nn.Parameter(torch.randn(4, 4, 4, 4, generator=g, dtype=torch.float64).clamp(-1, 1))
    out = Dl.training_losses(lambda x, t, **kw: p2, x0, torch.tensor([0, 3, 10, 19]), noise=noise)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.001 * 20 * out["vb"])


def test_loss_aware_sampler_history_gets_the_mse_with_a_fixed_sigma():
    from trainer.config import parse_config
    from trainer.iddpm import ImprovedDDPM
    torch.manual_seed(0)
    cfg = parse_config(["--data", "x", "--run-dir", "y", "--model-size", "tiny16", "--num-classes", "0",
                        "--diffusion-steps", "20", "--no-learn-sigma", "--loss", "hybrid",
                        "--timestep-sampler", "loss-second-moment"])
    obj = ImprovedDDPM(cfg)
    model = obj.build_model()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        loss, metrics = obj.loss(lambda a, t, **kw: model(a, t, **kw), (x, torch.zeros(4, dtype=torch.int64)),
                                 torch.Generator().manual_seed(1))
    rows = obj.sync_rows()
    torch.testing.assert_close(metrics["loss"], metrics["mse"])
    torch.testing.assert_close(rows[:, 1], metrics["mse"].double())
    assert bool((metrics["vb"] > 0).all())


def test_simple_loss_with_learned_sigma_is_refused(capsys):
    with pytest.raises(ValueError, match="use loss 'hybrid'"):
        create_diffusion(steps=10, loss="simple", learn_sigma=True)
    create_diffusion(steps=10, loss="simple", learn_sigma=False)  # fine: nothing to learn
    from trainer.main import main
    with pytest.raises(SystemExit) as e:
        main(["--data", "x", "--run-dir", "y", "--loss", "simple"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--loss hybrid" in err[0], err


def test_distilled_student_process_takes_only_its_own_steps():
    D = create_diffusion(steps=1000, distilled_steps=4, model_mean_type="v", timestep_respacing="ddim4")
    assert list(D.timestep_map) == [249, 499, 749, 999]
    np.testing.assert_allclose(D.alphas_cumprod, _abar(1000)[[249, 499, 749, 999]], rtol=1e-9)
    with pytest.raises(ValueError, match="own 4 steps"):
        create_diffusion(steps=1000, distilled_steps=4, timestep_respacing="ddim8")
