"""An objective with two trained networks, defined here and nowhere else: a toy GAN on the 16 px digits (a generator
and a discriminator, two optimizers with their own learning rates and betas, alternating updates, the discriminator
every second step only, an R1 gradient penalty through a double backward, EMA and export on the generator only).
The trainer imports it with `--objective tests/test_objective_networks.py:ToyGAN`. Each rank writes a probe of both
optimizers' Adam state after every step, so the test checks from outside that a network's optimizer moves on its
own steps and only then."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from trainer.configlib import option
from trainer.networks import Network
from trainer.objective import Objective

PLUGIN = "tests/test_objective_networks.py:ToyGAN"  # relative to the repository root, the runs' cwd
SHAPE = (3, 16, 16)
G_LR, G_BETAS, D_LR, D_BETAS = 2e-3, (0.5, 0.9), 5e-3, (0.0, 0.99)


@dataclass
class ToyGanOptions:
    latent: int = option(16, "generator input size", lower=1, frozen=True)
    r1_gamma: float = option(1.0, "weight gamma of the R1 penalty gamma/2 |grad_x D(x)|^2 on real images", lower=0.0)
    d_every: int = option(2, "the discriminator steps on every d_every-th run step", lower=1)
    hidden: int = option(64, "hidden units of both MLPs", lower=1, frozen=True)
    probe: bool = option(False, "write both optimizers' Adam state after every step to RUN_DIR/probe_rank<r>.jsonl")
    nan_step: int = option(-1, "make the discriminator's loss NaN at this run step (tests non-finite handling)")


def adam_probe(engine) -> dict:
    """This rank's view of an engine's torch optimizer: Adam steps taken, sum |exp_avg| + |exp_avg_sq| (float64),
    elements optimized, and the first group's lr and betas."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):  # DeepSpeed's ZeRO / bf16 wrappers hold the torch optimizer
        opt = opt.optimizer
    steps, total = 0, 0.0
    for st in opt.state.values():
        steps = max(steps, int(st["step"])) if "step" in st else steps
        total += sum(float(st[k].double().abs().sum()) for k in ("exp_avg", "exp_avg_sq") if k in st)
    g = opt.param_groups[0]
    return {"steps": steps, "sum": total, "numel": sum(p.numel() for gr in opt.param_groups for p in gr["params"]),
            "lr": g["lr"], "betas": list(g["betas"])}


def make_generator(latent: int, hidden: int) -> torch.nn.Module:
    """z [B, latent] -> images [B, 3, 16, 16] in [-1, 1]."""
    return torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, SHAPE[0] * SHAPE[1] * SHAPE[2]), torch.nn.Tanh(),
                               torch.nn.Unflatten(1, SHAPE))


def make_discriminator(hidden: int) -> torch.nn.Module:
    """images [B, 3, 16, 16] -> logits [B]."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], hidden),
                               torch.nn.LeakyReLU(0.2), torch.nn.Linear(hidden, 1), torch.nn.Flatten(0))


class ToyGAN(Objective):
    """Non-saturating GAN loss; D: softplus(-D(x)) + softplus(D(G(z))) + gamma/2 |grad_x D(x)|^2; G: softplus(-D(G(z)))."""

    Options = ToyGanOptions
    console = ("d_loss", "r1")
    kind = "toy-gan"
    preview_network = "generator"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.d_images = torch.zeros((), dtype=torch.float64)  # synced state: real images the D has seen, all ranks
        self._rows: list[float] = []

    def sync_rows(self) -> torch.Tensor:
        rows = torch.tensor([[sum(self._rows)]], dtype=torch.float64)
        self._rows = []
        return rows

    def apply_synced(self, rows: torch.Tensor) -> None:
        self.d_images += rows.sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"d_images": self.d_images.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.d_images = state["d_images"].clone()

    def networks(self) -> dict[str, Network]:
        g, d = make_generator(self.options.latent, self.options.hidden), make_discriminator(self.options.hidden)
        return {"generator": Network(g, lr=G_LR, betas=G_BETAS),
                "discriminator": Network(d, lr=D_LR, betas=D_BETAS, ema=False, export=False, double_backward=True)}

    def export_config(self) -> dict:
        return {"model": {"latent": self.options.latent, "shape": list(SHAPE)}}

    def train_step(self, step) -> None:
        G, D, gen = step.net("generator"), step.net("discriminator"), step.generator
        D_plain = step.module("discriminator")  # no engine hooks: for input gradients and inside G's step
        d_turn = step.index % self.options.d_every == 0
        nan = torch.full((step.micro,), float("nan"))  # "not counted": D's metrics on G-only steps
        d_metrics = []
        for _ in range(step.accum if d_turn else 0):
            x, _ = step.batch()
            with torch.no_grad():
                fake = G(torch.randn(x.shape[0], self.options.latent, generator=gen))
            real = x.detach().requires_grad_(True)
            d_real = D_plain(real)
            grad, = torch.autograd.grad(d_real.sum(), real, create_graph=True)  # the double backward of R1
            r1 = grad.pow(2).flatten(1).sum(1)
            d_loss = F.softplus(-d_real) + F.softplus(D(fake))
            if step.index == self.options.nan_step:
                d_loss = d_loss * float("nan")
            self._rows.append(float(x.shape[0]))
            step.backward("discriminator", d_loss + self.options.r1_gamma / 2 * r1)
            step.step("discriminator")
            d_metrics.append({"d_loss": d_loss.detach(), "r1": r1.detach()})
        for i in range(step.accum):
            z = torch.randn(step.micro, self.options.latent, generator=gen)
            with step.no_grad_for("discriminator"):  # D's gradients and Adam state stay out of G's step
                g_loss = F.softplus(-D_plain(G(z)))
                step.backward("generator", g_loss)
            step.step("generator")
            step.record(g_loss, d_metrics[i] if d_metrics else {"d_loss": nan, "r1": nan})
        if self.options.probe:
            self._probe(step, d_turn)

    def _probe(self, step, d_turn: bool) -> None:
        rank = torch.distributed.get_rank()
        row = {"index": step.index, "d_turn": d_turn,
               **{k: adam_probe(step.engine(k)) for k in ("generator", "discriminator")}}
        with open(os.path.join(self.cfg.run.run_dir, f"probe_rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def preview(self, model, device, seed):
        z = torch.randn(16, self.options.latent, generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad():
            return model(z), 4


# ------------------------------------------------------------------------------------------------- the tests

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 8


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from launch import prepare_digits
    return prepare_digits(str(tmp_path_factory.mktemp("digits")))


def args(digits: str, run_dir: str, zero: int) -> list[str]:
    return ["--objective", PLUGIN, "--data", digits, "--run-dir", run_dir, "--global-batch", "8", "--micro-batch", "2",
            "--lr", "1e-3", "--ema", "0.9", "--total-steps", str(STEPS), "--save-every", "2", "--log-every", "1",
            "--zero-stage", str(zero), "--seed", "2", "--no-flip", "--probe"]


def train(digits: str, run_dir: str, zero: int, world: int) -> str:
    from launch import output, start_ranks, wait
    log = run_dir + ".log"
    codes = wait(start_ranks(args(digits, run_dir, zero), log, world))
    assert codes == [0] * world, output(log)[-3000:]
    return output(log)


def checkpoint(run_dir: str) -> str:
    ck = os.path.join(run_dir, "checkpoints")
    return os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    folder = checkpoint(run_dir)
    return {f"{f}/{k}": v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors") and f[:3] != "rng"
            for k, v in load_file(os.path.join(folder, f)).items()}


def check_probes(run_dir: str, world: int) -> None:
    """Each optimizer's Adam state moves on its network's own steps, and only then; own lr and betas."""
    for r in range(world):
        rows = [json.loads(line) for line in open(os.path.join(run_dir, f"probe_rank{r}.jsonl"))]
        assert [row["index"] for row in rows] == list(range(STEPS))
        d_steps = 0
        for prev, row in zip([None] + rows, rows):
            g, d = row["generator"], row["discriminator"]
            d_steps += row["d_turn"]
            assert row["d_turn"] == (row["index"] % 2 == 0)
            assert g["steps"] == row["index"] + 1 and d["steps"] == d_steps, row  # Adam's own step counts
            assert (g["lr"], g["betas"], d["lr"], d["betas"]) == (G_LR, list(G_BETAS), D_LR, list(D_BETAS))
            if prev is not None:
                assert g["sum"] != prev["generator"]["sum"], row
                if row["d_turn"]:
                    assert d["sum"] != prev["discriminator"]["sum"], row
                else:  # bitwise the same state: G's step through D left D's optimizer alone
                    assert d["sum"] == prev["discriminator"]["sum"], row


@pytest.mark.parametrize("zero", [0, 1])
def test_two_networks_alternate_with_their_own_optimizers_and_ema_where_declared(digits, tmp_path, zero) -> None:
    run_dir = str(tmp_path / "gan")
    text = train(digits, run_dir, zero, world=2)
    assert f"{PLUGIN} objective" in text and "[generator " in text and "discriminator " in text
    check_probes(run_dir, 2)
    files = set(os.listdir(checkpoint(run_dir)))
    assert {"ds_generator", "ds_discriminator", "generator.safetensors", "generator.ema_0.9.safetensors",
            "discriminator.safetensors"} <= files
    assert not any(f.startswith(("discriminator.ema", "ds", "model", "ema_")) and f not in
                   ("ds_generator", "ds_discriminator") for f in files), files  # EMA on the generator only
    from safetensors.torch import load_file
    d_images = load_file(os.path.join(checkpoint(run_dir), "objective.safetensors"))["d_images"]
    assert d_images.item() == 8 * STEPS // 2  # synced over both ranks: the global batch on every D step
    meta = json.load(open(os.path.join(checkpoint(run_dir), "meta.json")))
    assert meta["kind"] == "toy-gan" and meta["networks"] == {"generator": {"ema": True, "export": True},
                                                              "discriminator": {"ema": False, "export": False}}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([G_LR] * STEPS)  # the first network's
    assert [e.value for e in acc.Scalars("train/discriminator/lr")] == pytest.approx([D_LR] * STEPS)
    r1 = [e.value for e in acc.Scalars("train/r1")]
    assert len(r1) == STEPS // 2 and all(v > 0 for v in r1)  # logged on the discriminator's steps only
    assert f"ema0.9_step{STEPS:08d}.png" in os.listdir(os.path.join(run_dir, "samples"))  # the generator's grid


def test_a_non_finite_loss_in_a_custom_step_stops_the_run(digits, tmp_path) -> None:
    """--nonfinite-patience counts a custom step's non-finite backward like the default step's."""
    from launch import output, start_ranks, wait
    log, run_dir = str(tmp_path / "nan.log"), str(tmp_path / "nan")
    assert wait(start_ranks([*args(digits, run_dir, 0), "--nan-step", "4", "--nonfinite-patience", "1"], log, 2)) \
        == [3, 3], output(log)
    assert "loss non-finite for 1 consecutive steps (up to step 5)" in output(log)
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == "step_00000004"


def test_zero3_with_a_double_backward_is_refused_in_one_line(digits, tmp_path) -> None:
    from launch import output, start_ranks, wait
    log = str(tmp_path / "z3.log")
    assert wait(start_ranks(args(digits, str(tmp_path / "z3"), 3), log, 1)) == [2]
    lines = [line for line in output(log).splitlines() if line.startswith("trainer.main:")]
    assert len(lines) == 1 and "double backward" in lines[0] and "--zero-stage 0, 1 or 2" in lines[0], output(log)


def kill_after_step_4_and_resume(digits: str, tmp_path, zero: int, world: int) -> tuple[str, str]:
    from launch import kill, output, start_ranks
    ref = str(tmp_path / "ref")
    train(digits, ref, zero, world)
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    procs = start_ranks(args(digits, run_dir, zero), log, world)
    latest, deadline = os.path.join(run_dir, "checkpoints", "latest"), time.time() + 300
    try:
        while not (os.path.isfile(latest) and open(latest).read().strip() == "step_00000004"):
            assert time.time() < deadline and all(p.poll() is None for p in procs), output(log)[-3000:]
            time.sleep(0.005)
    finally:
        kill(procs)  # SIGKILL to every rank's process group: no handler runs
    saved = int(open(latest).read().strip().split("_")[1])
    assert saved < STEPS and f"step {STEPS}/{STEPS}" not in output(log)
    assert f"resuming at step {saved}" in train(digits, run_dir, zero, world)
    return ref, run_dir


def test_kill9_and_resume_is_bitwise_on_one_rank_and_export_holds_the_generator(digits, tmp_path) -> None:
    ref, run_dir = kill_after_step_4_and_resume(digits, tmp_path, zero=0, world=1)
    a, b = weights(ref), weights(run_dir)
    assert a.keys() == b.keys() and {k.split("/")[0] for k in a} == {
        "generator.safetensors", "generator.ema_0.9.safetensors", "discriminator.safetensors", "objective.safetensors"}
    for k in a:
        assert torch.equal(a[k], b[k]), k

    from launch import ENV, ROOT
    out = str(tmp_path / "gan.safetensors")
    r = subprocess.run([sys.executable, "-m", "trainer.export", run_dir, "--ema", "0.9", "--out", out], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    exported = load_file(out)
    assert set(exported) == {f"generator.{k.split('/')[1]}" for k in b if k.startswith("generator.ema_0.9")}
    for k, v in exported.items():
        assert torch.equal(v, b[f"generator.ema_0.9.safetensors/{k[len('generator.'):]}"]), k
    meta = json.load(open(out[:-len(".safetensors")] + ".json"))
    assert meta["kind"] == "toy-gan" and meta["networks"] == ["generator"] and meta["ema"] == "0.9"
    assert meta["model"] == {"latent": 16, "shape": list(SHAPE)} and meta["step"] == STEPS


def test_kill9_and_resume_on_two_ranks_zero2(digits, tmp_path) -> None:
    ref, run_dir = kill_after_step_4_and_resume(digits, tmp_path, zero=2, world=2)
    check_probes(ref, 2)
    a, b = weights(ref), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
