"""trainer.convert: guided-diffusion's own models (the guided-diffusion-sdk package) with random weights, saved
with torch.save, converted from their command-line flags, compute what the originals compute (<= 1e-5, fp32);
one full respaced sampling trajectory matches guided-diffusion's sampler; the converted model samples through
evaluations.sample; bad flags, mismatched checkpoints and pickled code are refused with one line."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from data.cli import UsageError
from trainer import convert
from trainer.convert import convert_openai
from trainer.export import load_exported

gd_unet = pytest.importorskip("guided_diffusion.unet")
gd_script = pytest.importorskip("guided_diffusion.script_util")

# name: (flags as in the READMEs, the reference model's constructor, input size, timestep scale)
CASES = {
    # improved-diffusion defaults (no guided-only flag): legacy attention, rescale_timesteps on (t * 1000 / 4000),
    # channel_mult from the 32-px table, separate decoder heads, class labels without a null row
    "improved_cond": ("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 --num_heads 2 "
                      "--num_heads_upsample 4 --learn_sigma True --class_cond True --diffusion_steps 4000 "
                      "--noise_schedule cosine --dropout 0.3 --lr 1e-4 --batch_size 128",
                      lambda: gd_unet.UNetModel(image_size=32, in_channels=3, model_channels=32, out_channels=6,
                                                num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2, 2, 2),
                                                num_classes=1000, num_heads=2, num_heads_upsample=4,
                                                use_scale_shift_norm=True), 32, 0.25),
    # guided-diffusion: new attention order, heads of fixed width, ResBlock up/down, no scale-shift, fixed sigma
    "guided_updown": ("--image_size 16 --num_channels 32 --num_res_blocks 2 --attention_resolutions 16,8 "
                      "--channel_mult 1,2 --num_head_channels 16 --resblock_updown True --use_new_attention_order True "
                      "--use_scale_shift_norm False --rescale_timesteps True --diffusion_steps 1000",
                      lambda: gd_unet.UNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=3,
                                                num_res_blocks=2, attention_resolutions=(1, 2), channel_mult=(1, 2),
                                                num_head_channels=16, resblock_updown=True,
                                                use_new_attention_order=True, use_scale_shift_norm=False), 16, 1.0),
    # a fractional channel_mult (guided-diffusion's 512-px model starts at 0.5)
    "fractional": ("--image_size 16 --num_channels 64 --num_res_blocks 1 --attention_resolutions 8 "
                   "--channel_mult 0.5,1 --num_head_channels 32 --learn_sigma True --use_fp16 False",
                   lambda: gd_unet.UNetModel(image_size=16, in_channels=3, model_channels=64, out_channels=6,
                                             num_res_blocks=1, attention_resolutions=(2,), channel_mult=(0.5, 1),
                                             num_head_channels=32, use_scale_shift_norm=True), 16, 1.0),
    "superres": ("--large_size 32 --small_size 16 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 "
                 "--attention_resolutions 8 --learn_sigma True --num_head_channels 32",
                 lambda: gd_unet.SuperResModel(image_size=32, in_channels=3, model_channels=32, out_channels=6,
                                               num_res_blocks=1, attention_resolutions=(4,), channel_mult=(1, 2),
                                               num_head_channels=32, use_scale_shift_norm=True), 32, 1.0),
    "classifier": ("--image_size 64 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 "
                   "--classifier_pool attention",
                   lambda: gd_script.create_classifier(64, False, 32, 1, "8", True, True, "attention"), 64, 1.0),
}


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers included), so that every mapped tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _convert(tmp_path, name: str, ref: torch.nn.Module, flags: str, **kw) -> tuple[torch.nn.Module, dict, dict]:
    ckpt, out = str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}.safetensors")
    torch.save(ref.state_dict(), ckpt)
    convert_openai(ckpt, flags, out, **kw)
    if name == "classifier":
        from evaluations.io import load_classifier
        model, meta = load_classifier(out)
        return model, meta["diffusion"], meta
    return load_exported(out)


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_matches_guided_diffusion(tmp_path, name):
    flags, build, size, scale = CASES[name]
    ref = _random(build())
    ours, dkw, meta = _convert(tmp_path, name, ref, flags)
    assert meta["model"].get("timestep_scale", 1.0) == scale
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, size, size, generator=g), torch.tensor([0, 17, 999])
    kw_ref, kw_ours = {}, {}
    if name == "improved_cond":
        kw_ref["y"] = kw_ours["y"] = torch.tensor([0, 5, 999])
        assert meta["model"]["null_label"] is False and ours.label_emb.num_embeddings == 1000
        assert dkw["loss"] == "hybrid" and dkw["vlb_weight"] == 0.001  # improved's rescale_learned_sigmas default
    if name == "superres":
        kw_ref["low_res"] = kw_ours["low_res"] = torch.randn(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        want = ref(x, t.float() * scale if scale != 1 else t, **kw_ref)
        got = ours(x, t, **kw_ours)
    assert want.abs().max() > 0.05
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sampling_trajectory_matches_guided_diffusion(tmp_path):
    """Respaced ancestral sampling (10 of 4000 cosine steps, learned sigma, rescaled timesteps): guided-diffusion's
    p_sample_loop with its model and ours with the converted model, from the same x_T and step noise."""
    flags = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --attention_resolutions 8 --channel_mult 1,2 "
             "--num_head_channels 32 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine "
             "--rescale_timesteps True --rescale_learned_sigmas True")
    ref = _random(gd_unet.UNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=6,
                                    num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                                    num_head_channels=32, use_scale_shift_norm=True), seed=3)
    with torch.no_grad():  # a smaller output scale keeps the trajectory away from the clip boundary
        ref.out[2].weight.mul_(0.1)
    ours, dkw, _ = _convert(tmp_path, "traj", ref, flags)
    gd = gd_script.create_gaussian_diffusion(steps=4000, learn_sigma=True, noise_schedule="cosine",
                                             rescale_timesteps=True, rescale_learned_sigmas=True,
                                             timestep_respacing="10")
    from diffusion import create_diffusion
    mine = create_diffusion(**dkw, timestep_respacing="10")
    assert mine.timestep_map.tolist() == gd.timestep_map
    shape = (2, 3, 16, 16)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)  # both samplers draw their step noise from the global generator, one draw per step
    want = gd.p_sample_loop(ref, shape, noise=x_T, clip_denoised=True)
    torch.manual_seed(7)
    got = mine.p_sample_loop(ours, shape, noise=x_T, clip_denoised=True)
    assert (want - x_T).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_converted_model_samples_and_refuses_guidance(tmp_path):
    from evaluations.sample import sample
    flags, build, _, _ = CASES["improved_cond"]
    _convert(tmp_path, "improved_cond", _random(build()), flags)
    path = str(tmp_path / "improved_cond.safetensors")
    s = sample(path, 2, batch_size=2, respace="2", class_label=3, progress=False)
    assert s.images.shape == (2, 32, 32, 3) and s.images.dtype == np.uint8
    with pytest.raises(UsageError, match="no null-label row.*classifier-free guidance"):
        sample(path, 2, guidance_scale=2.0, progress=False)


def test_superres_samples_from_low_res_inputs_like_guided_diffusion(tmp_path):
    """A converted SuperResModel: guided-diffusion's p_sample_loop and ours with low_res in model_kwargs agree; then
    evaluations.sample --low-res LOW.npz upsamples a batch (its labels, image i from low_res[i]); bad input."""
    from diffusion import create_diffusion
    from evaluations.sample import main as sample_main, sample
    flags, build, _, _ = CASES["superres"]
    ref = _random(build(), seed=4)
    with torch.no_grad():
        ref.out[2].weight.mul_(0.1)
    ours, dkw, meta = _convert(tmp_path, "superres", ref, flags)
    assert meta["model"]["super_res"] is True
    gd = gd_script.create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="5")
    mine = create_diffusion(**dkw, timestep_respacing="5")
    g = torch.Generator().manual_seed(2)
    shape, low = (2, 3, 32, 32), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x_T = torch.randn(shape, generator=g)
    torch.manual_seed(7)
    want = gd.p_sample_loop(ref, shape, noise=x_T, clip_denoised=True, model_kwargs={"low_res": low})
    torch.manual_seed(7)
    got = mine.p_sample_loop(ours, shape, noise=x_T, clip_denoised=True, model_kwargs={"low_res": low})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    path, lows = str(tmp_path / "superres.safetensors"), str(tmp_path / "low.npz")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(lows, arr_0=small)
    a = sample(path, 3, batch_size=2, respace="5", low_res=lows, progress=False)
    b = sample(path, 3, batch_size=2, respace="5", low_res=small[[1, 0, 2]], progress=False)
    assert a.images.shape == (3, 32, 32, 3) and a.labels is None
    assert np.array_equal(a.images[2], b.images[2]) and not np.array_equal(a.images[0], b.images[0])
    out = str(tmp_path / "up.npz")
    assert sample_main(["--model", path, "--low-res", lows, "--num-samples", "2", "--respace", "5", "--out", out,
                        "--no-progress"]) == 0 and np.load(out)["arr_0"].shape == (2, 32, 32, 3)
    for kw, message in (({}, "is a super-resolution model: give its low-resolution inputs"),
                        ({"low_res": small[:2]}, "holds 2 images but --num-samples is 3"),
                        ({"low_res": small[..., :1]}, r"expected arr_0 uint8 \[N, h, w, 3\]"),
                        ({"low_res": lows, "compile": True}, "--compile is not supported for super-resolution")):
        with pytest.raises(UsageError, match=message):
            sample(path, 3, respace="5", progress=False, **kw)
    flags, build, _, _ = CASES["improved_cond"]
    _convert(tmp_path, "improved_cond", _random(build()), flags)
    with pytest.raises(UsageError, match="--low-res is for super-resolution models"):
        sample(str(tmp_path / "improved_cond.safetensors"), 3, class_label=1, low_res=lows, progress=False)
    from diffusion.presets import get_config  # a class-conditional one takes the low-res batch's labels
    from trainer.export import save_exported
    cfg = get_config("tiny16", num_classes=10, super_res=True, image_size=32)
    cond = str(tmp_path / "cond_sr.safetensors")
    save_exported(cond, cfg.build().state_dict(), cfg.to_dict(), dkw, step=0, ema="model")
    np.savez(lows, arr_0=small, arr_1=np.array([7, 2, 9]))
    assert sample(cond, 3, respace="5", low_res=lows, progress=False).labels.tolist() == [7, 2, 9]
    assert sample(cond, 3, respace="5", low_res=lows, class_label=4, progress=False).labels.tolist() == [4, 4, 4]
    from evaluations.nll import main as nll_main
    with pytest.raises(SystemExit) as e:
        nll_main(["--model", path, "--data", lows, "--out-dir", str(tmp_path / "nll")])
    assert e.value.code == 2


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


def test_bad_input_is_one_line(tmp_path, capsys):
    flags, build, _, _ = CASES["guided_updown"]
    torch.save(_random(build()).state_dict(), tmp_path / "m.pt")
    with pytest.raises(UsageError, match="unknown flag\\(s\\) --imagesize"):
        convert.parse_flags("--imagesize 64")
    with pytest.raises(UsageError, match="--learn_sigma 'maybe' is not a boolean"):
        convert.parse_flags("--learn_sigma maybe")
    assert convert.parse_flags("--image_size=64")[0]["rescale_timesteps"] is True  # improved-diffusion's default
    assert convert.parse_flags("--image_size=64", "guided")[0]["rescale_timesteps"] is False
    with pytest.raises(UsageError, match="improved-diffusion has no num_head_channels"):
        convert.parse_flags("--num_head_channels 64", "improved")
    with pytest.raises(UsageError, match="does not match the flags.*checkpoint lacks: enc\\."):  # 3 blocks per level
        convert_openai(str(tmp_path / "m.pt"), flags.replace("--num_res_blocks 2", "--num_res_blocks 3"),
                       str(tmp_path / "x.safetensors"))
    with open(tmp_path / "code.pt", "wb") as f:
        pickle.dump({"w": _Code()}, f)
    with pytest.raises(UsageError, match="weights_only=True"):
        convert_openai(str(tmp_path / "code.pt"), flags, str(tmp_path / "x.safetensors"))
    assert "code ran" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        convert.main(["openai", str(tmp_path / "m.pt"), "--flags", "--image_size 16 --num_channels x",
                      "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--num_channels 'x' is not a int" in err and err.count("\n") == 1
    assert convert.main(["openai", str(tmp_path / "m.pt"), "--flags", flags,
                         "--out", str(tmp_path / "cli.safetensors")]) == 0
    _, _, meta = load_exported(str(tmp_path / "cli.safetensors"))
    src = meta["converted_from"]
    assert src["codebase"] == "guided-diffusion" and src["attention_order"] == "new"


GUIDED_README = {  # guided-diffusion's README MODEL_FLAGS / CLASSIFIER_FLAGS of its released checkpoints
    "64x64": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
             "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
             "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    "128x128": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
               "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
               "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "256x256_uncond": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
                      "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                      "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "512x512": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
               "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
               "--num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True",
    "64_256_upsampler": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 "
                        "--small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 "
                        "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "128x128_classifier": "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
                          "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
                          "--classifier_use_scale_shift_norm True",
}
IMPROVED_README = {  # improved-diffusion's README flags (its ImageNet-64 checkpoints, CIFAR-10, LSUN)
    "imagenet64_uncond": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                              "--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine",
    "imagenet64_cond": "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True "
                            "--class_cond True --diffusion_steps 4000 --noise_schedule cosine",
    "cifar10": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
               "--diffusion_steps 4000 --noise_schedule cosine",
    "lsun": "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
            "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear",
}


def _guided_reference(flags: str) -> torch.nn.Module:
    """guided-diffusion's own model for README flags, through its own argument parser and script_util."""
    import argparse
    import inspect
    defaults = {**gd_script.model_and_diffusion_defaults(), **gd_script.classifier_defaults(),
                **gd_script.sr_model_and_diffusion_defaults()}
    p = argparse.ArgumentParser()
    gd_script.add_dict_to_argparser(p, defaults)
    a = vars(p.parse_args(flags.split()))
    fn = (gd_script.create_classifier if "--classifier_width" in flags else
          gd_script.sr_create_model if "--large_size" in flags else gd_script.create_model)
    return fn(**{k: a[k] for k in inspect.signature(fn).parameters})


def _improved_reference(flags: str) -> torch.nn.Module:
    """improved-diffusion's UNetModel: its defaults, its channel_mult table and legacy attention."""
    f, _, _ = convert.parse_flags(flags, "improved")
    size = f["image_size"]
    return gd_unet.UNetModel(
        image_size=size, in_channels=3, model_channels=f["num_channels"], out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=tuple(size // int(r) for r in f["attention_resolutions"].split(",")),
        dropout=f["dropout"], channel_mult=convert.CHANNEL_MULT["improved"][size],
        num_classes=1000 if f["class_cond"] else None, num_heads=f["num_heads"],
        num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"])


@pytest.mark.parametrize("name", list(GUIDED_README) + list(IMPROVED_README))
def test_readme_configurations_map_completely(name):
    """Full-size released configurations, on the meta device: every weight of the original finds its place in
    ours with the right shape, none is left over, and the parameter counts agree."""
    from diffusion.classifier import create_classifier_from_config
    from diffusion.presets import create_model_from_config
    flags = GUIDED_README.get(name) or IMPROVED_README[name]
    f, codebase, given = convert.parse_flags(flags)
    assert codebase == ("guided" if name in GUIDED_README else "improved")
    kind = convert._kind("auto", given)
    cfg = convert.model_config(f, codebase, kind)
    with torch.device("meta"):
        ref = _guided_reference(flags) if codebase == "guided" else _improved_reference(flags)
        ours = (create_classifier_from_config if kind == "classifier" else create_model_from_config)(cfg)
    legacy = kind == "classifier" or not f["use_new_attention_order"]
    state = convert.convert_state(ref.state_dict(), ours, legacy=legacy, classifier=kind == "classifier")
    assert len(state) == len(ours.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
