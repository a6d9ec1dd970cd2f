"""End-to-end training runs on CPU: two DeepSpeed ranks at ZeRO 1, 2 and 3 under three launchers (deepspeed,
srun-style SLURM variables, mpiexec), TensorBoard contents, export from ZeRO-3, preemption by signal with
resume, and exact resume after kill -9."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BASE = ["--model-size", "tiny16", "--diffusion-steps", "50", "--global-batch", "8", "--lr", "1e-3",
        "--ema", "0.9,0.5", "--sample-respacing", "4", "--log-every", "1", "--timestep-sampler", "loss-second-moment",
        "--label-dropout", "0.2", "--seed", "3"]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "RANK", "WORLD_SIZE",
                                                                   "LOCAL_RANK", "MASTER_"))}
ENV = dict(CLEAN, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore::FutureWarning")


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run in its own session; on timeout the whole process group (launcher and ranks) is killed."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd[:6])} ...\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.fixture
def procs_cleanup():
    """Kill any rank a test started and left running (by its own process group)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(out), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return str(out / "train-manifest.json")


def srun_like(args: list[str], log: str, started: list, world: int = 2) -> list[subprocess.Popen]:
    """Start `world` ranks the way srun does: SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS + MASTER_ADDR/PORT."""
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(ENV, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.main", *args], cwd=ROOT, env=env,
                                      stdout=open(f"{log}.{r}", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    started += procs
    return procs


def tail(path: str) -> str:
    with open(path) as f:
        return f.read()[-3000:]


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    """Final model, EMA and sampler tensors of a run's latest checkpoint, keyed by file/name."""
    ck = os.path.join(run_dir, "checkpoints")
    folder = os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())
    phema = sorted(f[:-12] for f in os.listdir(folder) if f.startswith("ema_phema_"))
    out = {}
    for f in ("model", "ema_0.9", "ema_0.5", "objective", *phema):
        for k, v in load_file(os.path.join(folder, f + ".safetensors")).items():
            out[f"{f}/{k}"] = v
    return out


def snapshots(run_dir: str) -> dict[str, torch.Tensor]:
    """Every post-hoc EMA snapshot of a run, keyed by file/tensor."""
    folder = os.path.join(run_dir, "phema")
    return {f"{f}/{k}": v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def test_zero1_deepspeed_launcher_tensorboard_and_export(digits, tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "trainer", "main.py"), "--data", digits, "--run-dir", run_dir, *BASE,
           "--zero-stage", "1", "--total-steps", "3", "--micro-batch", "2", "--sample-every", "2"]
    r = run(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 3/3 loss" in r.stdout and "global batch 8 = 2 x 2 accum x 2 ranks" in r.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ("train/loss", "train/mse", "train/vb", "train/grad_norm", "train/lr", "train/loss_scale",
                "perf/images_per_s", "perf/images_per_s_rank0", "perf/images_per_s_rank1", "perf/step_time_s",
                "perf/data_wait_s", "data/bad_samples", "mem/peak_mb_max_rank"):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(t.startswith("train/loss_q") for t in scalars)
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in ea.Scalars("train/grad_norm"))
    images = set(ea.Tags()["images"])
    assert {"samples/ema_0.9", "samples/ema_0.5"} <= images
    assert [e.step for e in ea.Images("samples/ema_0.9")] == [2, 3]
    img = ea.Images("samples/ema_0.9")[-1]
    assert (img.height, img.width) == (10 * 17 + 1, 8 * 17 + 1)  # one row per digit, 8 columns of 16 px + 1 px pad
    assert any(t.startswith("config") for t in ea.Tags()["tensors"])

    out = str(tmp_path / "exp" / "m.safetensors")
    r = run([sys.executable, "-m", "trainer.export", run_dir, "--ema", "0.9", "--out", out])
    assert r.returncode == 0, r.stderr
    from diffusion import create_diffusion
    from trainer.export import load_exported
    model, dkw, meta = load_exported(out)
    assert meta["step"] == 3 and meta["ema"] == "0.9" and dkw["steps"] == 50
    x = create_diffusion(**dkw, timestep_respacing="3").p_sample_loop(model, (2, 3, 16, 16),
                                                                      model_kwargs={"y": torch.tensor([0, 7])})
    assert torch.isfinite(x).all() and x.shape == (2, 3, 16, 16)


def check_two_step_ema(run_dir: str, w: dict[str, torch.Tensor], bf16: bool = True) -> None:
    """After two steps the EMA rates a in (0.9, 0.5) satisfy e = a^2 p0 + a(1-a) p1 + (1-a) p2, with p0 the
    seeded initial weights and p2 the saved fp32 masters; solving each rate for the unseen p1 must agree."""
    from diffusion.presets import create_model_from_config
    import json
    meta = json.load(open(os.path.join(run_dir, "checkpoints", "step_00000002", "meta.json")))
    torch.manual_seed(3)
    # in bf16 DeepSpeed casts the module first, so the fp32 master weights start from bf16-rounded p0
    p0 = {k: v.detach().bfloat16() if bf16 else v.detach()
          for k, v in create_model_from_config(meta["model"]).named_parameters()}
    p1 = {}
    for a in (0.9, 0.5):
        p1[a] = {k: (w[f"ema_{a}/{k}"].double() - a * a * p0[k].double() - (1 - a) * w[f"model/{k}"].double())
                 / (a * (1 - a)) for k in p0}
    moved = 0.0
    for k in p0:
        torch.testing.assert_close(p1[0.9][k], p1[0.5][k], rtol=0, atol=2e-5)
        moved = max(moved, (w[f"model/{k}"].double() - p0[k].double()).abs().max().item())
    assert moved > 1e-4  # the weights did train


@pytest.mark.parametrize("zero", [0, 2])
def test_bf16_sharded_ema_closed_form(digits, tmp_path, procs_cleanup, zero) -> None:
    """bf16 on two srun-style ranks at ZeRO-0 (DeepSpeed's BF16_Optimizer) and ZeRO-2: each rank averages its
    fragments of the flat fp32 masters; the assembled EMA obeys the two-step closed form (check_two_step_ema)."""
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    args = ["--data", digits, *BASE, "--zero-stage", str(zero), "--precision", "bf16", "--total-steps", "2",
            "--run-dir", run_dir]
    assert run_srun_like(args, log, procs_cleanup) == [0, 0], tail(f"{log}.0") + tail(f"{log}.1")
    check_two_step_ema(run_dir, weights(run_dir))


def test_zero3_fp32_default_thresholds_ema_closed_form(digits, tmp_path, procs_cleanup) -> None:
    """ZeRO-3 in fp32 with DeepSpeed's default persistence threshold, which keeps every tensor of the tiny model
    whole on both ranks (the fp32 masters stay partitioned), UNet blocks as ZeRO-3 leaf modules and gradient
    checkpointing: the sharded EMA still obeys the closed form."""
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    args = ["--data", digits, *BASE, "--zero-stage", "3", "--total-steps", "2", "--run-dir", run_dir,
            "--grad-checkpoint"]
    assert run_srun_like(args, log, procs_cleanup) == [0, 0], tail(f"{log}.0") + tail(f"{log}.1")
    check_two_step_ema(run_dir, weights(run_dir), bf16=False)


def test_zero3_mpiexec_bf16_ema_and_export(digits, tmp_path) -> None:
    """ZeRO-3 in bf16 under mpiexec with the MPI sampler sync, every tensor partitioned, UNet blocks as leaf
    modules and gradient checkpointing (parameters gathered again for the recomputation): each rank averages its
    partitions of the fp32 masters and the assembled EMA obeys the two-step closed form (check_two_step_ema);
    the EMA and the raw weights export."""
    run_dir = str(tmp_path / "run")
    ds_json = tmp_path / "ds.json"  # partition every tensor of the tiny model (DeepSpeed keeps < 1e5 whole)
    ds_json.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    cmd = [os.path.join(BIN, "mpiexec"), "-n", "2", sys.executable, "-m", "trainer.main", "--data", digits,
           "--run-dir", run_dir, *BASE, "--zero-stage", "3", "--precision", "bf16", "--sampler-sync", "mpi",
           "--total-steps", "2", "--deepspeed-config", str(ds_json), "--grad-checkpoint"]
    r = run(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mpi launch, 2 rank(s)" in r.stdout
    w = weights(run_dir)
    check_two_step_ema(run_dir, w)

    for ema in ("0.5", "model"):
        out = str(tmp_path / f"{ema}.safetensors")
        r = run([sys.executable, "-m", "trainer.export", run_dir, "--ema", ema, "--out", out])
        assert r.returncode == 0, r.stderr
        from trainer.export import load_exported
        model, _, m = load_exported(out)
        assert m["ema"] == ema
        src = "model" if ema == "model" else f"ema_{ema}"
        for k, v in model.named_parameters():
            assert torch.equal(v.detach(), w[f"{src}/{k}"]), k


def run_srun_like(args: list[str], log: str, started: list, timeout: float = 600) -> list[int]:
    procs = srun_like(args, log, started)
    return [p.wait(timeout=timeout) for p in procs]


def test_zero2_signal_preempts_all_ranks_and_resumes(digits, tmp_path, procs_cleanup) -> None:
    """SIGUSR1 to rank 1 only: both ranks save at the next step boundary and exit 75; re-running resumes and ends
    within 1e-6 of an uninterrupted run (two ranks, ZeRO-2, fp32)."""
    args = ["--data", digits, *BASE, "--zero-stage", "2", "--total-steps", "8", "--save-every", "100"]
    ref = str(tmp_path / "ref")
    assert run_srun_like([*args, "--run-dir", ref], str(tmp_path / "ref.log"), procs_cleanup) == [0, 0], tail(str(tmp_path / "ref.log.0"))

    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    procs = srun_like([*args, "--run-dir", run_dir], log, procs_cleanup)
    deadline = time.time() + 240
    while "step 2/8" not in open(f"{log}.0").read():
        assert time.time() < deadline and procs[0].poll() is None, tail(f"{log}.0")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [75, 75], tail(f"{log}.0") + tail(f"{log}.1")
    saved = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert 2 <= int(saved.split("_")[1]) < 8 and "exiting 75" in open(f"{log}.0").read()

    assert run_srun_like([*args, "--run-dir", run_dir], str(tmp_path / "resume.log"), procs_cleanup) == [0, 0]
    assert "resuming at step" in open(str(tmp_path / "resume.log.0")).read()
    a, b = weights(ref), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_exact_resume_after_kill9_one_rank(digits, tmp_path, procs_cleanup) -> None:
    """N steps straight vs kill -9 right after the checkpoint of step 4 is published, then resume: identical
    weights, EMAs (power-function ones and their snapshots included) and sampler (1 rank, fp32, CPU)."""
    args = ["--data", digits, *BASE, "--total-steps", "12", "--save-every", "4", "--phema", "0.05,0.1",
            "--phema-every", "24"]  # a snapshot every 3 steps of 8 images
    ref = str(tmp_path / "ref")
    r = run([sys.executable, "-m", "trainer.main", *args, "--run-dir", ref])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    p = subprocess.Popen([sys.executable, "-m", "trainer.main", *args, "--run-dir", run_dir],
                         cwd=ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    procs_cleanup.append(p)
    latest, deadline = os.path.join(run_dir, "checkpoints", "latest"), time.time() + 240
    while not (os.path.isfile(latest) and open(latest).read().strip() == "step_00000004"):
        assert time.time() < deadline and p.poll() is None, tail(log)
        time.sleep(0.005)
    p.kill()  # SIGKILL, a few ms into step 5 (or a little later on a busy machine): no handler runs
    p.wait()
    saved = int(open(latest).read().strip().split("_")[1])
    assert saved < 12 and "step 12/12" not in open(log).read()
    r = run([sys.executable, "-m", "trainer.main", *args, "--run-dir", run_dir])
    assert r.returncode == 0 and f"resuming at step {saved}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    a, b = weights(ref), weights(run_dir)
    assert a.keys() == b.keys() and {"ema_phema_0.05", "ema_phema_0.1"} <= {k.split("/")[0] for k in a}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    a, b = snapshots(ref), snapshots(run_dir)  # the power-function EMAs continue exactly across the kill
    assert {k.split("/")[0] for k in a} == {f"snapshot_{s:08d}.safetensors" for s in (3, 6, 9, 12)}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_phema_sharded_tracking_closed_form_and_snapshots(digits, tmp_path, procs_cleanup) -> None:
    """Power-function EMAs on two srun-style ranks: unsharded (fp32 ZeRO-0: rank 0 holds them whole), and sharded
    at ZeRO-2 and ZeRO-3. After two steps each obeys its closed form (rate 0 at step 1, (1/2)^(gamma+1) at step 2,
    with the unseen step-1 weights solved from the classic EMA as in check_two_step_ema); the three runs give the
    same fp32 EMAs (<= 1e-6) and their per-step snapshots equal the checkpointed EMAs rounded to fp16."""
    from trainer.phema import sigma_rel_to_gamma
    runs = {}
    for zero in (0, 2, 3):
        run_dir, log = str(tmp_path / f"z{zero}"), str(tmp_path / f"z{zero}.log")
        args = ["--data", digits, *BASE, "--zero-stage", str(zero), "--total-steps", "2", "--run-dir", run_dir,
                "--phema", "0.05,0.2", "--phema-every", "8"]
        assert run_srun_like(args, log, procs_cleanup) == [0, 0], tail(f"{log}.0") + tail(f"{log}.1")
        runs[zero] = weights(run_dir)
        snaps = snapshots(run_dir)
        assert {k.split("/")[0] for k in snaps} == {"snapshot_00000001.safetensors", "snapshot_00000002.safetensors"}
        for key, v in snaps.items():
            if key.startswith("snapshot_00000002"):
                sigma, name = key.split("/", 2)[1:]
                assert v.dtype == torch.float16 and torch.equal(v, runs[zero][f"ema_phema_{sigma}/{name}"].half()), key
    for zero in (2, 3):
        for k, v in runs[0].items():
            torch.testing.assert_close(runs[zero][k], v, rtol=0, atol=1e-6, msg=f"ZeRO-{zero} {k}")

    w, a = runs[2], 0.9
    import json
    from diffusion.presets import create_model_from_config
    meta = json.load(open(os.path.join(str(tmp_path / "z2"), "checkpoints", "step_00000002", "meta.json")))
    torch.manual_seed(3)
    p0 = dict(create_model_from_config(meta["model"]).named_parameters())
    for sigma in ("0.05", "0.2"):
        beta = 0.5 ** (sigma_rel_to_gamma(float(sigma)) + 1)
        for k in p0:
            p2 = w[f"model/{k}"].double()
            p1 = (w[f"ema_{a}/{k}"].double() - a * a * p0[k].detach().double() - (1 - a) * p2) / (a * (1 - a))
            torch.testing.assert_close(w[f"ema_phema_{sigma}/{k}"].double(), beta * p1 + (1 - beta) * p2,
                                       rtol=0, atol=2e-5, msg=f"{sigma} {k}")
