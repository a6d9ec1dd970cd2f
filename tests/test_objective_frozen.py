"""An objective with a frozen network, defined here and nowhere else: a student MLP regresses the output of a frozen
teacher MLP loaded from a safetensors file (as latent diffusion holds its autoencoder, or distillation its teacher).
The trainer imports it with `--objective tests/test_objective_frozen.py:MatchTeacher`. The teacher is moved to the
run's precision (bf16 here), is in no optimizer and in no checkpoint; its file's sha256 is recorded in config.json,
and a resume with a changed file is refused with one line."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from trainer.configlib import option
from trainer.networks import DEFAULT, Network, frozen
from trainer.objective import Objective

PLUGIN = "tests/test_objective_frozen.py:MatchTeacher"
N = 3 * 16 * 16


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(N, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


@dataclass
class MatchOptions:
    teacher_file: str = option("", "frozen teacher weights (safetensors of mlp())", frozen=True, metavar="FILE")


class MatchTeacher(Objective):
    """loss = |student(x) - teacher(x)|^2 per image; the teacher frozen."""

    Options = MatchOptions
    kind = "test-regressor"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from safetensors.torch import load_file
        self.teacher = mlp()
        self.teacher.load_state_dict(load_file(self.options.teacher_file))

    def networks(self) -> dict[str, Network]:
        return {DEFAULT: Network(mlp()), "teacher": frozen(self.teacher, self.options.teacher_file)}

    def loss(self, net, batch, generator):
        x, _ = batch
        with torch.no_grad():
            target = self.nets["teacher"](x)
        return ((net(x) - target) ** 2).mean(1), {}

    def train_step(self, step) -> None:
        super().train_step(step)  # the default step; then a probe of what the optimizer holds
        opt = step.engine(DEFAULT).optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        row = {"optimized": sum(p.numel() for g in opt.param_groups for p in g["params"]),
               "teacher_dtype": str(next(self.teacher.parameters()).dtype),
               "teacher_requires_grad": any(p.requires_grad for p in self.teacher.parameters())}
        with open(os.path.join(self.cfg.run.run_dir, "probe.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    def export_config(self) -> dict:
        return {"model": {"inputs": N, "outputs": 8}}


# ------------------------------------------------------------------------------------------------- the test

pytestmark = pytest.mark.slow


def test_frozen_network_is_not_optimized_not_checkpointed_and_a_changed_file_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file
    from launch import output, prepare_digits, start_ranks, wait
    from data.fsio import sha256_file
    manifest = prepare_digits(str(tmp_path / "digits"))
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher.safetensors")
    save_file(mlp().state_dict(), teacher)
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    args = ["--objective", PLUGIN, "--teacher-file", teacher, "--data", manifest,
            "--run-dir", run_dir, "--global-batch", "8", "--lr", "1e-3", "--ema", "0.9", "--save-every", "2",
            "--log-every", "1", "--precision", "bf16", "--seed", "1"]
    assert wait(start_ranks([*args, "--total-steps", "4"], log, 1)) == [0], output(log)[-3000:]
    assert "[model " in output(log) and "teacher frozen]" in output(log)

    probes = [json.loads(line) for line in open(os.path.join(run_dir, "probe.jsonl"))]
    student = sum(t.numel() for t in mlp().parameters())
    assert len(probes) == 4 and all(p == {"optimized": student, "teacher_dtype": "torch.bfloat16",
                                          "teacher_requires_grad": False} for p in probes), probes
    ck = os.path.join(run_dir, "checkpoints", "step_00000004")
    files = os.listdir(ck)
    assert not any("teacher" in f for f in files) and "ds" in files, files
    assert set(load_file(os.path.join(ck, "model.safetensors"))) == set(mlp().state_dict())
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["frozen"] == {"teacher": {"source": teacher, "sha256": sha256_file(teacher)}}

    # the same file: resumes; a changed file: one line, exit 2, nothing trained
    assert wait(start_ranks([*args, "--total-steps", "6"], log + ".2", 1)) == [0], output(log + ".2")[-3000:]
    assert "resuming at step 4" in output(log + ".2")
    save_file({k: v + 0.01 for k, v in load_file(teacher).items()}, teacher)
    assert wait(start_ranks([*args, "--total-steps", "8"], log + ".3", 1)) == [2]
    lines = [line for line in output(log + ".3").splitlines() if line.startswith("trainer.main:")]
    assert len(lines) == 1 and "frozen network 'teacher'" in lines[0] and "not the file this run started with" \
        in lines[0], output(log + ".3")
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == "step_00000006"
