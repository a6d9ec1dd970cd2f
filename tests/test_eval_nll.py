"""evaluations.nll on digits shards with a tiny model, and the whole chain sample -> NLL -> evaluate (stand-in)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(exported tiny16 path, digits val manifest) — random weights, real digits shards from data.prepare."""
    from diffusion.presets import get_config
    from trainer.export import save_exported
    root = tmp_path_factory.mktemp("nll")
    r = subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(root / "digits"),
                        "--size", "16", "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr
    torch.manual_seed(1)
    cfg = get_config("tiny16")
    model = str(root / "tiny16.safetensors")
    save_exported(model, cfg.build().state_dict(), cfg.to_dict(),
                  {"steps": 100, "noise_schedule": "cosine", "learn_sigma": True}, step=0, ema="model")
    return model, str(root / "digits" / "val-manifest.json")


def _main(argv: list[str]) -> int:
    from evaluations.nll import main
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_nll_single_rank_against_direct_bound(setup, tmp_path):
    from data.seeds import derive_seed
    from data.stream import EvalStream
    from diffusion import create_diffusion
    from trainer.export import load_exported
    torch.set_num_threads(1)
    model_path, val = setup
    out = tmp_path / "nll"
    assert _main(["--model", model_path, "--data", val, "--out-dir", str(out), "--respace", "4", "--num-images", "6",
                  "--batch-size", "6", "--threads", "1", "--no-progress", "--seed", "2"]) == 0
    rep = json.loads((out / "nll.json").read_text())
    per = np.load(out / "per_image.npz")
    assert rep["images"] == 6 and per["index"].tolist() == list(range(6))
    # The report is self-consistent: mean of per-image totals, and prior + sum of the L_t table.
    csv = np.loadtxt(out / "nll_terms.csv", delimiter=",", skiprows=1)
    assert csv.shape == (4, 4)
    assert rep["bpd"] == pytest.approx(per["total_bpd"].mean(), rel=1e-12)
    assert rep["bpd"] == pytest.approx(rep["prior_bpd"] + csv[:, 2].sum(), rel=1e-6)
    assert rep["decoder_bpd"] == pytest.approx(csv[0, 2], rel=1e-6)
    assert rep["bpd_stderr"] == pytest.approx(per["total_bpd"].std(ddof=1) / np.sqrt(6), rel=1e-9)
    model, dkw, _ = load_exported(model_path)
    diffusion = create_diffusion(**{**dkw, "timestep_respacing": "4"})
    assert csv[:, 1].astype(int).tolist() == list(diffusion.timestep_map)
    assert (out / "nll_terms.png").stat().st_size > 1000 and "NLL bound" in (out / "nll.md").read_text()
    # Same numbers straight from calc_bpd_loop with the same images and noise generator.
    x, y, _ = next(iter(EvalStream(val, 6)))
    g = torch.Generator().manual_seed(derive_seed(2, 0))      # rank 0's forward-process noise
    direct = diffusion.calc_bpd_loop(model, x, model_kwargs={"y": y}, generator=g)
    assert np.allclose(per["total_bpd"], direct["total_bpd"].double().numpy(), rtol=1e-6)
    assert 0 < rep["bpd"] < 50 and rep["prior_bpd"] < 1e-3     # cosine schedule: prior term near 0


def test_python_entry_point_returns_what_the_cli_writes(setup, tmp_path):
    """nll(...) from Python gives the per-image numbers, L_t table and report that the CLI writes to DIR."""
    from evaluations.nll import NLL, nll
    model_path, val = setup
    out = tmp_path / "cli"
    assert _main(["--model", model_path, "--data", val, "--out-dir", str(out), "--respace", "3", "--num-images", "5",
                  "--batch-size", "3", "--threads", "1", "--no-progress", "--seed", "4", "--no-clip"]) == 0
    r = nll(model_path, val, respace="3", num_images=5, batch_size=3, seed=4, clip=False, threads=1, progress=False)
    assert isinstance(r, NLL) and not (tmp_path / "nll.json").exists()
    per = np.load(out / "per_image.npz")
    assert r.index.dtype == np.int64 and r.index.tolist() == list(range(5))
    for key in ("index", "total_bpd", "prior_bpd", "decoder_bpd"):
        assert np.array_equal(getattr(r, key), per[key]), key
    csv = np.loadtxt(out / "nll_terms.csv", delimiter=",", skiprows=1)
    assert r.terms_bpd.shape == r.timesteps.shape == (3,)
    assert r.timesteps.tolist() == csv[:, 1].astype(int).tolist()
    assert np.allclose(r.terms_bpd, csv[:, 2], rtol=1e-7, atol=0)
    rep = json.loads((out / "nll.json").read_text())
    timing = ("seconds", "images_per_second", "date")
    assert set(r.report) == set(rep) and rep["clip_denoised"] is False
    assert {k: v for k, v in r.report.items() if k not in timing} == {k: v for k, v in rep.items() if k not in timing}
    assert r.report["bpd"] == pytest.approx(r.total_bpd.mean(), rel=1e-12)


@pytest.mark.distributed
def test_nll_two_ranks_every_image_once(setup, tmp_path):
    model_path, val = setup
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "evaluations.nll", "--model", model_path, "--data", val, "--out-dir",
           str(tmp_path / "n2"), "--respace", "2", "--num-images", "11", "--batch-size", "4", "--threads", "1",
           "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    per = np.load(tmp_path / "n2" / "per_image.npz")
    assert per["index"].tolist() == list(range(11))
    rep = json.loads((tmp_path / "n2" / "nll.json").read_text())
    assert rep["ranks"] == 2 and rep["images"] == 11 and np.isfinite(rep["bpd"])


def test_nll_bad_input(setup, tmp_path, capsys):
    model_path, val = setup
    assert _main(["--model", model_path, "--data", str(tmp_path / "none.json"), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluations.nll: error: --data") and err.count("\n") == 1
    assert _main(["--model", model_path, "--data", val, "--out-dir", str(tmp_path), "--respace", "1000"]) == 2
    assert "--respace" in capsys.readouterr().err
    assert _main(["--help"]) == 0 and "--num-images" in capsys.readouterr().out


def test_end_to_end_sample_then_evaluate(setup, tmp_path):
    """Tiny model -> 20 samples -> metrics against 40 real digits with the stand-in extractor (NLL: tests above)."""
    from data.stream import EvalStream
    from evaluations import evaluate, sample
    torch.set_num_threads(1)
    model_path, val = setup
    samples = tmp_path / "samples.npz"
    assert sample.main(["--model", model_path, "--num-samples", "20", "--batch-size", "10", "--respace", "5",
                        "--out", str(samples), "--threads", "1", "--no-progress"]) == 0
    x, y, _ = next(iter(EvalStream(val, 40)))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(),
             arr_1=y.numpy())
    assert evaluate.main(["--reference", str(ref), str(samples), "--out-dir", str(tmp_path / "eval"),
                          "--features", "standin", "--no-cache", "--splits", "2"]) == 0
    row = json.loads((tmp_path / "eval" / "metrics.json").read_text())["batches"][0]
    assert row["images"] == 20 and row["fid"] > 0 and row["sfid"] > 0 and row["is"] >= 1
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
