"""evaluations.sample on a tiny randomly initialised model: format, determinism, 2 ranks == 1 rank, resume, errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    import torch
    from diffusion.presets import get_config
    from trainer.export import save_exported
    torch.manual_seed(0)
    cfg = get_config("tiny16")
    path = str(tmp_path_factory.mktemp("model") / "tiny16.safetensors")
    save_exported(path, cfg.build().state_dict(), cfg.to_dict(),
                  {"steps": 100, "noise_schedule": "cosine", "learn_sigma": True}, step=0, ema="model")
    return path


def _cmd(model: str, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evaluations.sample", "--model", model, "--out", str(out), "--threads", "1",
            "--no-progress", *extra]


def _main(argv: list[str]) -> int:
    from evaluations.sample import main
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_format_and_determinism(model_path, tmp_path):
    args = ["--num-samples", "7", "--batch-size", "3", "--respace", "5", "--seed", "3"]
    assert _main(_cmd(model_path, tmp_path / "a.npz", *args)[3:]) == 0
    assert _main(_cmd(model_path, tmp_path / "b.npz", *args)[3:]) == 0
    assert _main(_cmd(model_path, tmp_path / "c.npz", *args[:-1], "4")[3:]) == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in "abc")
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (7, 16, 16, 3)
    assert a["arr_1"].dtype == np.int64 and a["arr_1"].shape == (7,) and 0 <= a["arr_1"].min() <= a["arr_1"].max() < 10
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    assert a["arr_0"].std() > 5                     # not a constant image
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["images_per_second"] > 0 and rep["settings"]["timestep_respacing"] == "5"
    assert not (tmp_path / "a.npz.parts").exists()


def test_ddim_guidance_and_fixed_class(model_path, tmp_path):
    out = tmp_path / "g.npz"
    assert _main(_cmd(model_path, out, "--num-samples", "3", "--batch-size", "2", "--ddim", "4", "--eta", "0.5",
                      "--guidance-scale", "1.5", "--class-label", "7")[3:]) == 0
    f = np.load(out)
    assert f["arr_0"].shape == (3, 16, 16, 3) and (f["arr_1"] == 7).all()
    labels = tmp_path / "labels.npy"
    np.save(labels, np.array([1, 2, 3]))
    assert _main(_cmd(model_path, tmp_path / "l.npz", "--num-samples", "3", "--ddim", "2", "--labels",
                      str(labels))[3:]) == 0
    assert np.load(tmp_path / "l.npz")["arr_1"].tolist() == [1, 2, 3]


def test_python_entry_point_returns_what_the_cli_writes(model_path, tmp_path):
    """sample(...) from Python returns the arrays and report the CLI writes; parts_dir and reuse as the CLI uses them."""
    from data.cli import UsageError
    from evaluations.sample import Samples, sample
    out = tmp_path / "cli.npz"
    assert _main(_cmd(model_path, out, "--num-samples", "5", "--batch-size", "2", "--respace", "4", "--seed", "7",
                      "--no-clip")[3:]) == 0
    f, rep = np.load(out), json.loads((tmp_path / "cli.json").read_text())
    kw = dict(batch_size=2, respace="4", seed=7, clip=False, threads=1, progress=False)
    s = sample(model_path, 5, **kw)
    assert isinstance(s, Samples) and not s.reused
    assert s.images.dtype == np.uint8 and s.images.shape == (5, 16, 16, 3) and s.labels.dtype == np.int64
    assert np.array_equal(s.images, f["arr_0"]) and np.array_equal(s.labels, f["arr_1"])
    assert s.report["settings"] == rep["settings"] and rep["settings"]["clip_denoised"] is False
    assert set(rep) == set(s.report) | {"out"} and s.report["shape"] == rep["shape"] == [5, 16, 16, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.json", "cli.npz"]    # in memory: nothing written
    # A resume folder holds every batch and the settings; the result is the same.
    parts = tmp_path / "parts"
    p = sample(model_path, 5, parts_dir=str(parts), **kw)
    assert np.array_equal(p.images, f["arr_0"]) and np.array_equal(p.labels, f["arr_1"])
    assert sorted(x.name for x in parts.iterdir()) == [f"batch-{b:07d}.npz" for b in range(3)] + ["settings.json"]
    again = sample(model_path, 5, parts_dir=str(parts), **kw)
    assert again.report["resumed_batches"] == 3 and again.report["sampled_this_run"] == 0
    # A finished output with the same settings is returned as it is, and the CLI then leaves its files alone.
    r = sample(model_path, 5, reuse=str(out), **kw)
    assert r.reused and r.report["sampled_this_run"] == 0 and np.array_equal(r.images, f["arr_0"])
    before = (tmp_path / "cli.json").read_text()
    assert _main(_cmd(model_path, out, "--num-samples", "5", "--batch-size", "2", "--respace", "4", "--seed", "7",
                      "--no-clip")[3:]) == 0
    assert (tmp_path / "cli.json").read_text() == before
    assert not sample(model_path, 5, reuse=str(out), **{**kw, "seed": 8}).reused
    # Labels as an array (Python only) and bad input as a UsageError.
    assert sample(model_path, 3, ddim=2, labels=np.array([1, 2, 3]), threads=1, progress=False).labels.tolist() == \
        [1, 2, 3]
    with pytest.raises(UsageError, match="drop --respace"):
        sample(model_path, 2, ddim=4, respace="10")
    with pytest.raises(UsageError, match=r"labels must lie in \[0, 9\]"):
        sample(model_path, 2, labels=np.array([3, 10]), progress=False)


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "2", "--ddim", "4", "--respace", "10"], "drop --respace"),
    (["--num-samples", "2", "--respace", "7x"], "respacing"),
    (["--num-samples", "0"], "positive"),
    (["--num-samples", "2", "--class-label", "10"], "[0, 9]"),
    (["--num-samples", "2", "--eta", "0.5"], "--ddim"),
])
def test_bad_input_one_line_exit_2(model_path, tmp_path, capsys, extra, message):
    assert _main(_cmd(model_path, tmp_path / "x.npz", *extra)[3:]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("evaluations.sample: error:")


def test_missing_model_and_help(tmp_path):
    r = subprocess.run(_cmd(str(tmp_path / "none.safetensors"), tmp_path / "x.npz", "--num-samples", "2"),
                       capture_output=True, text=True, cwd=ROOT, env=_env())
    assert r.returncode == 2 and "trainer.export" in r.stderr and r.stderr.count("\n") == 1
    h = subprocess.run([sys.executable, "-m", "evaluations.sample", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=_env())
    assert h.returncode == 0 and "--guidance-scale" in h.stdout


@pytest.mark.distributed
def test_two_ranks_equal_one_rank_torchrun_env_and_mpiexec(model_path, tmp_path):
    args = ["--num-samples", "9", "--batch-size", "2", "--respace", "4", "--seed", "11"]
    one = subprocess.run(_cmd(model_path, tmp_path / "one.npz", *args), capture_output=True, text=True, cwd=ROOT,
                         env=_env())
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    procs = [subprocess.Popen(_cmd(model_path, tmp_path / "two.npz", *args), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "2 rank(s)" in outs[0][0] and outs[1][0] == ""      # only rank 0 reports
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert json.loads((tmp_path / "two.json").read_text())["ranks"] == 2
    # The same under mpiexec (ranks from mpi4py, rendezvous address broadcast by rank 0).
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("no mpiexec next to the Python interpreter (the mpich wheel provides one)")
    m = subprocess.run([mpiexec, "-n", "2", *_cmd(model_path, tmp_path / "mpi.npz", *args)], capture_output=True,
                       text=True, cwd=ROOT, env=_env(), timeout=120)
    assert m.returncode == 0, m.stderr
    assert np.array_equal(a["arr_0"], np.load(tmp_path / "mpi.npz")["arr_0"])
    assert json.loads((tmp_path / "mpi.json").read_text())["ranks"] == 2


@pytest.mark.distributed
def test_python_entry_point_two_ranks_in_memory(model_path, tmp_path):
    """Without parts_dir the batches of two ranks are all-gathered (trainer.sync.gather_rows): same as one rank."""
    from evaluations.sample import sample
    kw = dict(batch_size=2, respace="4", seed=11, threads=1, progress=False)
    one = sample(model_path, 9, **kw)
    code = ("import sys, numpy as np\nfrom evaluations import dist\nfrom evaluations.sample import sample\n"
            f"s = sample(sys.argv[1], 9, **{kw!r})\ndist.shutdown()\n"
            "print('none' if s is None else np.savez(sys.argv[2], images=s.images, labels=s.labels) or 'saved')")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code, model_path, str(tmp_path / f"r{r}.npz")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["saved", "none"] and not (tmp_path / "r1.npz").exists()
    two = np.load(tmp_path / "r0.npz")
    assert np.array_equal(two["images"], one.images) and np.array_equal(two["labels"], one.labels)


@pytest.mark.slow
def test_resume_after_kill_keeps_batches(model_path, tmp_path):
    args = ["--num-samples", "8", "--batch-size", "1", "--respace", "15", "--seed", "5"]
    ref = subprocess.run(_cmd(model_path, tmp_path / "ref.npz", *args), capture_output=True, text=True, cwd=ROOT,
                         env=_env())
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "k.npz"
    parts = tmp_path / "k.npz.parts"
    p = subprocess.Popen(_cmd(model_path, out, *args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (parts.exists() and list(parts.glob("batch-*.npz"))):
        time.sleep(0.01)
    p.kill()
    p.wait()
    done = sorted(parts.glob("batch-*.npz"))
    assert not out.exists() and 1 <= len(done) < 8, "the kill came too late to test resuming"
    r = subprocess.run(_cmd(model_path, out, *args), capture_output=True, text=True, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "k.json").read_text())
    assert rep["resumed_batches"] >= len(done) and rep["sampled_this_run"] == 8 - rep["resumed_batches"]
    assert np.array_equal(np.load(out)["arr_0"], np.load(tmp_path / "ref.npz")["arr_0"])
    # Parts made with other settings are not mixed in: one clear error.
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({"seed": 999}))
    r = subprocess.run(_cmd(model_path, tmp_path / "k.npz", *args[:-1], "6"), capture_output=True, text=True,
                       cwd=ROOT, env=_env())
    assert r.returncode == 2 and "other settings" in r.stderr


def test_unconditional_model_has_no_labels(tmp_path, capsys):
    from diffusion.presets import get_config
    from trainer.export import save_exported
    cfg = get_config("tiny16", num_classes=None)
    path = str(tmp_path / "uncond.safetensors")
    save_exported(path, cfg.build().state_dict(), cfg.to_dict(), {"steps": 50}, step=0, ema="model")
    assert _main(_cmd(path, tmp_path / "u.npz", "--num-samples", "2", "--respace", "3")[3:]) == 0
    f = np.load(tmp_path / "u.npz")
    assert f["arr_0"].shape == (2, 16, 16, 3) and "arr_1" not in f.files
    capsys.readouterr()
    assert _main(_cmd(path, tmp_path / "v.npz", "--num-samples", "2", "--guidance-scale", "2")[3:]) == 2
    assert "unconditional" in capsys.readouterr().err
