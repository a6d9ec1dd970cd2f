"""Progressive distillation (#16): the student's target against two teacher DDIM steps taken by our ddim_sample,
one real round (trainer.distill -> trainer.main -> export) that halves the steps and lowers the two-step loss,
resume of a finished plan, guidance distilled at a sampled scale (the student's zero-initialised w embedding, its
per-example target, a real round, sampling at two scales with one forward per step), and bad input (one line,
exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion import ClassifierFreeGuidance, create_diffusion
from diffusion.distill import step_grid, teacher_ddim_target
from diffusion.presets import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore::FutureWarning")


def micro(image_size: int = 8, num_classes: int | None = None, guidance_embed: bool = False) -> ModelConfig:
    return ModelConfig(image_size=image_size, model_channels=8, num_res_blocks=1, attention_resolutions=(),
                       channel_mult=(1, 2), num_classes=num_classes, num_groups=4, guidance_embed=guidance_embed)


def test_step_grids_nest_and_end_at_pure_noise():
    for T in (64, 1000, 1500, 4000):
        for K in (1, 2, 4, 16, 32):
            assert step_grid(T, 2 * K)[1::2] == step_grid(T, K)
            assert step_grid(T, K)[-1] == T - 1 and len(set(step_grid(T, K))) == K


@pytest.mark.parametrize("guided", [False, True])
def test_target_equals_two_teacher_ddim_steps(guided):
    torch.manual_seed(0)
    cfg = micro(num_classes=3 if guided else None)
    net = cfg.build().double().eval()
    teacher = ClassifierFreeGuidance(net, 1.5, 3) if guided else net
    kw = {"y": torch.tensor([0, 1, 2, 0])} if guided else {}
    Dt = create_diffusion(steps=64, distilled_steps=8)  # the teacher: epsilon, learned sigma, 8 DDIM steps
    Ds = create_diffusion(steps=64, distilled_steps=4, model_mean_type="v")  # the student: 4 steps, v
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) * 1.2
    j = torch.tensor([0, 1, 2, 3])
    target = teacher_ddim_target(teacher, Dt, x_t, 2 * j + 1, model_kwargs=kw)
    with torch.no_grad():  # two steps of our sampler, 2j+1 -> 2j -> 2j-1 (the last one ends at x_0)
        z = Dt.ddim_sample(teacher, x_t, 2 * j + 1, clip_denoised=True, model_kwargs=kw)["sample"]
        z = Dt.ddim_sample(teacher, z, 2 * j, clip_denoised=True, model_kwargs=kw)["sample"]
    ab = torch.as_tensor(Ds.alphas_cumprod)[j].reshape(-1, 1, 1, 1)

    def student(x, t, **_):  # the v whose x_0 is the target, plus (unused) variance channels
        assert t.tolist() == [step_grid(64, 4)[k] for k in j.tolist()]
        return torch.cat([(ab.sqrt() * x - target) / (1 - ab).sqrt(), torch.zeros_like(x)], dim=1)
    one = Ds.ddim_sample(student, x_t, j, clip_denoised=False)["sample"]
    torch.testing.assert_close(one, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(target[0], z[0], rtol=1e-9, atol=1e-9)  # student step 0 ends at x_0 itself
    # substeps 1 (the v conversion): the x_0 of one teacher step at the teacher's own grid
    one_step = teacher_ddim_target(teacher, Dt, x_t, j, substeps=1, model_kwargs=kw)
    with torch.no_grad():
        ref = Dt.p_mean_variance(teacher, x_t, j, clip_denoised=True, model_kwargs=kw)["pred_xstart"]
    torch.testing.assert_close(one_step, ref, rtol=1e-9, atol=1e-9)


def test_objective_distills_the_guided_teacher_with_one_student_forward(tmp_path):
    from diffusion.losses import mean_flat
    from trainer.config import parse_config
    from trainer.export import save_exported
    from trainer.objective import get_objective
    torch.manual_seed(0)
    cfg = micro(16, num_classes=3)
    path = str(tmp_path / "cond.safetensors")
    save_exported(path, cfg.build().state_dict(), cfg.to_dict(),
                  {"steps": 64, "noise_schedule": "cosine", "learn_sigma": True}, step=0, ema="model")
    tc = parse_config(["--objective", "distill", "--teacher", path, "--teacher-steps", "8", "--teacher-guidance",
                       "2", "--data", "unused", "--run-dir", "unused"])
    obj = get_objective("distill")(tc)
    student = obj.build_model()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])
    calls = []

    def net(a, t, **kw):
        calls.append(a.shape[0])
        return student(a, t, **kw)
    loss, metrics = obj.loss(net, (x, y), torch.Generator().manual_seed(3))
    assert calls == [4]  # one plain forward of the student per sample
    g = torch.Generator().manual_seed(3)  # the same draws, by hand
    j = torch.randint(0, 4, (4,), generator=g)
    x_t = obj.diffusion.q_sample(x, j, noise=torch.randn(x.shape, generator=g))
    target = teacher_ddim_target(ClassifierFreeGuidance(obj.teacher, 2.0, 3), create_diffusion(
        steps=64, distilled_steps=8), x_t, 2 * j + 1, model_kwargs={"y": y})
    with torch.no_grad():
        v = student(x_t, torch.tensor(step_grid(64, 4))[j], y=y)[:, :3]
    ab = torch.as_tensor(obj.diffusion.alphas_cumprod, dtype=torch.float32)[j].reshape(-1, 1, 1, 1)
    x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * v
    w = torch.clamp(ab / (1 - ab), min=1).flatten()
    torch.testing.assert_close(loss.detach(), w * mean_flat((target - x0) ** 2), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- guidance at a sampled scale

def perturbed(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter plus N(0, std^2) noise (as if trained: zero-initialised layers no longer hide the input)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def test_guidance_embed_student_starts_as_the_teacher_for_any_w():
    torch.manual_seed(0)
    teacher = perturbed(micro(num_classes=3).build().eval())
    student = micro(num_classes=3, guidance_embed=True).build().eval()
    student.load_unguided(teacher.state_dict())
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 20, 63]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = teacher(x, t, y)
        for w in (torch.zeros(4), torch.full((4,), 0.7), torch.tensor([0.0, 1.5, 4.0, 12.0])):
            assert torch.equal(student(x, t, y, w=w), ref) and ref.abs().min() > 0
    with pytest.raises(ValueError, match="needs w"):
        student(x, t, y)
    with pytest.raises(ValueError, match="no guidance input"):
        teacher(x, t, y, w=torch.zeros(4))
    with pytest.raises(ValueError, match="one guidance scale per example"):
        student(x, t, y, w=torch.zeros(3))
    broken = {k: v for k, v in teacher.state_dict().items() if k != "conv_in.weight"}
    with pytest.raises(RuntimeError, match="conv_in.weight"):
        micro(num_classes=3, guidance_embed=True).build().load_unguided(broken)
    # trained, the embedding changes the output: w is a real input
    torch.nn.init.normal_(student.w_embed[-1].weight)
    with torch.no_grad():
        assert not torch.equal(student(x, t, y, w=torch.zeros(4)), student(x, t, y, w=torch.ones(4)))


def _cond_export(path: str, *, image_size: int = 16, num_classes: int = 3, embed: bool = False,
                 steps: int = 0, wrange: list[float] | None = None) -> ModelConfig:
    """A random class-conditional export (a guidance-distilled `steps`-step v student with `embed`)."""
    from trainer.export import save_exported
    cfg = micro(image_size, num_classes=num_classes, guidance_embed=embed)
    model = perturbed(cfg.build())  # as if trained: labels (and w) change the output
    dkw = {"steps": 64, "noise_schedule": "cosine", "learn_sigma": True}
    if steps:
        dkw.update(model_mean_type="v", distilled_steps=steps)
    save_exported(path, model.state_dict(), cfg.to_dict(), dkw, step=0, ema="model",
                  extra={"distill": {"teacher_guidance_range": wrange}} if wrange else None)
    return cfg


def test_sampled_scale_target_is_the_per_example_guided_teacher(tmp_path):
    """The objective's loss with --teacher-guidance-range against a reference built one example at a time: two
    steps of our ddim_sample with the teacher under classifier-free guidance at that example's (scalar) w."""
    from diffusion.losses import mean_flat
    from trainer.config import parse_config
    from trainer.objective import get_objective
    torch.manual_seed(0)
    path = str(tmp_path / "cond.safetensors")
    _cond_export(path)
    tc = parse_config(["--objective", "distill", "--teacher", path, "--teacher-steps", "8",
                       "--teacher-guidance-range", "0.5,4", "--data", "unused", "--run-dir", "unused"])
    obj = get_objective("distill")(tc)
    student = obj.build_model()
    assert student.guidance_embed and obj.export_config()["model"]["guidance_embed"]
    assert obj.export_config()["distill"]["teacher_guidance_range"] == [0.5, 4.0]
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])
    calls = []

    def net(a, t, **kw):
        calls.append((a.shape[0], kw["w"]))
        return student(a, t, **kw)
    loss, _ = obj.loss(net, (x, y), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, by hand
    j = torch.randint(0, 4, (4,), generator=g)
    x_t = obj.diffusion.q_sample(x, j, noise=torch.randn(x.shape, generator=g))
    w = 0.5 + 3.5 * torch.rand(4, generator=g)
    assert len(calls) == 1 and calls[0][0] == 4 and torch.equal(calls[0][1], w)  # one student forward, with w
    Dt = create_diffusion(steps=64, distilled_steps=8)
    target = []
    with torch.no_grad():
        for i in range(4):  # one example, one scalar scale
            cfg = ClassifierFreeGuidance(obj.teacher, float(w[i]), 3)
            ji, kw = j[i:i + 1], {"y": y[i:i + 1]}
            z = Dt.ddim_sample(cfg, x_t[i:i + 1], 2 * ji + 1, clip_denoised=True, model_kwargs=kw)["sample"]
            z = Dt.ddim_sample(cfg, z, 2 * ji, clip_denoised=True, model_kwargs=kw)["sample"]
            ab_t = Dt.alphas_cumprod[2 * ji.item() + 1]
            ab_e = Dt.alphas_cumprod_prev[2 * ji.item()]  # x~: one DDIM step abar_t -> ab_e lands on z
            ratio = ((1 - ab_e) / (1 - ab_t)) ** 0.5
            target.append((z - ratio * x_t[i:i + 1]) / (ab_e ** 0.5 - ratio * ab_t ** 0.5))
        target = torch.cat(target).float()
        v = student(x_t, torch.tensor(step_grid(64, 4))[j], y=y, w=w)[:, :3]
    ab = torch.as_tensor(obj.diffusion.alphas_cumprod, dtype=torch.float32)[j].reshape(-1, 1, 1, 1)
    x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * v
    snr = torch.clamp(ab / (1 - ab), min=1).flatten()
    torch.testing.assert_close(loss.detach(), snr * mean_flat((target - x0) ** 2), rtol=1e-4, atol=1e-5)


def test_later_round_teacher_takes_w_unguided(tmp_path):
    """A guidance-distilled teacher (an earlier round's student) is called with the student's w, batch B (no
    conditional/unconditional pair), and the student keeps its weights strictly."""
    from trainer.config import parse_config
    from trainer.objective import get_objective
    path = str(tmp_path / "student8.safetensors")
    _cond_export(path, embed=True, steps=8, wrange=[0.0, 4.0])
    tc = parse_config(["--objective", "distill", "--teacher", path, "--teacher-steps", "8",
                       "--teacher-guidance-range", "0,4", "--data", "unused", "--run-dir", "unused"])
    obj = get_objective("distill")(tc)
    student = obj.build_model()
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), obj.teacher.state_dict().values()))
    seen = []

    def teacher(a, t, **kw):
        seen.append((a.shape[0], kw["w"]))
        return obj.teacher(a, t, **kw)
    obj.nets = {"teacher": teacher}  # as the trainer hands a frozen network to its objective
    student_w = []
    obj.loss(lambda a, t, **kw: student_w.append(kw["w"]) or student(a, t, **kw),
             (torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2])), torch.Generator().manual_seed(0))
    assert [b for b, _ in seen] == [3, 3] and all(torch.equal(wt, student_w[0]) for _, wt in seen)


def test_sampling_a_guidance_embed_export_one_forward_per_step(tmp_path, monkeypatch, capsys):
    """evaluations.sample --guidance-scale W feeds w to the model: different W, different images; one forward of
    the batch per step, with classifier guidance too; without a scale: one line, exit 2."""
    import numpy as np
    from diffusion.classifier import ClassifierConfig
    from diffusion.unet import UNetModel
    from evaluations.sample import main as sample_main
    from trainer.export import save_exported
    torch.manual_seed(0)
    path = str(tmp_path / "student.safetensors")
    _cond_export(path, image_size=8, embed=True, steps=2, wrange=[0.0, 4.0])
    calls = []
    forward = UNetModel.forward

    def counting(self, x, t, y=None, **kw):
        calls.append((x.shape[0], None if kw.get("w") is None else kw["w"].tolist()))
        return forward(self, x, t, y, **kw)
    monkeypatch.setattr(UNetModel, "forward", counting)
    clf_cfg = ClassifierConfig(image_size=8, model_channels=8, num_res_blocks=1, attention_resolutions=(),
                               channel_mult=(1, 2), num_classes=3, num_head_channels=8, num_groups=4, pool="adaptive")
    clf = str(tmp_path / "clf.safetensors")
    save_exported(clf, perturbed(clf_cfg.build()).state_dict(), clf_cfg.to_dict(),
                  {"steps": 64, "noise_schedule": "cosine"}, step=0, ema="model")
    images = {}
    for name, w, extra in (("w0", 0.0, []), ("w3", 3.0, []),
                           ("w3+classifier", 3.0, ["--classifier", clf, "--classifier-scale", "5"])):
        calls.clear()
        out = str(tmp_path / f"{name}.npz")
        assert sample_main(["--model", path, "--num-samples", "4", "--batch-size", "4", "--ddim", "2", *extra,
                            "--guidance-scale", str(w), "--out", out, "--no-progress", "--device", "cpu"]) == 0
        assert calls == [(4, [w] * 4)] * 2  # 2 DDIM steps, one forward of the 4 images each
        images[name] = np.load(out)["arr_0"]
        with open(out[:-4] + ".json") as f:
            assert json.load(f)["model_steps_per_image"] == 2
    assert images["w0"].shape == (4, 8, 8, 3) and not np.array_equal(images["w0"], images["w3"])
    assert not np.array_equal(images["w3"], images["w3+classifier"])  # classifier guidance composes
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_main(["--model", path, "--num-samples", "4", "--ddim", "2", "--out", str(tmp_path / "x.npz"),
                     "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pass --guidance-scale W (it learned 0 to 4)" in err[0], err
    from data.cli import UsageError
    from evaluations.nll import nll
    with pytest.raises(UsageError, match="guidance-distilled"):
        nll(path, "unused", device="cpu", progress=False)


# ------------------------------------------------------------------------------------------- real rounds

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trainer.export import save_exported
    out = tmp_path_factory.mktemp("distill")
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(out / "digits"), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    torch.manual_seed(0)
    paths = {}
    for name, size, classes in (("teacher", 16, None), ("teacher8", 8, None), ("cond", 16, 10)):
        cfg = micro(size, num_classes=classes)
        paths[name] = str(out / f"{name}.safetensors")
        model = perturbed(cfg.build(), 0.05) if classes else cfg.build()  # guidance needs labels that matter
        save_exported(paths[name], model.state_dict(), cfg.to_dict(),
                      {"steps": 64, "noise_schedule": "cosine", "learn_sigma": True}, step=0, ema="model")
    return {"data": str(out / "digits" / "train-manifest.json"), "out": str(out / "run"), **paths}


def _distill(setup, *extra: str, teacher: str | None = None) -> list[str]:
    return ["--teacher", teacher or setup["teacher"], "--data", setup["data"], "--out-dir", setup["out"], *extra]


def _two_step_loss(setup, weights: dict[str, torch.Tensor], teacher: str = "teacher", *extra: str) -> float:
    """The distillation loss of the 4 -> 2 round on fixed data and draws, for the given student weights (a teacher's
    weights without the w embedding of a sampled-guidance student: loaded as the student's start)."""
    from data.stream import TrainStream
    from trainer.config import parse_config
    from trainer.objective import get_objective
    cfg = parse_config(["--objective", "distill", "--teacher", setup[teacher], "--teacher-steps", "4",
                        "--data", setup["data"], "--run-dir", "unused", *extra])
    obj = get_objective("distill")(cfg)
    model = obj.build_model()
    if model.guidance_embed and not any(k.startswith("w_embed.") for k in weights):
        model.load_unguided(weights)
    else:
        model.load_state_dict(weights)
    x, y = next(iter(TrainStream(setup["data"], 256, seed=5, flip=False)))
    with torch.no_grad():
        loss, _ = obj.loss(lambda a, t, **kw: model(a, t, **kw), (x, y), torch.Generator().manual_seed(7))
    return float(loss.mean())


@pytest.mark.slow
def test_one_round_halves_steps_and_lowers_the_two_step_loss(setup):
    from evaluations.io import load_model
    from safetensors.torch import load_file
    args = _distill(setup, "--teacher-steps", "4", "--final-steps", "2", "--no-convert", "--steps-per-round", "40",
                    "--", "--global-batch", "16", "--lr", "2e-3", "--ema", "0.5", "--log-every", "20",
                    "--save-every", "20", "--sample-grid", "4")
    r = subprocess.run([sys.executable, "-m", "trainer.distill", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rd = os.path.join(setup["out"], "round00-4to2")
    with open(os.path.join(setup["out"], "distill.json")) as f:
        plan = json.load(f)
    assert [(x["teacher_steps"], x["student_steps"]) for x in plan["rounds"]] == [(4, 2)]
    assert plan["images"] == 40 * 16 and plan["final"] == os.path.join(rd, "model.safetensors")
    model, diffusion, meta = load_model(plan["final"], respacing="ddim2")
    assert meta["diffusion"]["distilled_steps"] == 2 and meta["diffusion"]["model_mean_type"] == "v"
    assert list(diffusion.timestep_map) == step_grid(64, 2) == [31, 63]
    x = diffusion.ddim_sample_loop(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and bool(x.abs().le(1).all())
    before = _two_step_loss(setup, load_file(setup["teacher"]))
    after = _two_step_loss(setup, load_file(plan["final"]))
    assert after < 0.75 * before, (before, after)
    # the same command again: the finished round is skipped (resumable at any round), the record unchanged
    from trainer.distill.__main__ import main
    assert main(args) == 0
    with open(os.path.join(setup["out"], "distill.json")) as f:
        assert json.load(f) == plan
    # the sweep over steps: teacher DDIM / DDPM and the student, table, JSON and plot
    import numpy as np
    from evaluations.sweep_steps import main as sweep_main
    ref = os.path.join(setup["out"], "ref.npz")
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    sw = os.path.join(setup["out"], "sweep")
    assert sweep_main(["--teacher", setup["teacher"], "--distill-dir", setup["out"], "--reference", ref,
                       "--ddim", "2,4", "--ddpm", "4", "--num-samples", "8", "--batch-size", "4", "--out-dir", sw,
                       "--no-progress"]) == 0
    with open(os.path.join(sw, "sweep_steps.json")) as f:
        rows = json.load(f)["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("teacher DDIM", 2), ("teacher DDIM", 4),
                                                          ("teacher DDPM", 4), ("student", 2)]
    assert all(np.isfinite(r["fd_pixels"]) and r["fd_pixels"] > 0 for r in rows)
    assert os.path.isfile(os.path.join(sw, "sweep_steps.png")) and os.path.isfile(os.path.join(sw, "sweep_steps.md"))
    assert np.load(os.path.join(sw, "samples", "student2.npz"))["arr_0"].shape == (8, 16, 16, 3)


@pytest.mark.slow
def test_two_rounds_at_sampled_guidance_scales(setup):
    """Two real rounds (4 -> 2 -> 1) with --teacher-guidance-range: the first round's two-step loss falls, its
    export is a guidance_embed student that records its range and teaches the second round (called with w)."""
    from evaluations.io import load_model
    from safetensors.torch import load_file
    out = setup["out"] + "-guided"
    args = ["--teacher", setup["cond"], "--data", setup["data"], "--out-dir", out, "--teacher-steps", "4",
            "--final-steps", "1", "--no-convert", "--teacher-guidance-range", "0,3", "--steps-per-round", "40",
            "--", "--global-batch", "16", "--lr", "2e-3", "--ema", "0.5", "--log-every", "20", "--save-every", "40",
            "--sample-grid", "4"]
    r = subprocess.run([sys.executable, "-m", "trainer.distill", *args], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "distill.json")) as f:
        plan = json.load(f)
    assert plan["teacher_guidance_range"] == [0.0, 3.0]
    assert [(x["teacher_steps"], x["student_steps"]) for x in plan["rounds"]] == [(4, 2), (2, 1)]
    first = os.path.join(plan["rounds"][0]["run_dir"], "model.safetensors")
    assert plan["rounds"][1]["teacher"] == first
    for path in (first, plan["final"]):
        with open(path[:-len(".safetensors")] + ".json") as f:
            meta = json.load(f)
        assert meta["model"]["guidance_embed"] is True and meta["distill"]["teacher_guidance_range"] == [0.0, 3.0]
    model, _, _ = load_model(first)
    assert model.guidance_embed and float(model.w_embed[-1].weight.detach().abs().max()) > 0  # w was learned from
    rng = ("--teacher-guidance-range", "0,3")
    before = _two_step_loss(setup, load_file(setup["cond"]), "cond", *rng)
    after = _two_step_loss(setup, load_file(first), "cond", *rng)
    assert after < 0.75 * before, (before, after)


@pytest.mark.parametrize("extra, teacher, message", [
    (["--teacher-steps", "6"], None, "--teacher-steps 6: must be a power of two"),
    (["--teacher-steps", "8", "--final-steps", "3"], None, "--final-steps 3: must be a power of two"),
    (["--teacher-steps", "8"], "missing.safetensors", "no such file"),
    (["--teacher-steps", "8"], "teacher8", "trained on 8 px images but the data are 16 px"),
    (["--teacher-steps", "8", "--", "--data-image-size", "8"], None, "trained on 16 px images but the data are 8 px"),
    (["--teacher-steps", "8", "--teacher-guidance-range", "0,2"], None, "the teacher is unconditional"),
    (["--teacher-steps", "8", "--teacher-guidance-range", "0,2", "--teacher-guidance", "1"], "cond",
     "exclude each other"),
    (["--teacher-steps", "8", "--teacher-guidance-range", "2,2"], "cond", "need 0 <= WMIN < WMAX"),
    (["--teacher-steps", "8", "--teacher-guidance-range", "3,1"], "cond", "need 0 <= WMIN < WMAX"),
    (["--teacher-steps", "8", "--teacher-guidance-range=-1,2"], "cond", "need 0 <= WMIN < WMAX"),
    (["--teacher-steps", "8", "--teacher-guidance-range", "1"], "cond", "give two scales WMIN,WMAX"),
])
def test_bad_input_is_one_line_exit_2(setup, capsys, extra, teacher, message):
    from trainer.distill.__main__ import main
    if teacher == "missing.safetensors":
        teacher = os.path.join(setup["out"], teacher)
    elif teacher:
        teacher = setup[teacher]
    with pytest.raises(SystemExit) as e:
        main(_distill(setup, *extra, teacher=teacher))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_the_objective_checks_the_teacher_against_the_read_time_resize(setup):
    from trainer.config import parse_config
    from trainer.objective import get_objective
    cfg = parse_config(["--objective", "distill", "--teacher", setup["teacher"], "--teacher-steps", "4",
                        "--data", setup["data"], "--run-dir", "unused", "--data-image-size", "8"])
    from data.cli import UsageError
    with pytest.raises(UsageError, match="trained on 16 px images but the data are 8 px"):
        get_objective("distill")(cfg)


def test_round_plan_and_the_cluster_job_refuses_a_missing_teacher():
    from trainer.distill.__main__ import plan_rounds, round_dir
    assert plan_rounds(8, 2, True) == [(8, 1), (8, 2), (4, 2)] and plan_rounds(256, 4, False)[-1] == (8, 2)
    assert os.path.basename(round_dir("o", 0, 8, 1)) == "round00-8v"
    assert os.path.basename(round_dir("o", 3, 8, 2)) == "round03-8to4"
    env = {k: v for k, v in ENV.items() if k != "TEACHER"}
    r = subprocess.run(["bash", "cluster/distill.sbatch"], cwd=ROOT, env=dict(env, SLURM_JOB_ID="1"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "TEACHER= is not a file" in r.stderr, r.stderr


def test_sweep_steps_samples_conditional_models_with_labels_and_guidance(setup, tmp_path, capsys):
    """A class-conditional teacher (CFG at --guidance-scale) beside a student distilled at sampled scales (the scale
    is its input w): balanced labels, the scale in the rows' names, bad mixes refused with one line."""
    import numpy as np
    from evaluations.sweep_steps import main as sweep_main
    from trainer.export import save_exported
    torch.manual_seed(2)
    cfg = micro(16, num_classes=10, guidance_embed=True)
    student = str(tmp_path / "student.safetensors")
    save_exported(student, perturbed(cfg.build(), 0.05).state_dict(), cfg.to_dict(),
                  {"steps": 64, "noise_schedule": "cosine", "learn_sigma": True, "model_mean_type": "v",
                   "distilled_steps": 2}, step=0, ema="model")
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    sw = str(tmp_path / "sweep")

    def sweep(*extra: str, teacher: str = setup["cond"]) -> int:
        return sweep_main(["--teacher", teacher, "--students", student, "--reference", ref, "--ddim", "2",
                           "--num-samples", "6", "--batch-size", "3", "--out-dir", sw, "--no-progress", *extra])
    assert sweep("--guidance-scale", "2") == 0 and sweep("--guidance-scale", "0") == 0
    with open(os.path.join(sw, "sweep_steps.json")) as f:
        report = json.load(f)
    assert [(r["name"], r["guidance"]) for r in report["rows"]] == [("teacher_ddim2_w0", "conditional"),
                                                                     ("student2_w0", "input w 0")]
    s = {w: np.load(os.path.join(sw, "samples", f"teacher_ddim2_w{w}.npz")) for w in (0, 2)}
    assert s[0]["arr_1"].tolist() == [0, 1, 2, 3, 4, 5] and not np.array_equal(s[0]["arr_0"], s[2]["arr_0"])
    t = {w: np.load(os.path.join(sw, "samples", f"student2_w{w}.npz"))["arr_0"] for w in (0, 2)}
    assert not np.array_equal(t[0], t[2])  # the student's input w matters
    capsys.readouterr()
    for bad, message in ((lambda: sweep(teacher=setup["teacher"]), "all be class-conditional or all unconditional"),
                         (lambda: sweep_main(["--teacher", setup["teacher"], "--reference", ref, "--ddim", "2",
                                              "--out-dir", sw, "--guidance-scale", "1"]), "is unconditional")):
        with pytest.raises(SystemExit) as e:
            bad()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
