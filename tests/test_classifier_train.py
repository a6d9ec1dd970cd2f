"""The classifier objective under the real loop: two DeepSpeed ranks, ZeRO-3, bf16; a run stopped at step 3 and
resumed ends on the weights of an uninterrupted run; export, then evaluations.classify on held-out digits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_objective_plugin import ENV, ROOT, final_weights, finish, free_port  # the DeepSpeed launch helpers

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
BIN = os.path.dirname(sys.executable)


def launch(run_dir: str, data: str, log: str, steps: int) -> subprocess.Popen:
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "trainer", "main.py"), "--objective", "classifier", "--classifier-size", "tiny16",
           "--max-t", "0.5", "--data", data, "--run-dir", run_dir, "--diffusion-steps", "100", "--global-batch", "8",
           "--lr", "1e-3", "--total-steps", str(steps), "--save-every", "3", "--log-every", "1", "--ema", "0.9",
           "--zero-stage", "3", "--precision", "bf16", "--no-flip", "--seed", "2"]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_classifier_trains_on_two_ranks_resumes_exactly_and_exports(tmp_path) -> None:
    data = tmp_path / "digits"
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(data), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    manifest = str(data / "train-manifest.json")
    ref = str(tmp_path / "ref")
    text = finish(launch(ref, manifest, str(tmp_path / "ref.log"), 6), str(tmp_path / "ref.log"))
    assert "classifier objective" in text and "ZeRO-3" in text and "bf16" in text
    last = next(ln for ln in text.splitlines() if ln.startswith("step 6/6 loss"))
    assert 0.0 <= float(last.split(" acc ")[1].split()[0]) <= 1.0

    run = str(tmp_path / "run")
    finish(launch(run, manifest, str(tmp_path / "a.log"), 3), str(tmp_path / "a.log"))
    text = finish(launch(run, manifest, str(tmp_path / "b.log"), 6), str(tmp_path / "b.log"))
    assert "resuming at step 3" in text
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys() and any(k.endswith("pool.positional_embedding") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    config = json.load(open(os.path.join(run, "config.json")))
    own = config["objective"]["classifier"]
    assert (own["classifier_size"], own["max_t"], own["diffusion"]) == ("tiny16", 0.5, {"steps": 100,
                                                                                       "noise_schedule": "cosine"})

    out = str(tmp_path / "clf.safetensors")
    for cmd in (["-m", "trainer.export", run, "--out", out],
                ["-m", "evaluations.classify", "--model", out, "--data", str(data / "val-manifest.json"),
                 "--t-quartiles", "--out", str(tmp_path / "val.json")]):
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    meta = json.load(open(str(tmp_path / "clf.json")))
    assert meta["model"]["kind"] == "encoder_classifier" and meta["diffusion"]["steps"] == 100
    report = json.load(open(tmp_path / "val.json"))
    assert report["images"] == 359 and len(report["quartiles"]) == 4 and report["classes"] == 10
