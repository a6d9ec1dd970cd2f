"""evaluations.classify (clean and noised accuracy, sample batches as data) and evaluations.sweep_guidance (the
table and plot of a small grid), on tiny exports; bad input gives one line and exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion.classifier import get_classifier_config
from diffusion.presets import get_config

DIFF = {"steps": 100, "noise_schedule": "cosine", "learn_sigma": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """An unconditional tiny16 UNet, a classifier whose logits are a fixed function of the mean colour (so its
    clean accuracy on made-up images is known), and labelled images."""
    from data.fsio import atomic_save_npz
    from trainer.export import save_exported
    d = tmp_path_factory.mktemp("clfeval")
    torch.manual_seed(0)
    out = {"model": str(d / "uncond.safetensors"), "clf": str(d / "clf.safetensors"), "data": str(d / "data.npz")}
    cfg = get_config("tiny16", num_classes=None)
    unet = cfg.build()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_exported(out["model"], unet.state_dict(), cfg.to_dict(), DIFF, step=0, ema="model")
    ccfg = get_classifier_config("tiny16", num_classes=2, pool="adaptive")
    clf = ccfg.build()
    state = clf.state_dict()
    save_exported(out["clf"], state, ccfg.to_dict(), DIFF, step=0, ema="model")
    rng = np.random.default_rng(0)
    atomic_save_npz(out["data"], arr_0=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8),
                    arr_1=np.arange(24) % 2)
    return out


def _main(prog: str, argv: list[str]) -> int:
    import importlib
    try:
        return importlib.import_module(prog).main(argv)
    except SystemExit as e:
        return int(e.code)


def test_classify_accuracy_on_npz_and_quartiles(files, tmp_path, capsys) -> None:
    from evaluations.classify import classify
    # A zero-initialised adaptive head gives equal logits: argmax is class 0, so the accuracy is the share of 0s.
    r = classify(files["clf"], files["data"], t_quartiles=True, device="cpu")
    assert r["images"] == 24 and r["classes"] == 2 and r["accuracy"] == 0.5
    assert [q["t"] for q in r["quartiles"]] == [[0, 25], [25, 50], [50, 75], [75, 100]]
    assert all(q["accuracy"] == 0.5 for q in r["quartiles"])
    out = tmp_path / "r.json"
    assert _main("evaluations.classify", ["--model", files["clf"], "--data", files["data"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"] == 0.5 and "accuracy 0.5000" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--model", "{model}", "--data", "{data}"], "is a diffusion model (UNet), not a classifier"),
    (["--model", "{clf}", "--data", "{model}"], "not a readable .npz"),
    (["--model", "{clf}", "--data", "{tmp}/x.npz"], "no such file"),
])
def test_classify_bad_input(files, tmp_path, capsys, args, message) -> None:
    argv = [a.format(tmp=tmp_path, **files) for a in args]
    if "{data}" not in args[3] and "{tmp}" not in args[3]:
        argv[3] = files["model"][:-len("safetensors")] + "npz"
        np.savez(argv[3], arr_0=np.zeros(3, dtype=object))  # pickled objects are refused
        message = "pickled"
    assert _main("evaluations.classify", argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_sweep_guidance_table_and_plot(files, tmp_path) -> None:
    from evaluations.sweep_guidance import main
    rng = np.random.default_rng(1)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "sweep"
    argv = ["--model", files["model"], "--classifier", files["clf"], "--judge", files["clf"], "--reference", str(ref),
            "--classifier-scales", "0,3", "--num-samples", "6", "--batch-size", "3", "--ddim", "2", "--out-dir",
            str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "sweep_guidance.json").read_text())
    rows = report["rows"]
    assert [(r["classifier_scale"], r["guidance_scale"]) for r in rows] == [(0.0, 0.0), (3.0, 0.0)]
    assert all(r["fid"] > 0 and 0 <= r["precision"] <= 1 and r["judge_accuracy"] == 0.5 for r in rows)
    assert (out / "sweep_guidance.png").stat().st_size > 1000 and "| 3 | 0 |" in (out / "sweep_guidance.md").read_text()
    labels = np.load(out / "samples" / "clf3_cfg0_ddim.npz")["arr_1"]
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert _main("evaluations.sweep_guidance", [*argv[:-1], "--classifier-scales", "-1"]) == 2


def test_sweep_guidance_grid_of_both_guidances_on_a_conditional_model(files, tmp_path) -> None:
    """A class-conditional model: the grid classifier scale x classifier-free scale, one row per point; at w = s = 0
    the samples equal plain evaluations.sample's, and classifier-free guidance changes them."""
    from evaluations.sample import sample
    from evaluations.sweep_guidance import main
    from trainer.export import save_exported
    torch.manual_seed(1)
    cfg = get_config("tiny16", num_classes=2)
    unet = cfg.build()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = str(tmp_path / "cond.safetensors")
    save_exported(model, unet.state_dict(), cfg.to_dict(), DIFF, step=0, ema="model")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(1).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "sweep"
    assert main(["--model", model, "--classifier", files["clf"], "--judge", files["clf"], "--reference", str(ref),
                 "--classifier-scales", "0,2", "--guidance-scales", "0,3", "--num-samples", "4", "--batch-size", "4",
                 "--ddim", "2", "--out-dir", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "sweep_guidance.json").read_text())["rows"]
    assert [(r["classifier_scale"], r["guidance_scale"]) for r in rows] == [(0, 0), (2, 0), (0, 3), (2, 3)]
    assert all(np.isfinite(r["fid"]) and 0 <= r["recall"] <= 1 for r in rows)
    images = {f: np.load(out / "samples" / f)["arr_0"] for f in ("clf0_cfg0_ddim.npz", "clf0_cfg3_ddim.npz")}
    plain = sample(model, 4, batch_size=4, ddim=2, labels=np.arange(4) % 2, progress=False, device="cpu")
    assert np.array_equal(images["clf0_cfg0_ddim.npz"], plain.images)
    assert not np.array_equal(images["clf0_cfg3_ddim.npz"], plain.images)


def test_sweep_guidance_bad_input(files, tmp_path, capsys) -> None:
    def main(argv: list[str]) -> int:
        return _main("evaluations.sweep_guidance", argv)
    assert main(["--model", files["model"], "--classifier-scales", "0,2", "--data", "x", "--out-dir",
                 str(tmp_path)]) == 2
    assert "need --classifier" in capsys.readouterr().err
    assert main(["--model", files["model"], "--classifier", files["clf"], "--guidance-scales", "0,1", "--data", "x",
                 "--out-dir", str(tmp_path)]) == 2
    assert "class-conditional model" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_classifier.sbatch", "sweep_guidance.sbatch"])
def test_sbatch_scripts_outside_slurm_fail_with_one_line(script: str) -> None:
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", f"cluster/{script}"], cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: run this script with sbatch (SLURM_JOB_ID is not set)"


def test_pipeline_with_guidance_chains_classifier_and_sweep() -> None:
    import os
    import shutil
    import subprocess
    from pathlib import Path
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not installed")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", "cluster/pipeline.sh", "--dry-run", "--with-guidance"], cwd=repo, env=env,
                       capture_output=True, text=True)
    lines = dict(ln.split(": ", 1) for ln in p.stdout.strip().splitlines())
    assert list(lines) == ["prepare", "train", "sample", "evaluate", "classifier", "sweep_guidance"]
    assert "--dependency=afterok:<prepare job id> cluster/train_classifier.sbatch" in lines["classifier"]
    assert "--dependency=afterok:<sample job id>:<classifier job id> cluster/sweep_guidance.sbatch" in \
        lines["sweep_guidance"]
