"""Smoke test of the trainer-overhead benchmark: it runs all three loops (bare data-parallel, DeepSpeed only, the
real trainer) on two real gloo ranks and writes its markdown and JSON. Nothing here is timed against a target."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_trainer_runs_all_loops_on_two_ranks(tmp_path) -> None:
    out = tmp_path / "trainer.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_trainer", "--preset", "tiny16", "--batch", "2",
                        "--steps", "3", "--warmup", "1", "--threads-per-rank", "1", "--cases", "2:1:fp32",
                        "--repeats", "2", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--timeout", "300"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert [c["round"] for c in res["cases"]] == [1, 2]  # the case measured in two rounds, all three loops each
    for case in res["cases"]:
        assert (case["ranks"], case["zero"], case["precision"]) == (2, 1, "fp32")
        for loop in ("bare", "deepspeed_only"):
            assert len(case[loop]["per_rank"]) == 2 and case[loop]["img_s"] > 0
            assert all(len(p["step_s"]) == 3 for p in case[loop]["per_rank"])
        assert case["trainer"]["img_s"] > 0 and len(case["trainer"]["img_s_per_step"]) == 2  # steps 2 and 3
        assert case["overhead"] == pytest.approx(1 - case["trainer"]["img_s"] / case["bare"]["img_s"])
    md = out.read_text()
    assert "| 1 | 2 | 1 | fp32 |" in md and "| 2 | 2 | 1 | fp32 |" in md  # round, ranks, ZeRO, precision
    assert "Per case over 2 rounds" in md and "| 2 | 1 | fp32 | 2 |" in md  # the per-case medians
    assert "trainer's own overhead" in md and "gradients all-reduced over gloo" in md
    assert "THP_MEM_ALLOC_ENABLE=1 in all three loops" in md


def test_bench_trainer_bad_input_is_one_line_exit_2(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_trainer", "--preset", "nope", "--out",
                        str(tmp_path / "x.md")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown --preset 'nope'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_trainer", "--repeats", "0", "--out",
                        str(tmp_path / "x.md")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--repeats must be >= 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_gpu_check_dry_run_end_to_end(tmp_path) -> None:
    """benchmarks/gpu_check.sh --dry-run: every section of the GPU check runs on CPU at tiny sizes (the trainer on
    two gloo ranks included) and the results file is written; aot_eager keeps inductor's compile out of the test
    (tests/test_compile.py covers it). Nothing is timed against a target."""
    out = tmp_path / "gpu.md"
    env = dict(os.environ, IDDPM_COMPILE_BACKEND="aot_eager", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    sec = res["sections"]
    assert set(sec) == {"tests", "mfu", "ckpt", "fp16", "sync", "sampling"} and all(v["ok"] for v in sec.values())
    assert res["dry_run"] is True and "DRY RUN" in out.read_text()
    assert sec["fp16"]["finite"] is True and sec["sync"]["returncodes"] == [0, 0] and sec["sync"]["backend"] == "gloo"
    assert sec["mfu"]["eager"]["images_per_s"] > 0 and sec["mfu"]["compiled"]["images_per_s"] > 0
    assert sec["mfu"]["compiled"]["losses"][0] == pytest.approx(sec["mfu"]["eager"]["losses"][0], rel=1e-2)
    assert sec["sampling"]["summary"] and "skipped" in sec["tests"]["summary"]


def test_gpu_check_bad_input_is_one_line_exit_2() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--sections", "mfu,nope"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--sections" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_networks_runs_the_toy_gan_trainer_and_its_bare_loop_and_runs_compare(tmp_path) -> None:
    """benchmarks.bench_networks on 2 ranks (ZeRO 1) writes its table; compare_trainer_runs reads bench_trainer
    JSON of two 'trees' (here: the same results twice) and writes the before/after table."""
    out = tmp_path / "networks.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_networks", "--hidden", "16", "--batch", "4",
                        "--steps", "4", "--warmup", "1", "--cases", "2:1", "--repeats", "1", "--work-dir",
                        str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    case, = json.loads(out.with_suffix(".json").read_text())["cases"]
    assert (case["ranks"], case["zero"]) == (2, 1) and len(case["bare"]["per_rank"]) == 2
    assert case["trainer"]["img_s"] > 0 and case["overhead"] == pytest.approx(
        1 - case["trainer"]["img_s"] / case["bare"]["img_s"])
    assert "| 1 | 2 | 1 |" in out.read_text()

    results = os.path.join(ROOT, "benchmarks", "results", "trainer-rounds.json")  # a committed bench_trainer run
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare_trainer_runs", "--before", results, "--after", results,
                        "--out", str(tmp_path / "cmp.md")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert rows and all(x == 1.0 for row in rows for x in row["ratio"])  # the same runs: ratio 1 in every round
