"""A new objective is one file. This one, a plain denoising autoencoder on the digits, is defined here and nowhere
else; the trainer imports it with `--objective tests/test_objective_plugin.py:DenoisingAutoencoder`. It trains on two
DeepSpeed ranks, resumes after kill -9 of the whole job to the weights of an uninterrupted run, and exports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch

from diffusion.presets import PRESETS, create_model_from_config
from trainer.configlib import option
from trainer.objective import Objective, register_objective
from trainer.unet_settings import UNetSection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PLUGIN = "tests/test_objective_plugin.py:DenoisingAutoencoder"  # relative to the repository root, the runs' cwd


@dataclass
class DaeOptions:
    model: UNetSection = field(default_factory=UNetSection)  # --model-size etc., as the diffusion objectives have
    noise_std: float = option(0.5, "std of the Gaussian corruption", unit="pixel units of [-1, 1]", lower=0.0)


@register_objective("test-dae")
class DenoisingAutoencoder(Objective):
    """x + noise_std * eps -> x, with the UNet at t = 0 (no diffusion at all)."""

    Options = DaeOptions
    console = ("noisy_mse",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.model_cfg = PRESETS[self.options.model.size].replace(learn_sigma=False, num_classes=None).to_dict()

    def build_model(self) -> torch.nn.Module:
        return create_model_from_config(self.model_cfg)

    def loss(self, net, batch, generator):
        x, _ = batch
        noisy = x + self.options.noise_std * torch.randn(x.shape, generator=generator, device=x.device)
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        err = ((net(noisy, t) - x) ** 2).mean(dim=(1, 2, 3))
        return err, {"noisy_mse": ((noisy - x) ** 2).mean(dim=(1, 2, 3))}

    def export_config(self) -> dict:
        return {"model": self.model_cfg, "diffusion": {}}


# ------------------------------------------------------------------------------------------------- the test

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))},
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore::FutureWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: str, data: str, log: str) -> subprocess.Popen:
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "trainer", "main.py"), "--objective", PLUGIN,
           "--data", data, "--run-dir", run_dir, "--model-size", "tiny16", "--global-batch", "8", "--lr", "1e-3",
           "--total-steps", "16", "--save-every", "4", "--log-every", "1", "--ema", "0.9", "--noise-std", "0.3",
           "--zero-stage", "2", "--seed", "1"]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(p: subprocess.Popen, log: str) -> str:
    try:
        code = p.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    text = open(log).read()
    assert code == 0, text[-3000:]
    return text


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    ck = os.path.join(run_dir, "checkpoints")
    folder = os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())
    return {f"{f}/{k}": v for f in ("model", "ema_0.9") for k, v in
            load_file(os.path.join(folder, f"{f}.safetensors")).items()}


def test_plugin_objective_trains_resumes_after_kill9_and_exports(tmp_path) -> None:
    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(data), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    manifest = str(data / "train-manifest.json")

    ref = str(tmp_path / "ref")
    text = finish(launch(ref, manifest, str(tmp_path / "ref.log")), str(tmp_path / "ref.log"))
    assert f"{PLUGIN} objective" in text
    last = next(line for line in text.splitlines() if line.startswith("step 16/16 loss"))
    noisy_mse = float(last.split(" noisy_mse ")[1].split()[0])
    assert abs(noisy_mse - 0.09) < 0.01, last  # 0.3^2: the metric is the corruption's own error
    first = next(line for line in text.splitlines() if line.startswith("step 1/16 loss"))
    assert float(last.split(" loss ")[1].split()[0]) < float(first.split(" loss ")[1].split()[0])  # it learns

    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    p = launch(run_dir, manifest, log)
    latest, deadline = os.path.join(run_dir, "checkpoints", "latest"), time.time() + 300
    while not (os.path.isfile(latest) and open(latest).read().strip() == "step_00000004"):
        assert time.time() < deadline and p.poll() is None, open(log).read()[-3000:]
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and both ranks, a few ms into step 5 (or a bit later)
    p.wait()
    saved = int(open(latest).read().strip().split("_")[1])
    assert saved < 16 and "step 16/16" not in open(log).read()
    text = finish(launch(run_dir, manifest, log + ".2"), log + ".2")
    assert f"resuming at step {saved}" in text
    a, b = final_weights(ref), final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["objective"]["name"] == PLUGIN and config["objective"][PLUGIN]["noise_std"] == 0.3 \
        and config["objective"][PLUGIN]["model"]["size"] == "tiny16"

    out = str(tmp_path / "dae.safetensors")
    r = subprocess.run([sys.executable, "-m", "trainer.export", run_dir, "--ema", "0.9", "--out", out], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from trainer.export import load_exported
    model, diffusion_kwargs, meta = load_exported(out)
    assert diffusion_kwargs == {} and meta["step"] == 16 and meta["kind"] == PLUGIN  # no kind declared: its name
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), b[f"ema_0.9/{k}"]), k
