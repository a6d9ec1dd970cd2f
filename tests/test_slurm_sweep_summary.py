"""Fast checks of the cluster helpers that need no SLURM: the sweep recipe (cluster/sweep_point.py), the sweep
summary (evaluations.sweep_summary) on run folders laid out as the trainer writes them, and the command-line
behaviour of cluster/pipeline.sh and the sbatch scripts outside SLURM."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.presets import get_config
from evaluations.sweep_summary import main as summary_main
from evaluations.sweep_summary import read_run

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _load_sweep_point():
    spec = importlib.util.spec_from_file_location("sweep_point", REPO / "cluster" / "sweep_point.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SWEEP_POINT = _load_sweep_point()


def _point(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """cluster/sweep_point.py's main() in this process (imports once): (returncode, stdout, stderr)."""
    try:
        code = SWEEP_POINT.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_sweep_point_scales_lr_with_inverse_sqrt_channels(capsys: pytest.CaptureFixture) -> None:
    for preset, channels in (("30M", 64), ("270M", 192)):
        p = _point(capsys, preset, "--base-lr", "1e-4", "--global-batch", "128", "--total-steps", "1000")
        assert p.returncode == 0, p.stderr
        flags = p.stdout.split()
        assert flags[0::2] == ["--lr", "--global-batch", "--total-steps"]
        assert math.isclose(float(flags[1]), 1e-4 * math.sqrt(128 / channels), rel_tol=1e-8)
        assert (flags[3], flags[5]) == ("128", "1000")


def test_sweep_point_fixed_compute_gives_fewer_steps_to_bigger_models(capsys: pytest.CaptureFixture) -> None:
    budget = 3e15
    pts = {}
    for preset in ("tiny16", "tiny32"):
        p = _point(capsys, preset, "--compute", str(budget), "--global-batch", "8", "--describe")
        assert p.returncode == 0, p.stderr
        pts[preset] = json.loads(p.stdout)
    for pt in pts.values():
        per_step = 3 * pt["forward_flops_per_image"] * 8
        assert pt["total_steps"] == int(budget // per_step)
        assert budget - per_step < pt["train_flops"] <= budget
    assert pts["tiny32"]["forward_flops_per_image"] > pts["tiny16"]["forward_flops_per_image"]
    assert pts["tiny32"]["total_steps"] < pts["tiny16"]["total_steps"]


@pytest.mark.parametrize("args, needle", [(["7M"], "unknown model preset '7M'"),
                                          (["30M", "--total-steps", "0"], "must be positive"),
                                          (["30M", "--total-steps", "5", "--compute", "1e9"], "not allowed")])
def test_sweep_point_bad_input_is_one_line_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    p = _point(capsys, *args)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr


def _fake_run(root: Path, name: str, preset: str, step: int, batch: int, fid: float | None,
              bpd: float | None) -> Path:
    """A run folder in the trainer's checkpoint layout (config.json + meta.json) with evaluation outputs."""
    run = root / name
    ck = run / "checkpoints" / f"step_{step:08d}"
    ck.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(ck.name + "\n")
    (ck / "config.json").write_text(json.dumps({"model": {"size": preset, "image_size": 16, "num_classes": 10},
                                                "optim": {"global_batch": batch, "lr": 2e-3}}))
    model = get_config(preset, image_size=16).to_dict()
    (ck / "meta.json").write_text(json.dumps({"step": step, "model": model}))
    if fid is not None:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps({"features": "standin", "batches": [{"fid": fid}]}))
    if bpd is not None:
        (run / "nll").mkdir()
        (run / "nll" / "nll.json").write_text(json.dumps({"bpd": bpd}))
    return run


def test_summary_reads_runs_and_writes_table_plot_json_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "tiny16", "tiny16", step=12, batch=8, fid=120.5, bpd=3.25)
    _fake_run(sweep, "tiny32", "tiny32", step=10, batch=8, fid=99.0, bpd=None)
    (sweep / "summary").mkdir(parents=True)  # not a run: ignored
    out = tmp_path / "out"
    assert summary_main([str(sweep), "--out-dir", str(out)]) == 0
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["tiny16", "tiny32"]  # sorted by parameter count
    for r, preset, step in zip(rows, ("tiny16", "tiny32"), (12, 10)):
        model = get_config(preset, image_size=16).build()
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert r["step"] == step
        assert r["train_flops"] == 3 * r["forward_flops_per_image"] * 8 * step
    assert rows[0]["fid"] == 120.5 and rows[0]["nll_bpd"] == 3.25 and rows[1]["nll_bpd"] is None
    md = (out / "scaling.md").read_text()
    assert "| tiny16 | tiny16 |" in md and "| 120.50 | 3.2500 |" in md and "| 99.00 | n/a |" in md
    assert "stand-in network" in md
    assert (out / "scaling.csv").read_text().splitlines()[0].startswith("run,preset,model_channels,params")
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny32 | tiny32 |" in capsys.readouterr().out


def test_summary_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    p = subprocess.run([PY, "-m", "evaluations.sweep_summary", str(tmp_path), "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.strip() == f"evaluations.sweep_summary: error: no run directories (with checkpoints/) in {tmp_path}"
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(Exception, match="no checkpoints/latest"):
        read_run(str(run))


def test_pipeline_help_and_bad_arguments() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    h = subprocess.run(["bash", "cluster/pipeline.sh", "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert h.returncode == 0 and "--dependency=afterok" in h.stdout
    for args, msg in ((["--bogus"], "error: unknown argument '--bogus' (see cluster/pipeline.sh --help)"),
                      (["--after", "x"], "error: --after needs a numeric job id")):
        p = subprocess.run(["bash", "cluster/pipeline.sh", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.strip() == msg


def test_pipeline_dry_run_chains_the_four_stages_with_afterok() -> None:
    p = subprocess.run(["bash", "cluster/pipeline.sh", "--dry-run", "--sbatch-args", "--partition=gpu"], cwd=REPO,
                       capture_output=True, text=True)
    if p.returncode == 2 and "sbatch not found" in p.stderr:
        pytest.skip("sbatch not installed")
    lines = p.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["prepare", "train", "sample", "evaluate"]
    assert "--dependency" not in lines[0]
    for prev, line in zip(("prepare", "train", "sample"), lines[1:]):
        assert f"--dependency=afterok:<{prev} job id>" in line and "--partition=gpu" in line


@pytest.mark.parametrize("script", ["train_imagenet64.sbatch", "sweep_model_size.sbatch", "sample.sbatch",
                                    "evaluate.sbatch", "prepare_imagenet64.sbatch"])
def test_sbatch_scripts_outside_slurm_fail_with_one_line(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", f"cluster/{script}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: run this script with sbatch (SLURM_JOB_ID is not set)"]


def test_cluster_shell_scripts_pass_shellcheck() -> None:
    import shutil

    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "cluster").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {"cluster/train_imagenet64.sbatch", "cluster/train_classifier.sbatch", "cluster/distill.sbatch",
            "cluster/sweep_guidance.sbatch", "cluster/common.sh"} <= set(scripts)  # every script is linted
    p = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR/..", "-s", "bash", *scripts], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
