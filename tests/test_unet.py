"""The UNet: equal to diffusers' UNet2DModel given the same weights, checkpointing, memory formats, precision,
labels, compile-friendliness, and that a tiny model can fit a batch under the hybrid loss."""
from __future__ import annotations

import pytest
import torch

from diffusion.presets import create_model
from diffusion.unet import UNetModel

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads spin against other processes


def small(**kw) -> UNetModel:
    cfg = dict(image_size=16, model_channels=32, out_channels=6, num_res_blocks=2, channel_mult=(1, 2),
               attention_resolutions=(8,), num_classes=10, num_head_channels=16)
    cfg.update(kw)
    return UNetModel(**cfg)


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (zero-initialised ones included) by seeded noise, so that all paths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) + (p.dim() == 1) * 0.1)
    return model


def batch(B: int = 3, s: int = 16, seed: int = 1, num_classes: int | None = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, s, s, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = None if num_classes is None else torch.randint(0, num_classes + 1, (B,), generator=g)
    return x, t, y


# --- independent implementation: diffusers' UNet2DModel with our weights ------------------------------------

def to_diffusers(ours: UNetModel, levels: int, nrb: int, attn_levels: set[int], updown: bool):
    from diffusers import UNet2DModel

    mc = ours.model_channels
    chans = tuple(mc * m for m in (1, 2, 3, 4)[:levels])
    down = tuple("AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(levels)))
    d = UNet2DModel(sample_size=ours.image_size, in_channels=3, out_channels=ours.out_channels, layers_per_block=nrb,
                    block_out_channels=chans, down_block_types=down, up_block_types=up, attention_head_dim=16,
                    norm_num_groups=32, attn_norm_num_groups=32, resnet_time_scale_shift="scale_shift",
                    num_class_embeds=ours.num_classes + 1, flip_sin_to_cos=True, freq_shift=0,
                    downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv")
    sd = {}

    def res(o: str, dn: str) -> None:
        for a, b in [("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("skip", "conv_shortcut")]:
            for w in ("weight", "bias"):
                if f"{o}.{a}.{w}" in src:
                    sd[f"{dn}.{b}.{w}"] = src[f"{o}.{a}.{w}"]

    def att(o: str, dn: str) -> None:
        C = src[f"{o}.proj.weight"].shape[0]
        for w in ("weight", "bias"):
            sd[f"{dn}.group_norm.{w}"] = src[f"{o}.norm.{w}"]
            q, k, v = src[f"{o}.qkv.{w}"].split(C)
            sd[f"{dn}.to_q.{w}"], sd[f"{dn}.to_k.{w}"], sd[f"{dn}.to_v.{w}"] = q, k, v
            sd[f"{dn}.to_out.0.{w}"] = src[f"{o}.proj.{w}"]

    src = ours.state_dict()
    for a, b in [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")]:
        for w in ("weight", "bias"):
            sd[f"{b}.{w}"] = src[f"{a}.{w}"]
    sd["class_embedding.weight"] = src["label_emb.weight"]
    i = 0
    for lv in range(levels):
        for j in range(nrb):
            res(f"enc.{i}.body", f"down_blocks.{lv}.resnets.{j}")
            if lv in attn_levels:
                att(f"enc.{i}.attn", f"down_blocks.{lv}.attentions.{j}")
            i += 1
        if lv != levels - 1:
            if updown:
                res(f"enc.{i}.body", f"down_blocks.{lv}.downsamplers.0")
            else:
                for w in ("weight", "bias"):
                    sd[f"down_blocks.{lv}.downsamplers.0.conv.{w}"] = src[f"enc.{i}.body.op.{w}"]
            i += 1
    res("mid.0.body", "mid_block.resnets.0")
    att("mid.0.attn", "mid_block.attentions.0")
    res("mid.1.body", "mid_block.resnets.1")
    i = 0
    for u, lv in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            res(f"dec.{i}.body", f"up_blocks.{u}.resnets.{j}")
            if lv in attn_levels:
                att(f"dec.{i}.attn", f"up_blocks.{u}.attentions.{j}")
            i += 1
        if lv:
            if updown:
                res(f"dec.{i}.body", f"up_blocks.{u}.upsamplers.0")
            else:
                for w in ("weight", "bias"):
                    sd[f"up_blocks.{u}.upsamplers.0.conv.{w}"] = src[f"dec.{i}.body.{w}"]
            i += 1
    assert len(sd) == len(d.state_dict()), "every diffusers tensor is mapped"
    d.load_state_dict(sd, strict=True)
    return d


@pytest.mark.parametrize("updown", [False, True])
def test_equals_diffusers_unet2d_with_same_weights(updown: bool) -> None:
    # diffusers has resnet up/down only in its attention blocks: attention at both levels for that case
    attn_levels = {0, 1} if updown else {1}
    ours = randomise_(small(resblock_updown=updown, attention_resolutions=(16, 8) if updown else (8,))).eval()
    ref = to_diffusers(ours, levels=2, nrb=2, attn_levels=attn_levels, updown=updown).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x, t, y = batch()
    with torch.no_grad():
        a = ours(x, t, y)
        b = ref(x, t, class_labels=y).sample
    assert a.shape == (3, 6, 16, 16)
    assert a.abs().mean() > 0.1  # not a trivially small output
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_zero_initialised_output() -> None:
    m = small()
    x, t, y = batch()
    out = m(x, t, y)
    assert torch.count_nonzero(out) == 0  # conv_out starts at zero
    for blk in m.enc:  # every residual branch starts as identity/skip projection
        if hasattr(blk.body, "conv2"):
            assert torch.count_nonzero(blk.body.conv2.weight) == 0
        if blk.attn is not None:
            assert torch.count_nonzero(blk.attn.proj.weight) == 0


def test_checkpointing_gives_identical_gradients() -> None:
    m = randomise_(small(dropout=0.1)).train()
    x, t, y = batch()
    grads = []
    for ckpt in (False, True):
        m.use_checkpoint = ckpt
        m.zero_grad()
        torch.manual_seed(123)  # same dropout masks; non-reentrant checkpoint replays the RNG state
        loss = m(x, t, y).square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0][:5])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_channels_last_same_output() -> None:
    m = randomise_(small()).eval()
    x, t, y = batch()
    with torch.no_grad():
        a = m(x, t, y)
        m_cl = m.to(memory_format=torch.channels_last)
        b = m_cl(x.to(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert b.is_contiguous(memory_format=torch.channels_last)  # the format survives the whole network


def test_null_label_and_label_errors() -> None:
    m = randomise_(small()).eval()
    x, t, _ = batch()
    with torch.no_grad():
        null = m(x, t, torch.full((3,), 10))
        cond = m(x, t, torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(null).all() and not torch.allclose(null, cond)
    assert m.label_emb.num_embeddings == 11  # 10 classes + the null label
    with pytest.raises(ValueError, match="null label"):
        m(x, t)
    unc = small(num_classes=None)
    assert unc.label_emb is None and unc(x, t).shape == (3, 6, 16, 16)
    with pytest.raises(ValueError, match="takes no labels"):
        unc(x, t, torch.zeros(3, dtype=torch.long))


def test_bf16_autocast_and_bf16_weights() -> None:
    m = randomise_(small()).eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = m(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, t, y)
        out16 = m.to(torch.bfloat16)(x, t, y)  # low-precision weights, as a DeepSpeed bf16 engine holds them
    for o in (out, out16):
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert (o - ref).norm() / ref.norm() < 0.05


def test_attention_matches_explicit_softmax() -> None:
    from diffusion.unet import AttentionBlock

    blk = randomise_(AttentionBlock(64, 4, num_groups=32))
    x = torch.randn(2, 64, 4, 4)
    h = torch.nn.functional.group_norm(x, 32, blk.norm.weight, blk.norm.bias).flatten(2)  # [B, C, L]
    q, k, v = (blk.qkv.weight @ h + blk.qkv.bias[:, None]).chunk(3, dim=1)  # [B, C, L] each
    q, k, v = (z.reshape(2, 4, 16, 16) for z in (q, k, v))  # [B, heads, d, L]
    w = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 4.0, dim=-1)
    a = torch.einsum("bhij,bhdj->bhdi", w, v).reshape(2, 64, 16)
    ref = x + (blk.proj.weight @ a + blk.proj.bias[:, None]).reshape(2, 64, 4, 4)
    torch.testing.assert_close(blk(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_kernel_cache_is_bitwise_and_follows_weight_changes(channels_last: bool) -> None:
    """Upsample.cache_kernel (set_inference_caches): the same output bit for bit as without the cache, recomputed
    after an in-place weight update or a dtype change, and never used while autograd records."""
    from diffusion.unet import Upsample, set_inference_caches

    torch.manual_seed(0)
    up = Upsample(8)
    x = torch.randn(2, 8, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = up(x, None)
        set_inference_caches(up)
        assert torch.equal(up(x, None), ref) and up._kernel is not None
        out = up(x, None)  # from the cache
        assert torch.equal(out, ref) and out.stride() == ref.stride()
        up.weight.mul_(2.0)  # in place: the version counter moves
        out = up(x, None)
        assert torch.equal(out, _uncached(up, x)) and not torch.equal(out, ref)
    up.double()
    with torch.no_grad():
        assert torch.equal(up(x.double(), None), _uncached(up, x.double()))
    out = up(x.double(), None)  # grad enabled: no cache, gradients flow to the weights
    out.sum().backward()
    assert up.weight.grad is not None


def _uncached(up, x: torch.Tensor) -> torch.Tensor:
    from diffusion.nn import upsample2x_conv3x3
    with torch.no_grad():
        return upsample2x_conv3x3(x, up.weight, up.bias)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_nearest_then_conv(channels_last: bool) -> None:
    import torch.nn.functional as F

    from diffusion.nn import upsample2x_conv3x3

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = F.conv2d(F.interpolate(xx, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    out = upsample2x_conv3x3(xx, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad(ref, (x, w, b), gy)
    gb = torch.autograd.grad(out, (x, w, b), gy)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_compiles_without_graph_breaks() -> None:
    import torch._dynamo

    m = small()
    x, t, y = batch()
    torch._dynamo.reset()
    for ckpt in (False, True):
        m.use_checkpoint = ckpt
        ex = torch._dynamo.explain(m)(x, t, y)
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1
    torch._dynamo.reset()


def test_bad_configuration_errors() -> None:
    with pytest.raises(ValueError, match=r"never reached.*allowed: \[16, 8\]"):
        small(attention_resolutions=(4,))
    with pytest.raises(ValueError, match="divisible"):
        small(image_size=15)
    with pytest.raises(ValueError, match="num_head_channels"):
        small(num_head_channels=24)


def test_tiny_model_overfits_one_batch_under_hybrid_loss() -> None:
    from diffusion import create_diffusion

    torch.manual_seed(0)
    diff = create_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=True, loss="hybrid")
    m = create_model("tiny16").train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)  # one fixed batch: (x0, t, y, noise)
    losses = []
    for _ in range(60):
        loss = diff.training_losses(m, x0, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))
    assert min(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])


def test_every_parameter_owner_runs_forward() -> None:
    """DeepSpeed ZeRO-3 gathers a module's own parameters when that module's forward runs: so every module
    holding parameters must be called (none may be used only through a parent's forward)."""
    m = small(resblock_updown=False)
    called = set()
    owners = [mod for mod in m.modules() if any(True for _ in mod.parameters(recurse=False))]
    for mod in owners:
        mod.register_forward_pre_hook(lambda mod, args: called.add(id(mod)))
    x, t, y = batch()
    m(x, t, y)
    missed = [type(mod).__name__ for mod in owners if id(mod) not in called]
    assert not missed, missed


_ZERO3_SCRIPT = r'''
import json, os, sys, torch, deepspeed
torch.set_num_threads(1)
from diffusion.presets import create_model
from trainer.dist import skip_shm_comm_op
skip_shm_comm_op()  # as the trainer does
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
res = {}
for prec in ["fp32", "bf16"]:
    torch.manual_seed(0)
    model = create_model("tiny16", use_checkpoint=True)
    g = torch.Generator().manual_seed(rank)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g)
    y, tgt = torch.randint(0, 11, (2,), generator=g), torch.randn(2, 6, 16, 16, generator=g)
    with torch.no_grad():
        torch.nn.init.normal_(model.conv_out.weight, std=0.01)  # a non-zero output from the start
        ref = (model(x, t, y) - tgt).square().mean().item()
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": prec == "bf16"},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    losses = []
    for _ in range(4):
        out = eng(x, t, y)
        loss = (out.float() - tgt).square().mean()
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    res[prec] = {"ref": ref, "losses": losses, "dtype": str(out.dtype)}
with open(f"result_{rank}.json", "w") as f:  # one file per rank: two ranks' stdout lines can interleave
    json.dump(res, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # as trainer.main does: gloo/DeepSpeed thread destructors can abort a finished rank at teardown
'''


@pytest.mark.distributed
@pytest.mark.slow
def test_trains_under_deepspeed_zero3_with_checkpointing(tmp_path) -> None:
    """Two CPU ranks, ZeRO-3, non-reentrant checkpointing, fp32 and bf16: the first loss equals the plain model's
    (parameters are gathered correctly) and the loss falls. About 25 s."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "zero3_unet.py"
    script.write_text(_ZERO3_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    import socket
    with socket.socket() as sock:  # a free rendezvous port: the launcher's default 29500 may be taken
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    r = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port,
                        str(script)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    files = sorted(tmp_path.glob("result_*.json"))
    assert r.returncode == 0 and len(files) == 2, r.stdout[-3000:] + r.stderr[-3000:]
    for fn in files:
        res = json.loads(fn.read_text())
        for prec, d in res.items():
            assert d["dtype"] == "torch.float32"
            tol = 1e-5 if prec == "fp32" else 2e-2
            assert abs(d["losses"][0] - d["ref"]) <= tol * abs(d["ref"]), (prec, d)
            assert d["losses"][-1] < d["losses"][0], (prec, d)
