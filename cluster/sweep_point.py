"""Trainer flags for one point of the model-size sweep (the paper's scaling recipe), printed on one line.

    python cluster/sweep_point.py 70M --base-lr 1e-4 --global-batch 128 --total-steps 250000
    -> --lr 0.000115470 --global-batch 128 --total-steps 250000

Learning rate: base_lr / sqrt(model_channels / 128) (Nichol & Dhariwal 2021, section 6: the learning rate is
scaled with the inverse square root of the channel multiplier). Training compute per point is fixed either
by a step count (`--total-steps`, every size trains the same number of steps) or by a FLOP budget
(`--compute`, steps = budget / (3 x forward FLOPs per image x global batch); the factor 3 counts the backward
pass as two forwards). `--describe` prints a JSON line with parameters, FLOPs and compute instead.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any folder

from data.cli import ArgumentParser, UsageError, flag, run_cli  # noqa: E402 (after the path set-up)

PROG = "cluster/sweep_point.py"
BASE_CHANNELS = 128
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (about twice the forward)


def point(preset: str, base_lr: float, global_batch: int, total_steps: int | None, compute: float | None,
          image_size: int | None = None) -> dict:
    """lr, steps, parameter count, forward FLOPs per image and training FLOPs of one sweep point.

    Exactly one of total_steps / compute (training FLOPs) is given. ValueError for an unknown preset.
    """
    from diffusion.presets import count_params, forward_flops, get_config

    overrides = {} if image_size is None else {"image_size": image_size}
    cfg = get_config(preset, **overrides)
    fwd = forward_flops(cfg)
    if compute is not None:
        total_steps = max(1, int(compute // (TRAIN_FLOPS_PER_FORWARD * fwd * global_batch)))
    if total_steps is None:
        raise ValueError("give total_steps or compute")
    import torch
    with torch.device("meta"):
        params = count_params(cfg.build())
    return {"preset": preset, "model_channels": cfg.model_channels,
            "lr": base_lr / math.sqrt(cfg.model_channels / BASE_CHANNELS), "global_batch": global_batch,
            "total_steps": total_steps, "params": params, "forward_flops_per_image": fwd,
            "train_flops": TRAIN_FLOPS_PER_FORWARD * fwd * global_batch * total_steps}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="diffusion.presets name (30M, 70M, 120M, 270M, tiny16, tiny32)")
    p.add_argument("--base-lr", type=float, default=1e-4, help="learning rate at 128 channels (default 1e-4)")
    p.add_argument("--global-batch", type=int, default=128, help="images per optimizer step (default 128)")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--total-steps", type=int, default=None, help="same step count for every size (default 250000)")
    g.add_argument("--compute", type=float, default=None, help="same training FLOPs for every size")
    flag(p, "--describe", False, "print the point as JSON instead of trainer flags")
    return p


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    if a.base_lr <= 0 or a.global_batch < 1 or (a.total_steps is not None and a.total_steps < 1) \
            or (a.compute is not None and a.compute <= 0) or (a.image_size is not None and a.image_size < 1):
        raise UsageError("--base-lr, --global-batch, --total-steps, --compute and --image-size must be positive")
    try:
        pt = point(a.preset, a.base_lr, a.global_batch, a.total_steps or 250_000, a.compute, a.image_size)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if a.describe:
        print(json.dumps(pt, sort_keys=True))
    else:
        print(f"--lr {pt['lr']:.9g} --global-batch {pt['global_batch']} --total-steps {pt['total_steps']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: one line of trainer flags (or JSON); bad input is one line on stderr and exit code 2."""
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
