"""Classifier guidance: the ADM encoder classifier (size, equality with guided-diffusion's), its objective (overfits a
batch), its guidance gradient (= autograd of log softmax, = finite differences), guided sampling (scale 0 equals
unguided bitwise; DDPM and DDIM; with classifier-free guidance), and bad input (one line, exit 2)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from diffusion.classifier import ADM64_CLASSIFIER_PARAMS, ClassifierConfig, get_classifier_config
from diffusion.presets import count_params, get_config

T = 100
DIFF = {"steps": T, "noise_schedule": "cosine", "learn_sigma": True}


def _perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would make the functions trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def test_adm64_parameter_count() -> None:
    with torch.device("meta"):
        n = count_params(get_classifier_config("adm64").build())
    assert abs(n - ADM64_CLASSIFIER_PARAMS) <= 0.02 * ADM64_CLASSIFIER_PARAMS
    gd = pytest.importorskip("guided_diffusion.script_util")
    with torch.device("meta"):  # the published configuration on the reference implementation
        ref = gd.create_classifier(64, False, 128, 4, "32,16,8", True, True, "attention")
    assert count_params(ref) == ADM64_CLASSIFIER_PARAMS == n


def _adm_state(ref_state: dict[str, torch.Tensor], head_channels: int) -> dict[str, torch.Tensor]:
    """guided-diffusion EncoderUNetModel names -> ours (the table in diffusion/classifier.py's docstring)."""
    res = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "skip", "norm": "norm", "qkv": "qkv", "proj_out": "proj",
           "op": "op"}
    out = {}
    for k, v in ref_state.items():
        if k.startswith("input_blocks.0.0."):
            k = k.replace("input_blocks.0.0", "conv_in")
        elif m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.+)\.(\w+)$", k):
            i, j, name, leaf = m.groups()
            k = f"enc.{int(i) - 1}.{'body' if j == '0' else 'attn'}.{res[name]}.{leaf}"
        elif m := re.match(r"middle_block\.(\d)\.(.+)\.(\w+)$", k):
            i, name, leaf = m.groups()
            k = f"{['mid.0.body', 'mid.0.attn', 'mid.1.body'][int(i)]}.{res[name]}.{leaf}"
        else:
            k = k.replace("out.0", "norm_out").replace("out.2.qkv_proj", "pool.qkv").replace("out.2", "pool")
        if ".attn.qkv." in k:  # ADM's legacy attention order: per head q|k|v -> q|k|v, then heads
            v = v.reshape(-1, 3, head_channels, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        out[k] = v[..., 0] if v.ndim == 3 else v  # conv1d 1x1 -> linear
    return out


def test_equals_guided_diffusion_encoder() -> None:
    unet = pytest.importorskip("guided_diffusion.unet")
    torch.manual_seed(0)
    ref = unet.EncoderUNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                                attention_resolutions=(2,), channel_mult=(1, 2, 2), num_head_channels=32,
                                use_scale_shift_norm=True, resblock_updown=True, pool="attention").eval()
    _perturb(ref)
    ours = ClassifierConfig(image_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=(8,),
                            channel_mult=(1, 2, 2), num_classes=10, num_head_channels=32).build().eval()
    ours.load_state_dict(_adm_state(ref.state_dict(), 32), strict=True)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-5, atol=1e-5)


def _objective(max_t: float = 1.0):
    from trainer.config import config_from_dict
    from trainer.objective import get_objective
    cfg = config_from_dict({"objective": {"name": "classifier", "classifier": {
        "max_t": max_t, "diffusion": {"steps": T}, "model": {"image_size": 16, "num_classes": 10}}}})
    return get_objective("classifier")(cfg)


def test_objective_overfits_a_batch_and_reports_quartiles() -> None:
    torch.manual_seed(0)
    obj = _objective(max_t=0.1)
    model = obj.build_model()
    x, y = torch.rand(20, 3, 16, 16) * 2 - 1, torch.arange(20) % 10
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        loss, metrics = obj.loss(model, (x, y), g)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert loss.mean().item() < 0.3 and metrics["acc"].mean().item() == 1.0  # from ln 10 = 2.3
    q = torch.stack([metrics[f"acc_q{i}"] for i in range(4)])
    assert (q.isnan().sum(0) == 3).all()  # each sample in exactly one quarter of [0, t_max)
    with torch.no_grad():
        assert (model(x, torch.zeros(20, dtype=torch.long)).argmax(-1) == y).all()
    assert obj.t_max == 10 and obj.export_config()["model"]["kind"] == "encoder_classifier"
    with pytest.raises(Exception, match="labels lie in"):
        obj.loss(model, (x, torch.full((20,), -1)), g)


def test_guidance_gradient_is_autograd_of_log_softmax() -> None:
    from diffusion.guidance import classifier_cond_fn
    torch.manual_seed(1)
    clf = _perturb(get_classifier_config("tiny16").build(), 0.2).double().eval()  # group norms stay float32
    x, t, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([3, 40, 90]), torch.tensor([1, 7, 4])
    grad = classifier_cond_fn(clf, 2.5)(x, t, y)
    for i in range(3):  # one image at a time: log p(y|x) = logit_y - logsumexp(logits)
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = clf(xi, t[i:i + 1])[0]
        (logits[y[i]] - torch.logsumexp(logits, 0)).backward()
        torch.testing.assert_close(grad[i], 2.5 * xi.grad[0], rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    # Central difference along the gradient's direction u: d/dh sum_i log p(y_i | x_i + h u_i) = |grad| / 2.5.
    u, h = grad / grad.norm(), 1e-2
    f = [torch.log_softmax(clf(x + s * h * u, t), -1)[torch.arange(3), y].sum().item() for s in (1, -1)]
    assert abs((f[0] - f[1]) / (2 * h) - grad.norm().item() / 2.5) < 1e-4 * grad.norm().item()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Tiny random exports: an unconditional and a 10-class UNet, classifiers for 16 px (10 and 5 classes), 32 px,
    and one trained for another diffusion length."""
    from trainer.export import save_exported
    d = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    out = {}
    for name, classes in (("uncond", None), ("cond", 10)):
        cfg = get_config("tiny16", num_classes=classes)
        out[name] = str(d / f"{name}.safetensors")
        save_exported(out[name], _perturb(cfg.build(), 0.02).state_dict(), cfg.to_dict(), DIFF, step=0, ema="model")
    for name, kw, diff in (("clf", {}, DIFF), ("clf5", {"num_classes": 5}, DIFF), ("clf32", {"image_size": 32}, DIFF),
                           ("clf_t50", {}, {**DIFF, "steps": 50})):
        cfg = get_classifier_config("tiny16", **kw)
        out[name] = str(d / f"{name}.safetensors")
        save_exported(out[name], _perturb(cfg.build()).state_dict(), cfg.to_dict(), diff, step=0, ema="model")
    return out


@pytest.mark.parametrize("method", [{"respace": "4"}, {"ddim": 4}])
def test_scale_zero_equals_unguided_bitwise(files, method) -> None:
    from evaluations.sample import sample
    kw = dict(batch_size=3, seed=5, threads=1, progress=False, **method)
    plain = sample(files["uncond"], 5, **kw)
    zero = sample(files["uncond"], 5, classifier=files["clf"], classifier_scale=0.0, **kw)
    guided = sample(files["uncond"], 5, classifier=files["clf"], classifier_scale=30.0, **kw)
    assert plain.labels is None and zero.labels is not None and np.array_equal(zero.labels, guided.labels)
    assert np.array_equal(plain.images, zero.images)
    assert not np.array_equal(plain.images, guided.images)
    assert zero.labels.min() >= 0 and zero.labels.max() < 10
    # A conditional model: scale 0 with classifier-free guidance is CFG alone, bitwise; a positive scale changes it.
    cfg = dict(kw, guidance_scale=1.5, labels=np.array([0, 1, 2, 3, 4]))
    a = sample(files["cond"], 5, **cfg)
    b = sample(files["cond"], 5, classifier=files["clf"], classifier_scale=0.0, **cfg)
    c = sample(files["cond"], 5, classifier=files["clf"], classifier_scale=30.0, **cfg)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert c.report["settings"]["classifier_scale"] == 30.0 and "classifier" not in a.report["settings"]


def test_guided_ddpm_step_is_the_shifted_mean() -> None:
    """p_sample with the classifier's cond_fn: mean + Sigma * s * grad log p(y|x_t) (Dhariwal & Nichol, alg. 1)."""
    from diffusion import create_diffusion
    from diffusion.guidance import classifier_cond_fn
    torch.manual_seed(2)
    unet = _perturb(get_config("tiny16", num_classes=None).build(), 0.02).eval()
    clf = _perturb(get_classifier_config("tiny16").build()).eval()
    diffusion = create_diffusion(**DIFF)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([50, 80]), torch.tensor([3, 8])
    cond_fn = classifier_cond_fn(clf, 4.0)
    with torch.no_grad():
        out = diffusion.p_mean_variance(unet, x, t)
        guided = diffusion.p_sample(unet, x, t, cond_fn=lambda x_, t_, **k: cond_fn(x_, t_, y=y),
                                    generator=torch.Generator().manual_seed(0))["sample"]
        plain = diffusion.p_sample(unet, x, t, generator=torch.Generator().manual_seed(0))["sample"]
    expect = out["variance"] * cond_fn(x, t, y=y)
    torch.testing.assert_close(guided - plain, expect, rtol=1e-4, atol=1e-5)


def _main(prog: str, argv: list[str]) -> int:
    import importlib
    try:
        return importlib.import_module(prog).main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize("args, message", [
    (["--classifier", "{tmp}/none.safetensors"], "no such file"),
    (["--classifier", "{uncond}"], "is a diffusion model (UNet), not a classifier"),
    (["--model", "{clf}"], "is a classifier, not a diffusion model"),
    (["--classifier", "{clf32}"], "image_size 32 but the model's is 16"),
    (["--model", "{cond}", "--classifier", "{clf5}"], "5 classes but the model has 10"),
    (["--classifier", "{clf_t50}"], "diffusion steps 50, the model uses 100"),
    (["--classifier", "{clf}", "--classifier-scale", "-1"], "--classifier-scale -1.0: must be >= 0"),
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
])
def test_sample_bad_input_one_line_exit_2(files, tmp_path, capsys, args, message) -> None:
    args = [a.format(tmp=tmp_path, **files) for a in args]
    model = [] if "--model" in args else ["--model", files["uncond"]]
    argv = [*model, *args, "--num-samples", "2", "--respace", "2", "--out", str(tmp_path / "x.npz"), "--no-progress"]
    assert _main("evaluations.sample", argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
