"""The real cluster/ scripts on a real two-node SLURM (tests/slurm_cluster.py), with CPU-sized overrides:
multi-node training with preemption + requeue + exact resume, the model-size sweep array with its summary,
and the chained prepare -> train -> sample -> evaluate pipeline.

All jobs are submitted at the start of the module (they overlap on the two nodes); each test then waits for its
own. Data: the bundled digits at 16 px; FID with the stand-in feature network (smoke numbers only).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slurm_cluster import REPO, SlurmCluster, slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 12  # enough steps after the first checkpoint for the signal to arrive mid-run
# CPU-sized trainer flags shared by all jobs: tiny 16 px model, 100 diffusion steps, tiny sample grids.
# EMA 0.5 so that the exported (EMA) weights move away from the zero-initialised output layer in a few steps.
TINY = ("--ema 0.5 --global-batch 4 --log-every 1 --diffusion-steps 100 --sample-grid 2 --sample-respacing 10 "
        "--image-size 16 --num-classes 10")
# Every job: no GPUs, one CPU per task, may share CPUs with the other test jobs, a safety time limit.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe", "--time=30"]


def _reference_batch(path: Path, n: int = 64, seed: int = 0) -> None:
    """A reference batch in guided-diffusion's format (arr_0 uint8 [N,16,16,3]) from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).choice(len(d.images), n, replace=False)
    img = np.kron(d.images[idx], np.ones((2, 2)))  # 8x8 -> 16x16, values 0..16
    img = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    np.savez(path, arr_0=np.repeat(img[..., None], 3, axis=3), arr_1=d.target[idx].astype(np.int64))


@pytest.fixture(scope="module")
def work(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digits shards, a reference batch, and all jobs of this module submitted at once."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    data = root / "digits"
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--size", "16", "--out-dir", str(data),
                    "--no-progress"], check=True, cwd=REPO, capture_output=True, timeout=300)
    _reference_batch(root / "reference.npz")
    # Stand-in for BigGAN-deep's published sample batch (not downloadable here): other digits.
    _reference_batch(root / "other_batch.npz", seed=1)
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "IDDPM_FEATURE_CACHE": str(root / "feature-cache")}
    jobs: dict = {"root": root, "data": data, "env": env}

    # 1. two-node training, to be preempted with USR1 once it has saved its first checkpoint
    jobs["train_out"] = root / "train.out"
    jobs["train_run"] = root / "train-run"
    jobs["train"] = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", *CPU_JOB, f"--output={jobs['train_out']}",
        "cluster/train_imagenet64.sbatch", cwd=REPO,
        env=dict(env, MODEL_SIZE="tiny16", DATA=str(data / "train-manifest.json"), RUN_DIR=str(jobs["train_run"]),
                 TRAIN_ARGS=f"{TINY} --total-steps {STEPS} --save-every 2"))

    # 1b. one-node training that SLURM itself warns (header's --signal=USR1@600) once its time limit is lowered
    jobs["limit_out"] = root / "limit.out"
    jobs["limit_run"] = root / "limit-run"
    jobs["limit"] = slurm_cluster.sbatch(
        "--nodes=1", "--ntasks-per-node=1", *CPU_JOB, f"--output={jobs['limit_out']}",
        "cluster/train_imagenet64.sbatch", cwd=REPO,
        env=dict(env, MODEL_SIZE="tiny16", DATA=str(data / "train-manifest.json"), RUN_DIR=str(jobs["limit_run"]),
                 TRAIN_ARGS=f"{TINY} --total-steps 100000 --save-every 5 --log-every 50"))

    # 2. the sweep array over two tiny presets, one node each
    jobs["sweep_dir"] = root / "sweep"
    jobs["sweep"] = slurm_cluster.sbatch(
        "--array=0-1", "--nodes=1", "--ntasks-per-node=1", *CPU_JOB, f"--output={root}/sweep-%a.out",
        "cluster/sweep_model_size.sbatch", cwd=REPO,
        env=dict(env, SWEEP_PRESETS="tiny16 tiny32", SWEEP_DIR=str(jobs["sweep_dir"]),
                 DATA=str(data / "train-manifest.json"), VAL_DATA=str(data / "val-manifest.json"),
                 REFERENCE=str(root / "reference.npz"), SWEEP_STEPS="4", SWEEP_BATCH="4", SWEEP_BASE_LR="1e-4",
                 TRAIN_ARGS=f"{TINY} --save-every 4", NUM_SAMPLES="16", SAMPLE_BATCH="16",
                 SAMPLE_ARGS="--respace 5", EVAL_ARGS="--features standin --k 2 --splits 2",
                 NLL_ARGS="--respace 5 --num-images 16 --batch-size 16"))

    _submit_distill(slurm_cluster, root, data, env, jobs)
    _submit_pipeline(slurm_cluster, root, env, jobs)
    return jobs


def _submit_distill(slurm_cluster: SlurmCluster, root: Path, data: Path, env: dict, jobs: dict) -> None:
    """Job 2b of `work`."""
    # 2b. progressive distillation on two nodes: a random tiny16 epsilon teacher, v-conversion at 4 steps, 4 -> 2
    from diffusion.presets import get_config
    from trainer.export import save_exported
    torch.manual_seed(0)
    cfg = get_config("tiny16", num_classes=None)
    jobs["teacher"] = str(root / "teacher.safetensors")
    save_exported(jobs["teacher"], cfg.build().state_dict(), cfg.to_dict(),
                  {"steps": 100, "noise_schedule": "cosine", "learn_sigma": True}, step=0, ema="model")
    jobs["distill_dir"], jobs["distill_out"] = root / "distill", root / "distill.out"
    jobs["distill"] = slurm_cluster.sbatch(
        "--nodes=2", "--ntasks-per-node=1", *CPU_JOB, f"--output={jobs['distill_out']}", "cluster/distill.sbatch",
        cwd=REPO, env=dict(env, TEACHER=jobs["teacher"], DATA=str(data / "train-manifest.json"),
                           OUT_DIR=str(jobs["distill_dir"]), TEACHER_STEPS="4", FINAL_STEPS="2",
                           STEPS_PER_ROUND="2", TRAIN_ARGS="--global-batch 4 --lr 1e-4 --ema 0.5 --log-every 1 "
                           "--save-every 2 --sample-grid 2 --sample-respacing 2"))


def _submit_pipeline(slurm_cluster: SlurmCluster, root: Path, env: dict, jobs: dict) -> None:
    """Job 3 of `work`: the chained pipeline's jobs, their ids and dependencies."""
    # 3. the chained pipeline: prepare (digits) -> train -> sample -> evaluate
    pipe = root / "pipe"
    one_task = " ".join(["--nodes=1", "--ntasks-per-node=1", *CPU_JOB, f"--output={pipe}-%x.out"])
    p = subprocess.run(
        ["bash", "cluster/pipeline.sh", "--sbatch-args", one_task], cwd=REPO, capture_output=True, text=True,
        timeout=60,
        env=dict(slurm_cluster.env, **env, PREPARE_ARGS="digits --size 16", PREPARED_DIR=str(pipe / "data"),
                 MODEL_SIZE="tiny16", RUN_DIR=str(pipe / "run"), TRAIN_ARGS=f"{TINY} --total-steps 4 --save-every 4",
                 NUM_SAMPLES="16", SAMPLE_BATCH="16", SAMPLE_ARGS="--respace 5",
                 REFERENCE=str(root / "reference.npz"), BIGGAN=str(root / "other_batch.npz"),
                 EVAL_ARGS="--features standin --k 2 --splits 2"))
    assert p.returncode == 0, p.stderr
    jobs["pipe"] = pipe
    jobs["pipeline"] = ids = dict(line.split() for line in p.stdout.strip().splitlines())
    jobs["pipeline_deps"] = {stage: slurm_cluster.job(i)[0].get("Dependency") for stage, i in ids.items()}


def _tb_steps(tb_dir: Path, tag: str = "train/loss") -> list[int]:
    """Every step logged under `tag` in all event files of tb_dir, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("summary") and any(v.tag == tag for v in ev.summary.value):
                steps.append(ev.step)
    return sorted(steps)


def test_two_node_training_preempted_by_usr1_requeues_and_finishes_without_lost_steps(
        slurm_cluster: SlurmCluster, work: dict) -> None:
    job, run, out = work["train"], work["train_run"], work["train_out"]
    first = run / "checkpoints" / "step_00000002"
    end = time.monotonic() + 300
    while not first.is_dir():  # training is under way (signal handlers installed): preempt it
        assert time.monotonic() < end, (f"no first checkpoint; job: {slurm_cluster.job(job)}; {out.read_text()}; "
                                        f"processes:\n{slurm_cluster.processes()}")
        rec = slurm_cluster.job(job)[0]
        assert rec["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), out.read_text()
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    rec = slurm_cluster.wait(job, timeout=420, release_requeued=True)[0]
    log = out.read_text()
    assert rec["JobState"] == "COMPLETED", (slurm_cluster.history, log)
    assert rec["Restarts"] == "1", (slurm_cluster.history, log)
    assert rec["NodeList"] == "node[1-2]" and rec["NumTasks"] == "2"

    # one rank on each node, in both the first run and the requeued one
    ranks = re.findall(r"rank_env: rank (\d)/2 \(local 0\) on (node\d)", log)
    assert sorted(ranks) == [("0", "node1"), ("0", "node1"), ("1", "node2"), ("1", "node2")], log
    assert "(preempted); requeueing job" in log and "restart 1:" in log
    assert re.search(rf"trainer: preemption signal received; saved step (\d+); exiting 75", log), log
    saved = int(re.search(r"saved step (\d+); exiting 75", log).group(1))
    assert 2 <= saved < STEPS, f"preempted at step {saved}; lower the signal delay or raise STEPS"

    # checkpoints: the final one is step 8 and two ranks wrote their data-stream state
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:08d}"
    final = run / "checkpoints" / latest
    assert json.loads((final / "meta.json").read_text())["step"] == STEPS
    for rank in (0, 1):
        state = json.loads((final / f"rank_{rank:05d}.json").read_text())["data"]
        # 2 images per rank per step: nothing skipped or repeated across the preemption
        assert (state["rank"], state["world_size"], state["batches"], state["samples"]) == (rank, 2, STEPS, 2 * STEPS)

    # TensorBoard: every step logged exactly once over the two runs (two event files)
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) >= 2
    assert _tb_steps(run / "tb") == list(range(1, STEPS + 1))


def test_time_limit_warning_signal_makes_training_save_and_requeue(slurm_cluster: SlurmCluster,
                                                                  work: dict) -> None:
    job, run, out = work["limit"], work["limit_run"], work["limit_out"]
    end = time.monotonic() + 300
    while not (run / "checkpoints" / "latest").is_file():  # training is under way
        assert time.monotonic() < end, f"no checkpoint; {out.read_text()}; processes:\n{slurm_cluster.processes()}"
        time.sleep(1)
    # Leave 5 minutes: less than the header's --signal=USR1@600, so SLURM sends USR1 at its next time check.
    rec = slurm_cluster.job(job)[0]
    h, m, sec = (int(x) for x in rec["RunTime"].split("-")[-1].split(":"))
    limit_min = (h * 3600 + m * 60 + sec + 300) // 60 + 1
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}"])
    end = time.monotonic() + 240
    while True:
        rec = slurm_cluster.job(job)[0]
        if int(rec["Restarts"]) >= 1:
            break
        assert rec["JobState"] in ("RUNNING", "COMPLETING"), out.read_text()
        assert time.monotonic() < end, f"no requeue after the time-limit warning: {rec}; {out.read_text()}"
        time.sleep(1)
    # Requeued: stop it here (resuming to the end is covered by the USR1 test above).
    slurm_cluster.run(["scancel", str(job)])
    log = out.read_text()
    saved = re.search(r"trainer: preemption signal received; saved step (\d+); exiting 75", log)
    assert saved, log
    assert "(preempted); requeueing job" in log
    assert (run / "checkpoints" / f"step_{int(saved.group(1)):08d}" / "meta.json").is_file()


def test_sweep_array_trains_two_presets_and_writes_the_summary(slurm_cluster: SlurmCluster, work: dict) -> None:
    recs = slurm_cluster.wait(work["sweep"], timeout=480)
    outs = "\n".join(p.read_text() for p in sorted(work["root"].glob("sweep-*.out")))
    assert [r["JobState"] for r in recs] == ["COMPLETED", "COMPLETED"], outs
    sweep = work["sweep_dir"]
    for preset, channels in (("tiny16", 32), ("tiny32", 32)):
        cfg = json.loads((sweep / preset / "checkpoints" / "step_00000004" / "config.json").read_text())
        optim = cfg["optim"]
        assert cfg["objective"]["iddpm"]["model"]["size"] == preset and optim["total_steps"] == 4 and optim["global_batch"] == 4
        assert optim["lr"] == pytest.approx(1e-4 / (channels / 128) ** 0.5)
        assert (sweep / preset / "eval" / "metrics.md").is_file()
        assert json.loads((sweep / preset / "nll" / "nll.json").read_text())["bpd"] > 0
    rows = json.loads((sweep / "summary" / "scaling.json").read_text())["rows"]
    assert sorted(r["preset"] for r in rows) == ["tiny16", "tiny32"]
    for r in rows:
        assert r["step"] == 4 and r["fid"] is not None and r["nll_bpd"] is not None
        assert r["train_flops"] == 3 * r["forward_flops_per_image"] * 4 * 4
    assert rows[0]["nll_bpd"] != rows[1]["nll_bpd"]  # two different trained models, each evaluated
    assert (sweep / "summary" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    md = (sweep / "summary" / "scaling.md").read_text()
    assert "| tiny16 | tiny16 |" in md and "| tiny32 | tiny32 |" in md


def test_distillation_job_runs_its_rounds_on_two_nodes(slurm_cluster: SlurmCluster, work: dict) -> None:
    rec = slurm_cluster.wait(work["distill"], timeout=480)[0]
    log = work["distill_out"].read_text()
    assert rec["JobState"] == "COMPLETED" and rec["NumTasks"] == "2", (slurm_cluster.history, log)
    plan = json.loads((work["distill_dir"] / "distill.json").read_text())
    assert [(r["teacher_steps"], r["student_steps"]) for r in plan["rounds"]] == [(4, 4), (4, 2)], plan
    assert plan["images"] == 2 * 2 * 4 and os.path.isfile(plan["final"]), plan
    ranks = re.findall(r"rank_env: rank (\d)/2 \(local 0\) on (node\d)", log)  # two rounds, one rank per node
    assert sorted(ranks) == [("0", "node1"), ("0", "node1"), ("1", "node2"), ("1", "node2")], log
    assert "distillation finished" in log


def test_pipeline_chains_prepare_train_sample_evaluate_with_afterok(slurm_cluster: SlurmCluster,
                                                                      work: dict) -> None:
    ids = work["pipeline"]
    assert list(ids) == ["prepare", "train", "sample", "evaluate"]
    deps = work["pipeline_deps"]  # as seen right after submission
    assert deps["prepare"] == "(null)"
    for prev, stage in zip(("prepare", "train", "sample"), ("train", "sample", "evaluate")):
        # the train stage may already be released if prepare finished within the submission
        allowed = {f"afterok:{ids[prev]}(unfulfilled)"} | ({"(null)"} if stage == "train" else set())
        assert deps[stage] in allowed, deps
    rec = slurm_cluster.wait(ids["evaluate"], timeout=480)[0]
    pipe = work["pipe"]
    logs = "\n".join(p.read_text() for p in sorted(pipe.parent.glob("pipe-*.out")))
    assert rec["JobState"] == "COMPLETED", logs
    for stage in ("prepare", "train", "sample"):
        assert slurm_cluster.job(ids[stage])[0]["JobState"] == "COMPLETED"
    assert (pipe / "data" / "train-manifest.json").is_file()
    assert (pipe / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    samples = np.load(pipe / "run" / "samples" / "samples_16.npz", allow_pickle=False)
    assert samples["arr_0"].shape == (16, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    table = (pipe / "run" / "eval" / "metrics.md").read_text()
    assert "| ours | 16 |" in table and "| BigGAN-deep | 64 |" in table
    metrics = json.loads((pipe / "run" / "eval" / "metrics.json").read_text())
    assert [b["name"] for b in metrics["batches"]] == ["ours", "BigGAN-deep"]
    assert all(b["precision"] is not None and b["recall"] is not None for b in metrics["batches"])
    assert os.path.isfile(pipe / "run" / "eval" / "precision_recall.png")
