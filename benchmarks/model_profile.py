"""Model presets on the meta device: parameters, forward FLOPs and activation memory per image.

    python -m benchmarks.model_profile [NAME ...]

prints, per preset, the parameter count, the forward GFLOPs per image (torch.utils.flop_counter, one
multiply-add = 2 FLOPs) and the activation memory per image (fp32) with and without gradient checkpointing.
Everything is measured on the meta device: shapes only, nothing is allocated.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from diffusion.presets import PAPER_PARAMS_M, PRESETS, ModelConfig, count_params, dummy_inputs, forward_flops, get_config
from diffusion.unet import UNetBlock


class _FusedAttentionOnMeta(TorchFunctionMode):
    """On meta, SDPA takes the math path, which saves the [B, heads, L, L] attention weights; real CPU and GPU
    runs take a fused kernel that saves only q, k, v, the output and the log-sum-exp. Route meta calls to the
    fused CPU kernel's op (it has a meta implementation) so that the analysis sees what a real run saves."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs and len(args) == 3 and args[0].is_meta:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args)[0]
        return func(*args, **kwargs)


def saved_tensor_tally(cfg: ModelConfig, batch: int, device: str = "meta") -> dict[str, int]:
    """Bytes of the tensors autograd saves in one training forward of `batch` images (on meta by default).

    Tensors are deduplicated by storage and parameters are excluded. Bytes are split into: block inputs
    (the activations entering each UNetBlock, which checkpointing keeps), per-block internals (which
    checkpointing discards and recomputes one block at a time in the backward pass) and the rest.
    Keys: outside, saved_inputs (saved tensors that are block inputs), inputs (all block inputs), blocks_sum, blocks_max.
    """
    with torch.device(device):
        model = cfg.replace(use_checkpoint=False).build().train()
    x, t, y = dummy_inputs(cfg, batch, device)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    keep: list[torch.Tensor] = []  # hold every tensor looked at, so that no storage address is recycled
    seen: set[int] = set()
    inputs: dict[int, int] = {}
    per_block: dict[int, int] = defaultdict(int)
    tally = {"outside": 0, "saved_inputs": 0}
    current: list[int | None] = [None]

    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def pre(mod: torch.nn.Module, args: tuple) -> None:
        current[0] = id(mod)
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() == 4:
                keep.append(a)
                inputs.setdefault(key(a), a.untyped_storage().nbytes())

    def post(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        current[0] = None

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = key(t)
        if k in params or k in seen:
            return t
        keep.append(t)
        seen.add(k)
        n = t.untyped_storage().nbytes()
        if k in inputs:
            tally["saved_inputs"] += n
        elif current[0] is None:
            tally["outside"] += n
        else:
            per_block[current[0]] += n
        return t

    hooks = []
    for m in model.modules():
        if isinstance(m, UNetBlock):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FusedAttentionOnMeta():
        model(x, t, y)
    for h in hooks:
        h.remove()
    tally["inputs"] = sum(inputs.values())
    tally["blocks_sum"] = sum(per_block.values())
    tally["blocks_max"] = max(per_block.values(), default=0)
    return tally


def activation_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """Activation memory per image (bytes, fp32) kept for the backward pass: (without, with checkpointing).

    Without: every saved tensor. With (non-reentrant checkpoint per UNetBlock): the tensors saved outside the
    blocks, plus every block's input (held by the checkpoint), plus the largest single block's internals
    (alive while that block is recomputed in the backward pass). Per image = tally(batch 2) - tally(batch 1),
    which removes the batch-independent part (the embedding tables' inputs etc.).
    """
    def totals(b: int) -> tuple[int, int]:
        s = saved_tensor_tally(cfg, b)
        return (s["outside"] + s["saved_inputs"] + s["blocks_sum"],
                s["outside"] + s["inputs"] + s["blocks_max"])

    (a1, c1), (a2, c2) = totals(1), totals(2)
    return a2 - a1, c2 - c1


def describe(name: str) -> dict[str, Any]:
    """One preset: name, params, gflops (forward, per image), act_mib and act_ckpt_mib (per image), image_size."""
    cfg = get_config(name)
    with torch.device("meta"):
        n = count_params(cfg.build())
    no_ckpt, ckpt = activation_bytes(cfg)
    return {"name": name, "params": n, "gflops": forward_flops(cfg) / 1e9, "act_mib": no_ckpt / 2**20,
            "act_ckpt_mib": ckpt / 2**20, "image_size": cfg.image_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_profile", description=(
        "Print parameters, forward GFLOPs per image and activation memory per image (fp32, without / with "
        "gradient checkpointing) of the model presets, measured on the meta device (nothing is allocated)."))
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"preset(s) to describe (default: all of {', '.join(PRESETS)})")
    args = ap.parse_args(argv)
    for n in args.names:
        if n not in PRESETS:
            print(f"error: unknown model preset {n!r}; allowed: {', '.join(PRESETS)}", file=sys.stderr)
            return 2
    print(f"{'preset':>7} {'px':>4} {'params':>14} {'paper':>7} {'GFLOPs/img':>11} {'act MiB/img':>12} "
          f"{'ckpt MiB/img':>13}")
    for n in args.names or list(PRESETS):
        d = describe(n)
        paper = f"{PAPER_PARAMS_M[n]:.1f}M" if n in PAPER_PARAMS_M else "-"
        print(f"{n:>7} {d['image_size']:>4} {d['params']:>14,} {paper:>7} {d['gflops']:>11.2f} "
              f"{d['act_mib']:>12.1f} {d['act_ckpt_mib']:>13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
