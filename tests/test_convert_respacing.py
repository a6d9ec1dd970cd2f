"""space_timesteps keeps exactly the steps guided-/improved-diffusion keep, for every single-number spec."""
from __future__ import annotations

import pytest

from diffusion import space_timesteps

gd_respace = pytest.importorskip("guided_diffusion.respace")


@pytest.mark.parametrize("T", [1000, 4000])
def test_every_single_number_spec_matches_guided_diffusion(T):
    diff = [n for n in range(1, T + 1) if space_timesteps(T, str(n)) != gd_respace.space_timesteps(T, str(n))]
    assert diff == []


def test_known_tie_and_section_specs():
    # "21" at T=1000: stride 49.95, the 10th index is 449.5 by the running sum and by j * stride; at such
    # ties the two rules used to part by one step.
    for T, spec in [(1000, "21"), (4000, "10,15,20"), (300, "10,15,20"), (1000, "ddim50"), (4000, "250")]:
        assert space_timesteps(T, spec) == gd_respace.space_timesteps(T, spec)
