"""--format diffusers: the folder loads in diffusers (UNet2DModel, DDPMScheduler, DDPMPipeline), the UNet computes
our function, and diffusers' scheduler loop samples what our sampler samples from the same noise."""
from __future__ import annotations

import json
import os

import pytest
import torch

from data.cli import UsageError
from diffusion import create_diffusion
from diffusion.presets import get_config
from trainer import export
from trainer.export import save_exported
from trainer.export_diffusers import diffusers_scheduler, export_diffusers

diffusers = pytest.importorskip("diffusers")


def _exported(tmp_path, name: str, diffusion: dict | None = None, **over) -> tuple[str, torch.nn.Module]:
    """A tiny16 variant with random (non-zero) weights, exported to our format."""
    cfg = get_config("tiny16", **over)
    torch.manual_seed(len(name))
    model = cfg.build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / f"{name}.safetensors")
    save_exported(path, model.state_dict(), cfg.to_dict(), diffusion or {"steps": 20, "noise_schedule": "cosine"},
                  step=0, ema="model")
    return path, model


@pytest.mark.parametrize("over", [{}, {"num_classes": None}, {"resblock_updown": True},
                                  {"use_scale_shift_norm": False, "num_res_blocks": 2}],
                         ids=["cond", "uncond", "resblock_updown", "no_scale_shift"])
def test_unet_matches_ours(tmp_path, over):
    path, model = _exported(tmp_path, "m", **over)
    out = export_diffusers(path, str(tmp_path / "hf"))
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    with open(os.path.join(out, "unet", "config.json")) as f:
        fresh = diffusers.UNet2DModel.from_config(json.load(f))
    from safetensors.torch import load_file
    written = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert set(written) == set(fresh.state_dict())  # every diffusers weight written, nothing extra
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 7, 19])
    y = None if model.num_classes is None else torch.tensor([1, 9, 10])  # 10 = the null label
    with torch.no_grad():
        ref, got = model(x, t, y), unet(x, t, class_labels=y).sample
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("diffusion,n", [({"steps": 40, "noise_schedule": "cosine", "learn_sigma": True}, 10),
                                         ({"steps": 100, "noise_schedule": "linear", "learn_sigma": False,
                                           "sigma_small": True}, 10)],
                         ids=["cosine_learned_ddim10", "linear_fixed_small_ddim10"])
def test_scheduler_loop_samples_like_ours(tmp_path, diffusion, n):
    """n < T: diffusers' "leading" spacing (stride T // n) is our respacing "ddim<n>"."""
    path, model = _exported(tmp_path, "s", diffusion, num_classes=None, learn_sigma=diffusion["learn_sigma"])
    out = export_diffusers(path, str(tmp_path / "hf"))
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    sched = diffusers.DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert sched.config.beta_schedule == ("squaredcos_cap_v2" if diffusion["noise_schedule"] == "cosine" else "linear")
    assert type(diffusers.DDPMPipeline.from_pretrained(out).unet).__name__ == "UNet2DModel"
    shape = (2, 3, 16, 16)
    ours = create_diffusion(**diffusion, timestep_respacing=f"ddim{n}").p_sample_loop(
        model, shape, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws in the same order: x_T, then one per step with t > 0
    x = torch.randn(shape, generator=g)
    sched.set_timesteps(n)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)


def test_refusals_and_cli(tmp_path, capsys):
    # 4 heads at 16 px (32 channels) and 8 px (64 channels): head widths 8 and 16
    path, _ = _exported(tmp_path, "heads", num_head_channels=-1, num_heads=4, attention_resolutions=(16, 8))
    with pytest.raises(UsageError, match="attention head widths \\[8, 16\\] differ.*num_head_channels"):
        export_diffusers(path, str(tmp_path / "hf"))
    path, _ = _exported(tmp_path, "rescaled", timestep_scale=0.25)
    with pytest.raises(UsageError, match="rescaled timesteps"):
        export_diffusers(path, str(tmp_path / "hf"))
    assert diffusers_scheduler({"steps": 10, "model_mean_type": "v"})["prediction_type"] == "v_prediction"
    with pytest.raises(UsageError, match="distilled student"):
        diffusers_scheduler({"steps": 10, "distilled_steps": 4})
    with pytest.raises(UsageError, match="neither exported weights"):
        export_diffusers(str(tmp_path / "nope"), str(tmp_path / "hf"))
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path), "--format", "diffusers"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out-dir DIR" in err and err.count("\n") == 1
    good, _ = _exported(tmp_path, "good")
    assert export.main([good, "--format", "diffusers", "--out-dir", str(tmp_path / "cli")]) == 0
    assert os.path.isfile(tmp_path / "cli" / "unet" / "diffusion_pytorch_model.safetensors")
