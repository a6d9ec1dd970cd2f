"""Noise schedules and respacing against closed forms."""
import math

import numpy as np
import pytest

from diffusion import create_diffusion, get_named_beta_schedule, space_timesteps


def test_cosine_alpha_bar_closed_form():
    T, s = 1000, 0.008
    betas = get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    ab = np.cumprod(1 - betas)
    clipped = betas >= 0.999
    assert clipped.sum() <= 2 and clipped[-1]  # only the very end needs the 0.999 clip
    np.testing.assert_allclose(ab[~clipped], expected[~clipped], rtol=1e-12, atol=0)
    assert betas.max() == 0.999


def test_linear_schedule_is_scaled_by_1000_over_T():
    b = get_named_beta_schedule("linear", 1000)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    b4 = get_named_beta_schedule("linear", 4000)
    assert b4[0] == pytest.approx(0.25e-4) and b4[-1] == pytest.approx(0.005)
    assert np.all(np.diff(b4) > 0)


def test_space_timesteps_specs():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(100, "10") == set(round(i * 99 / 9) for i in range(10))
    s = space_timesteps(300, "10,15,20")
    assert len(s) == 45 and min(s) == 0 and max(s) == 299
    assert len([t for t in s if t < 100]) == 10 and len([t for t in s if 100 <= t < 200]) == 15
    assert space_timesteps(300, [10, 15, 20]) == s
    assert space_timesteps(50, "50") == set(range(50))
    assert space_timesteps(4000, "250") <= set(range(4000)) and len(space_timesteps(4000, "250")) == 250


@pytest.mark.parametrize("call, match", [
    (lambda: get_named_beta_schedule("quadratic", 10), "unknown noise schedule 'quadratic'; allowed: linear, cosine"),
    (lambda: get_named_beta_schedule("cosine", 0), "positive integer"),
    (lambda: space_timesteps(10, "ddim7"), "cannot keep exactly 7 steps of 10 .*nearest achievable: ddim5, ddim10"),
    (lambda: space_timesteps(10, "30"), "cannot keep 30 steps in a section of 10"),
    (lambda: space_timesteps(10, "abc"), "expected 'N', 'N1,N2,\\.\\.\\.' or 'ddimN'"),
    (lambda: space_timesteps(10, "ddimx"), "ddimN"),
    (lambda: space_timesteps(10, "0"), "positive integer"),
    (lambda: create_diffusion(steps=10, loss="l1"), "unknown loss 'l1'; allowed: simple, hybrid, vlb"),
    (lambda: create_diffusion(steps=10, timestep_respacing="ddim6"), "cannot keep exactly 6"),
])
def test_bad_inputs_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()
