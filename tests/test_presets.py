"""Model presets: parameter counts of the paper's scaling models, shapes, config round trip, overrides, the
meta-device FLOP count, and the activation-memory profiler and its CLI (benchmarks.model_profile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is not an installed package; `python -m pytest` from ROOT has it already
    sys.path.insert(0, ROOT)

from benchmarks import model_profile  # noqa: E402
from benchmarks.model_profile import activation_bytes, saved_tensor_tally  # noqa: E402
from diffusion.presets import (PAPER_PARAMS_M, PRESETS, ModelConfig, count_params, create_model,  # noqa: E402
                               create_model_from_config, forward_flops, get_config)
from diffusion.unet import AttentionBlock, Upsample  # noqa: E402

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spin against other processes


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_scaling_presets_match_paper_parameter_counts_and_shapes(name: str) -> None:
    with torch.device("meta"):
        m = create_model(name)
        x = torch.empty(2, 3, 64, 64)
        out = m(x, torch.zeros(2, dtype=torch.long), torch.full((2,), 1000))
    n = count_params(m)
    assert abs(n / (PAPER_PARAMS_M[name] * 1e6) - 1) < 0.02, (name, n)
    assert out.shape == (2, 6, 64, 64)
    cfg = PRESETS[name]
    assert (cfg.image_size, cfg.num_classes, cfg.learn_sigma, cfg.num_res_blocks) == (64, 1000, True, 3)
    assert cfg.attention_resolutions == (16, 8) and cfg.channel_mult == (1, 2, 3, 4)


@pytest.mark.parametrize("name,size", [("tiny16", 16), ("tiny32", 32)])
def test_tiny_presets(name: str, size: int) -> None:
    m = create_model(name)
    assert count_params(m) < 2_000_000
    x = torch.randn(2, 3, size, size)
    out = m(x, torch.tensor([0, 999]), torch.tensor([3, 10]))  # 10 = the null label
    assert out.shape == (2, 6, size, size) and torch.isfinite(out).all()


def test_config_round_trip_through_json() -> None:
    cfg = get_config("tiny32", dropout=0.1, use_checkpoint=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    a = cfg.build().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.05)
    b = create_model_from_config(d).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    args = (x, torch.tensor([5, 500]), torch.tensor([1, 2]))
    with torch.no_grad():
        assert torch.equal(a(*args), b(*args))
    assert b.use_checkpoint and create_model_from_config(cfg).use_checkpoint


def test_overrides() -> None:
    m = create_model("tiny16", learn_sigma=False, num_classes=None)
    assert m.out_channels == 3 and m.label_emb is None
    assert m(torch.randn(1, 3, 16, 16), torch.tensor([1])).shape == (1, 3, 16, 16)
    with torch.device("meta"):
        assert create_model("30M", image_size=32).image_size == 32  # 32,16,8,4 px: attention at 16 and 8 reached
    assert create_model("tiny16", use_checkpoint=True, dropout=0.2).use_checkpoint


def test_bad_names_and_settings() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'big'; allowed: 30M, 70M, 120M, 270M, tiny16, tiny32"):
        create_model("big")
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['widht'\]; allowed: \[.*model_channels"):
        create_model("tiny16", widht=3)
    with pytest.raises(ValueError, match=r"attention resolution\(s\) \[16\] are never reached.*allowed: \[8, 4, 2, 1\]"):
        with torch.device("meta"):
            create_model("30M", image_size=8)


def _flops_by_hooks(cfg: ModelConfig, B: int) -> int:
    """Independent FLOP count: 2*MACs of every conv and linear layer from its shapes, plus attention's
    two batched matmuls (q k^T and a v: 2 * 2 * B * L^2 * C); an upsampling conv is four 2x2 phase convs
    (4*O output channels, I inputs, 4 taps) over the (H+1) x (W+1) positions of the padded low-res input."""
    m = cfg.build()
    total = [0]

    def conv(mod, inp, out):
        total[0] += 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    def lin(mod, inp, out):
        total[0] += 2 * out.numel() * mod.in_features

    def up(mod, inp, out):
        b, i, h, w = inp[0].shape
        total[0] += 2 * b * 4 * mod.weight.shape[0] * i * 4 * (h + 1) * (w + 1)

    def att(mod, inp, out):
        b, c, h, w = out.shape
        total[0] += 4 * b * (h * w) ** 2 * c

    for mod in m.modules():
        if isinstance(mod, Upsample):
            mod.register_forward_hook(up)
        elif isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(conv)
        elif isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(lin)
        elif isinstance(mod, AttentionBlock):
            mod.register_forward_hook(att)
    s = cfg.image_size
    with torch.no_grad():
        m(torch.zeros(B, 3, s, s), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long))
    return total[0]


def test_flop_counter_matches_closed_form() -> None:
    cfg = get_config("tiny32")
    assert forward_flops(cfg, batch=2) == _flops_by_hooks(cfg, 2)
    assert forward_flops(cfg, batch=2) == 2 * forward_flops(cfg, batch=1)
    # the scaling presets: FLOPs grow about with width^2 (30M -> 270M is 3x the width)
    r = forward_flops(get_config("270M")) / forward_flops(get_config("30M"))
    assert 8.0 < r < 9.5


def test_activation_memory_analysis() -> None:
    cfg = get_config("tiny16")
    meta = saved_tensor_tally(cfg, 2, "meta")
    cpu = saved_tensor_tally(cfg, 2, "cpu")
    assert meta == cpu  # the meta-device analysis sees exactly what a real forward saves
    no_ckpt, ckpt = activation_bytes(cfg)
    assert 0 < ckpt < no_ckpt
    # per image is linear in the batch: batch 3 - batch 2 gives the same per-image figure
    s2, s3 = saved_tensor_tally(cfg, 2), saved_tensor_tally(cfg, 3)
    tot = lambda s: s["outside"] + s["saved_inputs"] + s["blocks_sum"]  # noqa: E731
    assert tot(s3) - tot(s2) == no_ckpt
    # the output activation alone (fp32 [6, 16, 16] per image) is far below the total
    assert no_ckpt > 20 * 6 * 16 * 16 * 4
    big_no, big_ck = activation_bytes(get_config("30M"))
    assert big_no / big_ck >= 3.0


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert model_profile.main(["tiny16"]) == 0
    out = capsys.readouterr().out
    assert "tiny16" in out and f"{count_params(create_model('tiny16')):,}" in out
    assert model_profile.main(["nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allowed: 30M" in err[0]
    r = subprocess.run([sys.executable, "-m", "benchmarks.model_profile", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "meta device" in r.stdout
