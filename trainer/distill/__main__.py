"""Progressive distillation rounds N -> N/2 -> ... -> K, each an ordinary training run with its own run dir and export.

    python -m trainer.distill --teacher T.safetensors --teacher-steps 256 --final-steps 4 --data D --out-dir OUT \\
        --steps-per-round 300 -- --global-batch 64 --lr 1e-4 --ema 0.995

Rounds: OUT/round00-256v (only for a teacher that does not predict v: the v conversion, one teacher DDIM step per
student step, 256 -> 256), then OUT/round01-256to128, OUT/round02-128to64, ...; round r's teacher is round r-1's
export (OUT/roundNN-*/model.safetensors). Re-running the same command resumes: finished rounds (their export exists)
are skipped, an unfinished one resumes from its latest checkpoint. Flags after `--` go to every round's
`trainer.main` (optimizer, batch, EMA, checkpoint interval...; the model and diffusion come from the teacher).
`--launcher` runs the rounds under any launcher (e.g. "srun python -m trainer.main" or
"deepspeed --num_gpus 2 trainer/main.py"). OUT/distill.json records every round and its cost in images processed.
Guidance (class-conditional teachers): `--teacher-guidance W` distills a fixed scale in the first round;
`--teacher-guidance-range WMIN,WMAX` a scale drawn per example in every round (the first round's teacher guided
at it, later rounds' teachers taking it as their input w), so the final student is sampled at any w in the range
with one forward per step (evaluations.sample --guidance-scale W).
Exit codes: 0 done, 2 bad input, or a failing round's own code (75: preempted, re-run to resume).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import Any

from data.cli import ArgumentParser, UsageError, flag, run_cli
from data.fsio import atomic_write_json
from diffusion.distill import is_power_of_two
from trainer.distill import check_plan, data_image_size, load_teacher, parse_guidance_range


def plan_rounds(teacher_steps: int, final_steps: int, convert: bool) -> list[tuple[int, int]]:
    """[(teacher steps, substeps)] of every round: an optional (N, 1) conversion, then (N, 2), (N/2, 2), ... down
    to a student of `final_steps`."""
    rounds = [(teacher_steps, 1)] if convert else []
    n = teacher_steps
    while n > final_steps:
        rounds.append((n, 2))
        n //= 2
    return rounds


def round_dir(out_dir: str, index: int, n: int, substeps: int) -> str:
    return os.path.join(out_dir, f"round{index:02d}-{n}v" if substeps == 1 else f"round{index:02d}-{n}to{n // 2}")


def run_round(cmd: list[str], run_dir: str, export_ema: str | None, index: int = 0) -> str:
    """Train one round (resuming if it started before) and export it; returns the export path. With MASTER_PORT
    set (a multi-node launcher), round i rendezvouses on MASTER_PORT + i % 4, so successive rounds never meet on
    one port."""
    from trainer.export import export_run, resolve_checkpoint
    os.makedirs(run_dir, exist_ok=True)
    print("trainer.distill: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ)
    if env.get("MASTER_PORT", "").isdigit():
        env["MASTER_PORT"] = str(int(env["MASTER_PORT"]) + index % 4)
    code = subprocess.call(cmd, env=env)
    if code:
        raise SystemExit(code)
    ckpt = resolve_checkpoint(run_dir)
    with open(os.path.join(ckpt, "meta.json")) as f:
        rates = [str(r) for r in json.load(f).get("ema_rates", [])]
    ema = export_ema or (rates[0] if rates else "model")
    out = os.path.join(run_dir, "model.safetensors")
    export_run(run_dir, ema, out)
    return out


def round_record(run_dir: str, n: int, substeps: int, teacher: str) -> dict[str, Any]:
    """A finished round's cost: optimizer steps x global batch = images processed (each through the student once
    and the teacher `substeps` times)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        optim = json.load(f)["optim"]
    with open(os.path.join(run_dir, "model.json")) as f:
        step = int(json.load(f)["step"])
    return {"run_dir": run_dir, "teacher": teacher, "teacher_steps": n, "student_steps": n // substeps,
            "substeps": substeps, "optimizer_steps": step, "global_batch": int(optim["global_batch"]),
            "images": step * int(optim["global_batch"])}


def parse(argv: list[str] | None) -> tuple[Any, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = ArgumentParser(prog="python -m trainer.distill", description=__doc__.split("\n")[0], epilog=None)
    p.add_argument("--teacher", required=True, help="exported teacher (model.safetensors, model.json beside it)")
    p.add_argument("--teacher-steps", type=int, required=True, help="N: the teacher's DDIM steps (a power of two)")
    p.add_argument("--final-steps", type=int, default=4, help="K: the last student's steps (a power of two < N)")
    p.add_argument("--data", required=True, help="training shards (as trainer.main --data)")
    p.add_argument("--out-dir", required=True, help="folder of the round run dirs and distill.json")
    p.add_argument("--steps-per-round", type=int, default=1000, help="optimizer steps of every round")
    p.add_argument("--convert-steps", type=int, default=None,
                   help="optimizer steps of the v-conversion round (default: --steps-per-round)")
    flag(p, "--convert", None, "run the v-conversion round first (default: when the teacher does not predict v)")
    p.add_argument("--teacher-guidance", type=float, default=0.0,
                   help="classifier-free guidance scale distilled in the first round (class-conditional teacher)")
    p.add_argument("--teacher-guidance-range", default=None, metavar="WMIN,WMAX",
                   help="distill guidance at a scale drawn per example uniform in [WMIN, WMAX] (every round); the "
                        "students take w as an input. Class-conditional teacher; excludes --teacher-guidance")
    p.add_argument("--export-ema", default=None, help="EMA exported from each round (default: the run's first rate)")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m trainer.main",
                   help="command that runs trainer.main (default: this Python, one process)")
    return p.parse_args(argv), extra


def _main(argv: list[str] | None) -> int:
    a, extra = parse(argv)
    _, dkw, meta = load_teacher(a.teacher)
    if not is_power_of_two(a.final_steps) or not 1 <= a.final_steps < a.teacher_steps:
        raise UsageError(f"--final-steps {a.final_steps}: must be a power of two below --teacher-steps "
                         f"{a.teacher_steps}")
    if a.steps_per_round < 1 or (a.convert_steps is not None and a.convert_steps < 1):
        raise UsageError("--steps-per-round / --convert-steps must be positive")
    pre = ArgumentParser(add_help=False)  # a read-time resize passed on to the rounds decides the image side
    pre.add_argument("--data-image-size", type=int)
    size = pre.parse_known_args(extra)[0].data_image_size or data_image_size(a.data)
    wrange = parse_guidance_range(a.teacher_guidance_range)
    check_plan(dkw, meta["model"], a.teacher_steps, 2, a.teacher_guidance, size, guidance_range=wrange,
               teacher_meta=meta)
    convert = a.convert if a.convert is not None else dkw.get("model_mean_type") != "v"
    teacher, records = os.path.abspath(a.teacher), []
    for i, (n, r) in enumerate(plan_rounds(a.teacher_steps, a.final_steps, convert)):
        rd = round_dir(a.out_dir, i, n, r)
        out = os.path.join(rd, "model.safetensors")
        if not os.path.isfile(out):
            steps = a.convert_steps if r == 1 and a.convert_steps else a.steps_per_round
            cmd = shlex.split(a.launcher) + [
                "--objective", "distill", "--teacher", teacher, "--teacher-steps", str(n), "--substeps", str(r),
                "--teacher-guidance", str(a.teacher_guidance if i == 0 else 0.0), "--data", a.data,
                "--run-dir", rd, "--total-steps", str(steps)] + (
                ["--teacher-guidance-range", f"{wrange[0]!r},{wrange[1]!r}"] if wrange else []) + extra
            run_round(cmd, rd, a.export_ema, i)
        records.append(round_record(rd, n, r, teacher))
        atomic_write_json(os.path.join(a.out_dir, "distill.json"),
                          {"rounds": records, "images": sum(x["images"] for x in records), "final": out,
                           "teacher_guidance": a.teacher_guidance,
                           "teacher_guidance_range": list(wrange) if wrange else None})
        teacher = os.path.abspath(out)
    print(f"trainer.distill: {len(records)} rounds, {sum(x['images'] for x in records)} images; "
          f"final student {teacher}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, "trainer.distill", argv)


if __name__ == "__main__":
    sys.exit(main())
