"""evaluations.sweep_ema (post-hoc EMA sweep) on a hand-built tiny run, and the `pixels` feature extractor."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
TRACKED = ("0.05", "0.10")
STEPS = (100, 200, 300, 400)


# ------------------------------------------------------------------------------------------------ pixels

def test_pixels_extractor_shapes_and_values():
    from data.cli import UsageError
    from evaluations.features import PixelsExtractor, area_matrix, create_extractor
    net = create_extractor("pixels")
    assert isinstance(net, PixelsExtractor) and not net.comparable and net.name.startswith("pixels")
    x = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    out = net(x)
    assert out["pool"].shape == (5, 16 * 16 * 3) and out["spatial"].shape == (5, 768) and out["logits"].shape == (5, 1)
    assert torch.equal(out["pool"], x.reshape(5, -1).float() / 255)          # unchanged pixels, HWC order, [0, 1]
    big = torch.randint(0, 256, (3, 64, 48, 3), dtype=torch.uint8)
    pool = net(big)["pool"]
    assert pool.shape == (3, 32 * 32 * 3)
    # 64 -> 32 rows is a 2x2 block mean along rows; 48 -> 32 columns weighs pixels 2/3, 1/3 | 1/3, 2/3.
    ref = torch.einsum("oh,bhwc,pw->bopc", area_matrix(64, 32).float(), big.float() / 255, area_matrix(48, 32).float())
    assert torch.allclose(pool, ref.reshape(3, -1), atol=1e-6)
    assert torch.allclose(area_matrix(64, 32)[0, :2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(area_matrix(48, 32)[:2, :3], torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]],
                                                                    dtype=torch.float64))
    assert torch.allclose(area_matrix(37, 32).sum(1), torch.ones(32, dtype=torch.float64))
    with pytest.raises(UsageError, match="pixels"):
        create_extractor("nope")


def test_pixels_fid_of_a_batch_against_itself(tmp_path):
    from evaluations.evaluate import evaluate
    from evaluations.features import PixelsExtractor, extract
    from evaluations.metrics import frechet_distance
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 16, 16, 3), dtype=np.uint8)
    f = extract(images, PixelsExtractor(), batch_size=64)
    assert f["pool"].shape == (200, 768) and f["sigma"].shape == (768, 768)
    assert abs(frechet_distance(f["mu"], f["sigma"], f["mu"], f["sigma"])) < 1e-6 * np.trace(f["sigma"])
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez(tmp_path / "b.npz", arr_0=np.clip(images.astype(int) + 40, 0, 255).astype(np.uint8))
    r = evaluate(str(tmp_path / "a.npz"), [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], features="pixels",
                 splits=2, progress=False, device="cpu")
    same, shifted = r["batches"]
    assert abs(same["fid"]) < 1e-3 and same["precision"] == same["recall"] == 1.0
    assert shifted["fid"] > 1.0 and same["is"] == pytest.approx(1.0)       # no classifier: IS is 1
    assert r["features"] == "pixels-v1-max32" and r["comparable_to_published"] is False


# ------------------------------------------------------------------------------------------------ a tiny run

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


def make_run(run: str, snapshots: bool = True) -> None:
    """A run folder as training with --phema 0.05,0.10 leaves it: checkpoints/step_00000400/meta.json (tiny16,
    10 classes, learned sigma, 50 diffusion steps), checkpoints/latest, and phema snapshots at STEPS holding
    random but close weights (one base model plus N(0, 0.01^2) noise per snapshot and sigma_rel)."""
    from diffusion.presets import get_config
    from trainer.phema import write_snapshot
    cfg = get_config("tiny16", num_classes=10, learn_sigma=True)
    ck = os.path.join(run, "checkpoints", "step_00000400")
    os.makedirs(ck)
    with open(os.path.join(ck, "meta.json"), "w") as f:
        json.dump({"step": STEPS[-1], "model": cfg.to_dict(), "ema_rates": [],
                   "diffusion": {"steps": 50, "noise_schedule": "cosine", "learn_sigma": True}}, f)
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000400\n")
    if not snapshots:
        return
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = cfg.build().state_dict()
    for step in STEPS:
        states = {s: {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                      for k, v in base.items()} for s in TRACKED}
        write_snapshot(run, step, states, dtype="fp32")


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from evaluations.sweep_ema import main
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(run with snapshots, run without snapshots)."""
    root = tmp_path_factory.mktemp("sweep")
    make_run(str(root / "run"))
    make_run(str(root / "bare"), snapshots=False)
    return str(root / "run"), str(root / "bare")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The bundled digits at 16 px -> the held-out manifest."""
    root = tmp_path_factory.mktemp("digits")
    r = subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(root), "--size", "16",
                        "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr
    return str(root / "val-manifest.json")


def test_bad_input_one_line_exit_2(runs, tmp_path, capsys):
    run, bare = runs
    out = str(tmp_path / "out")
    cases = [
        ([bare, "--sigma-rel", "0.05", "--data", "x"], "no post-hoc EMA snapshots"),
        ([run, "--sigma-rel", "0.05,,0.1", "--data", "x"], "comma-separated"),
        ([run, "--sigma-rel", "0.05,abc", "--data", "x"], "not a number"),
        ([run, "--sigma-rel", "0.5", "--data", "x"], "out of range"),
        ([run, "--sigma-rel", "0.05", "--data", str(tmp_path / "missing-manifest.json")], "--data"),
        ([str(tmp_path / "nope"), "--sigma-rel", "0.05", "--data", "x"], "does not exist"),
        ([run, "--sigma-rel", "0.05", "--data", "x", "--num-samples", "2"], "--num-samples"),
        ([run, "--sigma-rel", "0.05", "--data", "x", "--at-step", "5000"], "outside the snapshots"),
        ([run, "--sigma-rel", "0.05", "--data", "x", "--features", "clip"], "invalid choice"),
        ([run, "--data", "x"], "--sigma-rel"),
    ]
    for argv, what in cases:
        code, stdout, err = _cli(argv + ["--out-dir", out, "--no-progress"], capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and "evaluations.sweep_ema: error:" in err and what in err, err
    assert not os.path.exists(os.path.join(out, "sweep_ema.json"))


@pytest.mark.slow
def test_sweep_end_to_end(runs, digits, tmp_path, capsys):
    from safetensors.torch import load_file
    from evaluations.sweep_ema import sweep_ema
    from trainer.phema import reconstruct, sigma_rel_to_gamma
    torch.set_num_threads(1)
    run, _ = runs
    out = tmp_path / "sweep"
    argv = [run, "--sigma-rel", "0.05,0.1", "--data", digits, "--out-dir", str(out), "--num-samples", "16",
            "--batch-size", "8", "--respace", "4", "--nll-images", "8", "--device", "cpu", "--no-progress"]
    code, stdout, err = _cli(argv, capsys)
    assert code == 0, err
    for name in ("sweep_ema.md", "sweep_ema.json", "sweep_ema.png", "reference.npz",
                 "models/phema_0.05.safetensors", "models/phema_0.05.json", "models/phema_0.1.safetensors",
                 "models/phema_0.1.json", "samples/phema_0.05.npz", "samples/phema_0.1.npz"):
        assert (out / name).is_file(), name
    assert (out / "sweep_ema.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The exports are the reconstruction, with the run's config and the step of the last snapshot.
    want = reconstruct(run, ["0.05", "0.1"])
    for s in ("0.05", "0.1"):
        got = load_file(str(out / f"models/phema_{s}.safetensors"))
        assert set(got) == set(want[s]) and all(torch.equal(got[k], want[s][k]) for k in got)
        meta = json.loads((out / f"models/phema_{s}.json").read_text())
        assert meta["step"] == 400 and meta["ema"] == f"phema_{s}" and meta["diffusion"]["steps"] == 50

    # Reference = every held-out image; samples: balanced labels and the same noise for every length.
    ref = np.load(out / "reference.npz")
    assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (359, 16, 16, 3)
    a, b = np.load(out / "samples/phema_0.05.npz"), np.load(out / "samples/phema_0.1.npz")
    assert a["arr_0"].shape == (16, 16, 16, 3) and np.array_equal(a["arr_1"], np.arange(16) % 10)
    assert np.array_equal(a["arr_1"], b["arr_1"])

    rep = json.loads((out / "sweep_ema.json").read_text())
    rows = rep["rows"]
    assert [r["sigma_rel"] for r in rows] == ["0.05", "0.1"] and rep["step"] == 400
    assert rep["snapshot_steps"] == list(STEPS)
    for r in rows:
        assert r["gamma"] == pytest.approx(sigma_rel_to_gamma(r["sigma_rel"]))
        assert all(np.isfinite(r[k]) for k in ("bpd", "fid", "precision", "recall")) and r["nll_images"] == 8
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["bpd"] > 0 and not r["reused"]
    assert rep["best_fid"] == min(rows, key=lambda r: r["fid"])["sigma_rel"]
    assert rep["best_nll"] == min(rows, key=lambda r: r["bpd"])["sigma_rel"]

    md = (out / "sweep_ema.md").read_text()
    assert md == stdout
    lines = md.splitlines()
    head = lines.index("| sigma_rel | gamma | bits/dim | FID | precision | recall |")
    table = lines[head + 2:head + 4]
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["sigma_rel"] and float(cells[1]) == pytest.approx(r["gamma"], abs=1e-3)
        assert float(cells[2]) == pytest.approx(r["bpd"], abs=1e-4) and float(cells[3]) == pytest.approx(r["fid"],
                                                                                                        abs=1e-3)
    assert lines[head + 4] == ""
    assert lines[head + 5].startswith(f"Best by FID: sigma_rel {rep['best_fid']} (FID ")
    assert f"best by NLL: sigma_rel {rep['best_nll']} (" in lines[head + 5]

    # The Python entry point on the same folder reuses every finished length and returns what the CLI wrote.
    again = sweep_ema(run, "0.05,0.1", data=digits, out_dir=str(out), num_samples=16, batch_size=8, respace="4",
                      nll_images=8, device="cpu", progress=False)
    assert all(r["reused"] for r in again["rows"])
    assert [{k: v for k, v in r.items() if k != "reused"} for r in again["rows"]] == \
        [{k: v for k, v in r.items() if k != "reused"} for r in rows]
