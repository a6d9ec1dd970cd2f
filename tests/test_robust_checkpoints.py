"""Issue 15: verified checkpoints, the run lock, failed saves on a full disk, --rollback.

Fast tests build checkpoint folders and locks by hand; the slow ones run the real trainer (one CPU rank, tiny16)
with this file's objective: Improved DDPM whose loss is NaN on the forward calls listed in $NAN_CALLS."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from data.cli import UsageError
from data.runlock import LockHeld, RunLock, identity
from trainer.checkpoint import (checkpoint_folders, clean_unfinished, file_table, main as checkpoint_main,
                                resume_point, verify)
from trainer.iddpm import ImprovedDDPM
from trainer.objective import register_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "tests/test_robust_checkpoints.py:NanAt"
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_", "NAN_CALLS"))},
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")


@register_objective("test-nan-at")
class NanAt(ImprovedDDPM):
    """Improved DDPM; the loss is NaN on the (0-based) forward calls of this process listed in $NAN_CALLS."""

    calls = 0

    def loss(self, net, batch, generator):
        loss, metrics = super().loss(net, batch, generator)
        bad = {int(c) for c in os.environ.get("NAN_CALLS", "").split(",") if c}
        NanAt.calls += 1
        return (loss * float("nan") if NanAt.calls - 1 in bad else loss), metrics


# ------------------------------------------------------------------------------------------------- by hand
def fake_checkpoint(run_dir: str, step: int) -> str:
    """A checkpoint folder published the way Checkpointer._publish does it (files, then meta.json with the table)."""
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    os.makedirs(os.path.join(folder, "ds"))
    with open(os.path.join(folder, "ds", "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(os.urandom(1000))
    with open(os.path.join(folder, "ema_0.9.safetensors"), "wb") as f:
        f.write(os.urandom(5000))
    meta = {"step": step, "world_size": 1, "files": file_table(folder)}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(f"step_{step:08d}\n")
    return folder


def test_verify_detects_truncation_edits_and_additions_and_resume_falls_back(tmp_path, capsys) -> None:
    run = str(tmp_path)
    old, new = fake_checkpoint(run, 4), fake_checkpoint(run, 8)
    assert verify(old) is None and verify(new) is None
    assert resume_point(run) == (new, [])
    ema = os.path.join(new, "ema_0.9.safetensors")
    with open(ema, "r+b") as f:  # same size, one byte changed
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert "sha256 mismatch" in verify(new)
    os.truncate(ema, 100)  # the case: cut to 100 bytes
    assert verify(new) == "ema_0.9.safetensors has 100 bytes, 5000 were written"
    lines: list[str] = []
    assert resume_point(run, lines.append) == (old, [new]) and len(lines) == 1 and new in lines[0]

    with open(os.path.join(old, "notes.txt"), "w") as f:
        f.write("hand edit")
    assert verify(old) == "notes.txt was not written by the trainer (edited by hand?)"
    os.unlink(os.path.join(old, "notes.txt"))
    os.unlink(os.path.join(old, "ds", "mp_rank_00_model_states.pt"))
    assert verify(old) == "ds/mp_rank_00_model_states.pt is missing"
    with pytest.raises(UsageError, match=r"no intact checkpoint .* \(2 damaged"):
        resume_point(run)

    other = fake_checkpoint(str(tmp_path / "b"), 12)
    meta = json.load(open(os.path.join(other, "meta.json")))
    json.dump({**meta, "step": 13}, open(os.path.join(other, "meta.json"), "w"))
    assert "does not describe step 12" in verify(other)
    open(os.path.join(other, "meta.json"), "w").write("{")
    assert verify(other) == "meta.json unreadable (JSONDecodeError)"

    capsys.readouterr()
    assert checkpoint_main(["verify", run]) == 1
    out = capsys.readouterr().out
    assert "step_00000008 (latest): DAMAGED: ema_0.9.safetensors has 100 bytes" in out and "0 of 2" in out
    fake_checkpoint(str(tmp_path / "c"), 2)
    assert checkpoint_main(["verify", str(tmp_path / "c")]) == 0
    with pytest.raises(UsageError, match="no checkpoints/ folder"):
        checkpoint_main(["verify", str(tmp_path / "nothing")])

    os.makedirs(os.path.join(run, "checkpoints", "step_00000012.tmp", "ds"))
    said: list[str] = []
    assert clean_unfinished(run, said.append) == ["step_00000012.tmp"] and "unfinished save" in said[0]
    assert [os.path.basename(f) for f in checkpoint_folders(run)] == ["step_00000008", "step_00000004"]


def write_lock(path: str, **holder) -> None:
    with open(path, "w") as f:
        json.dump({**identity(), **holder}, f)


def test_run_lock_holder_stale_takeover_and_force(tmp_path) -> None:
    path = str(tmp_path / "lock")
    with RunLock(path, what="run dir X") as lock:
        held = json.load(open(path))
        assert held["pid"] == os.getpid() and held["start"] and not lock.notes
        with pytest.raises(LockHeld, match=f"run dir X is in use by PID {os.getpid()} on "):
            RunLock(path, what="run dir X").acquire()
    assert not os.path.exists(path)  # released

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(path, pid=dead.pid)  # a process of this host that is gone
    lock = RunLock(path, what="run dir X").acquire()
    assert "its process is gone" in lock.notes[0] and json.load(open(path))["pid"] == os.getpid()
    lock.release()

    write_lock(path, start="1")  # this PID, but started at another time: a reused PID, so the holder is gone
    assert "its process is gone" in RunLock(path, what="X").acquire().notes[0]
    os.unlink(path)

    write_lock(path, host="elsewhere", pid=1)  # another host: cannot be checked, so it holds until stale
    with pytest.raises(LockHeld, match="PID 1 on elsewhere .*--force-unlock"):
        RunLock(path, what="X").acquire()
    os.utime(path, (time.time() - 700, time.time() - 700))
    assert "not refreshed for 70" in RunLock(path, what="X").acquire().notes[0]
    os.unlink(path)
    write_lock(path, host="elsewhere", pid=1)
    lock = RunLock(path, what="X", force=True).acquire()
    assert "--force-unlock" in lock.notes[0]
    write_lock(path, host="elsewhere", pid=1)  # someone else forced it away from us: we do not delete theirs
    lock.release()
    assert json.load(open(path))["host"] == "elsewhere"


# ------------------------------------------------------------------------------------------------- real runs
BASE = ["--objective", PLUGIN, "--model-size", "tiny16", "--diffusion-steps", "50", "--global-batch", "8",
        "--lr", "1e-3", "--ema", "0.9", "--log-every", "1", "--seed", "3", "--sample-respacing", "2",
        "--sample-grid", "4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(out), "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True,
                   timeout=300)
    return str(out / "train-manifest.json")


def train(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.main", *BASE, *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MiB tmpfs (a tiny16 checkpoint is about 24 MiB: the first save fits, the second does not)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_rollback_then_full_disk_then_lock_and_damaged_resume(digits, tmp_path, small_disk) -> None:
    """One run on a 40 MiB disk: NaN losses at steps 6-7 with --nonfinite-patience 2 roll back to the checkpoint of
    step 4 (lr halved, data position kept); the save of step 8 then fails on the full disk: exit 74, one line with
    the path and the free space, step 4 stays latest. A copy of the run then meets a live lock (exit 2, the holder
    named), a stale lock, a leftover .tmp and a hand-edited newer checkpoint, and resumes from step 4 to the end."""
    run = os.path.join(small_disk, "run")
    r = train(["--data", digits, "--run-dir", run, "--total-steps", "10", "--save-every", "4",
               "--nonfinite-patience", "2", "--rollback", "1", "--rollback-lr-factor", "0.5"],
              env=dict(ENV, NAN_CALLS="5,6"))
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("trainer:")]
    assert "rollback 1/1: back to step 4" in err[0] and "steps 5-7 are skipped" in err[0] and "-> 0.0005" in err[0]
    assert "checkpoint of step 8 not saved: rank 0 could not write" in err[1] and "free space on" in err[1]
    assert "stays" in err[1] and err[1].endswith("re-run the same command to resume") and len(err) == 2
    assert "lr 5.00e-04" in r.stdout.split("step 5/10")[-1]  # the steps after the rollback run at half the lr
    ck = os.path.join(run, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000004" and sorted(os.listdir(ck)) == [
        "latest", "step_00000004"] and not os.path.exists(os.path.join(run, "lock"))

    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from data.runlock import RunLock; "
                               f"RunLock({os.path.join(copy, 'lock')!r}, what='x').acquire(); print(1, flush=True); "
                               "time.sleep(120)"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        r = train(["--data", digits, "--run-dir", copy, "--total-steps", "6"])
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert f"run dir {copy} is in use by PID {holder.pid} on" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    bad = shutil.copytree(os.path.join(copy, "checkpoints", "step_00000004"),
                          os.path.join(copy, "checkpoints", "step_00000006"))  # a folder copied and renamed by hand
    os.makedirs(os.path.join(copy, "checkpoints", "step_00000008.tmp", "ds"))
    r = train(["--data", digits, "--run-dir", copy, "--total-steps", "6", "--save-every", "2"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    notes = [line for line in r.stdout.splitlines() if line.startswith("trainer:")]
    assert f"took over the lock of PID {holder.pid}" in notes[0] and "its process is gone" in notes[0]
    assert "step_00000008.tmp, an unfinished save" in notes[1]
    assert f"{bad} is damaged: meta.json does not describe step 6" in notes[2]
    assert "damaged checkpoint aside" in notes[3]
    assert "resuming at step 4" in notes[4] and "step 6/6" in r.stdout
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == [
        "latest", "step_00000004", "step_00000006", "step_00000006.damaged"]
    assert checkpoint_main(["verify", copy]) == 0


@pytest.mark.slow
def test_a_snapshot_that_cannot_be_written_stops_the_run_and_is_written_on_resume(digits, tmp_path) -> None:
    """RUN_DIR/phema and RUN_DIR/samples blocked by plain files: the preview grids only warn, the post-hoc EMA
    snapshot of step 2 stops the run (exit 74, one line) before the checkpoint of step 2, so the resume redoes
    steps 1-2 and writes the snapshot."""
    from trainer.phema import snapshot_path
    run = str(tmp_path / "run")
    os.makedirs(run)
    for name in ("phema", "samples"):
        open(os.path.join(run, name), "w").close()
    args = ["--data", digits, "--run-dir", run, "--total-steps", "2", "--save-every", "2", "--sample-every", "1",
            "--phema", "0.1"]
    r = train(args)
    err = [line for line in r.stderr.splitlines() if line.startswith("trainer:")]
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-3000:]
    assert "warning: preview grid" in err[0] and "training goes on" in err[0], err
    assert "post-hoc EMA snapshot of step 2 not written" in err[1] and "free space on" in err[1] and len(err) == 2
    assert not os.path.exists(os.path.join(run, "checkpoints", "latest"))
    os.remove(os.path.join(run, "phema"))
    r = train(args)
    assert r.returncode == 0 and os.path.isfile(snapshot_path(run, 2)), r.stdout[-2000:] + r.stderr[-3000:]


def test_sampling_parts_folder_has_one_writer(tmp_path) -> None:
    """evaluations.sample's OUT.parts/ is claimed under OUT.parts.lock: a live holder is named, a dead one's lock
    is taken over (a live one with --force-unlock), and the lock is released by the claimant."""
    from evaluations.dist import Ranks
    from evaluations.sample import _claim_parts
    parts, ranks = str(tmp_path / "out.npz.parts"), Ranks(0, 0, 1)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from data.runlock import RunLock; "
                               f"RunLock({parts + '.lock'!r}, what='x').acquire(); print(1, flush=True); "
                               "time.sleep(120)"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(UsageError, match=f"sampling parts folder {parts} is in use by PID {holder.pid} on"):
            _claim_parts(parts, {"n": 1}, ranks)
    finally:
        holder.kill()
        holder.wait()
    lock = _claim_parts(parts, {"n": 1}, ranks)  # the holder is gone: taken over
    assert "its process is gone" in lock.notes[0] and os.path.isfile(os.path.join(parts, "settings.json"))
    lock.release()
    assert not os.path.exists(parts + ".lock")
    holder = subprocess.Popen(holder.args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        forced = _claim_parts(parts, {"n": 1}, ranks, force=True)  # --force-unlock: taken from a live holder
        assert "--force-unlock" in forced.notes[0]
        forced.release()
    finally:
        holder.kill()
        holder.wait()
    r = subprocess.run([sys.executable, "-m", "evaluations.sample", "--help"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert "--force-unlock" in r.stdout


def test_absurd_or_foreign_model_json_is_refused_before_allocation(tmp_path) -> None:
    """An exported model's JSON with absurd sizes, or sizes that do not match the weights file, is refused from the
    JSON and the file's header alone (the model is only built on the meta device)."""
    from safetensors.torch import save_file
    from diffusion.presets import PRESETS, create_model_from_config
    from evaluations.io import load_model
    cfg = PRESETS["tiny16"].to_dict()
    path = str(tmp_path / "m.safetensors")
    save_file({k: v.contiguous() for k, v in create_model_from_config(cfg).state_dict().items()}, path)
    meta = {"model": cfg, "diffusion": {"steps": 10}}

    def with_model(**change) -> None:
        json.dump({**meta, "model": {**cfg, **change}}, open(str(tmp_path / "m.json"), "w"))
    with_model()
    load_model(path)
    with_model(model_channels=10**9)
    t0 = time.time()
    with pytest.raises(UsageError, match=r"model.model_channels = 1000000000 in .*m.json is not a plausible size"):
        load_model(path)
    with_model(model_channels=4096)  # plausible on its own: 19 G weights, refused from the header in well under 1 s
    with pytest.raises(UsageError, match=r"describes a model of 19\d\d\d.\d\dM weights, .* holds 1.19M"):
        load_model(path)
    with_model(channel_mult=[1] * 100)
    with pytest.raises(UsageError, match="model.channel_mult"):
        load_model(path)
    assert time.time() - t0 < 5


def test_data_of_another_image_size_than_the_model_is_refused() -> None:
    """A convolutional UNet would train on 8x8 digits as happily as on 16x16 ones and be exported as a 16 px model:
    the trainer compares the data's image size with the model's before any process group starts."""
    from trainer.config import parse_config
    from trainer.objective import get_objective
    cfg = parse_config(["--data", "d8/train-manifest.json", "--run-dir", "r", "--model-size", "tiny16"])
    get_objective("iddpm").check_data(cfg, (16, 16))
    with pytest.raises(UsageError, match="holds 8x8 images but the model is 16 px; pass --data-image-size 16"):
        get_objective("iddpm").check_data(cfg, (8, 8))
