"""Checkpoints in and out at full size: released improved-/guided-diffusion configurations converted and compared
with the original code, and the shared digits model exported to diffusers and sampled by both.

    python -m benchmarks.convert_parity [--model /work/shared_models/uncond16/model.safetensors] [--threads 2]

Part 1: for each README configuration, guided-diffusion's own model (the guided-diffusion-sdk package) with its
default initialisation plus N(0, 0.01^2) on every weight (so zero-initialised output layers matter), torch.save'd,
converted by trainer.convert from the README flags; max |ours - theirs| on 2 random inputs at timesteps 10 and
900 (fp32, CPU), relative to max |theirs|. Part 2: the digits model exported by trainer.export_diffusers; 16
samples from the same generator by diffusers' DDPMScheduler loop and by our p_sample_loop (50 respaced steps,
diffusers' "leading" spacing = our "ddim50"); max |difference| in [-1, 1] units and uint8 pixels differing.
Writes benchmarks/results/convert-parity.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.fsio import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {  # name: README flags (guided-diffusion's and improved-diffusion's READMEs)
    "improved ImageNet-64 uncond (README flags)": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                                          "--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine",
    "guided 64x64 cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                         "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                         "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                         "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    "guided 64x64 classifier": "--image_size 64 --classifier_attention_resolutions 32,16,8 --classifier_depth 4 "
                               "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
                               "--classifier_use_scale_shift_norm True",
}


def _reference(flags: str) -> torch.nn.Module:
    """The original model for README flags, through guided-diffusion's own parser (improved-diffusion's defaults
    and channel table for flag sets without guided-only flags)."""
    import argparse as ap
    import inspect
    from guided_diffusion import script_util as su
    from guided_diffusion.unet import UNetModel
    from trainer import convert
    f, codebase, _ = convert.parse_flags(flags)
    if codebase == "improved":
        size = f["image_size"]
        return UNetModel(image_size=size, in_channels=3, model_channels=f["num_channels"],
                         out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
                         attention_resolutions=tuple(size // int(r) for r in f["attention_resolutions"].split(",")),
                         channel_mult=convert.CHANNEL_MULT["improved"][size],
                         num_classes=1000 if f["class_cond"] else None, num_heads=f["num_heads"],
                         use_scale_shift_norm=f["use_scale_shift_norm"])
    p = ap.ArgumentParser()
    su.add_dict_to_argparser(p, {**su.model_and_diffusion_defaults(), **su.classifier_defaults()})
    a = vars(p.parse_args(flags.split()))
    a["use_fp16"] = a["classifier_use_fp16"] = False  # fp16 blocks do not run on CPU; saved weights are fp32 anyway
    fn = su.create_classifier if "--classifier_width" in flags else su.create_model
    return fn(**{k: a[k] for k in inspect.signature(fn).parameters})


def part1(work: str) -> list[dict]:
    from trainer.convert import convert_openai, parse_flags
    from trainer.export import load_exported
    from evaluations.io import load_classifier
    rows = []
    for name, flags in CONFIGS.items():
        torch.manual_seed(0)
        ref = _reference(flags).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ckpt, out = os.path.join(work, "ref.pt"), os.path.join(work, "conv.safetensors")
        torch.save(ref.state_dict(), ckpt)
        t0 = time.perf_counter()
        convert_openai(ckpt, flags, out)
        sec = time.perf_counter() - t0
        classifier = "--classifier_width" in flags
        ours = load_classifier(out)[0] if classifier else load_exported(out)[0]
        f, _, _ = parse_flags(flags)
        scale = 1000.0 / f["diffusion_steps"] if (f["rescale_timesteps"] and not classifier) else 1.0
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(2, 3, 64, 64, generator=g), torch.tensor([10, 900])
        kw = {"y": torch.tensor([1, 999])} if f["class_cond"] and not classifier else {}
        with torch.no_grad():
            want = ref(x, t.float() * scale if scale != 1 else t, **kw)
            got = ours(x, t, **kw)
        d = (got - want).abs().max().item()
        rows.append({"name": name, "flags": flags, "params_m": sum(p.numel() for p in ref.parameters()) / 1e6,
                     "convert_s": round(sec, 2), "max_abs_diff": d, "max_abs_ref": want.abs().max().item(),
                     "rel_diff": d / want.abs().max().item()})
        print(rows[-1], flush=True)
    return rows


def part2(model: str, work: str, n: int = 16, steps: int = 50) -> dict:
    import diffusers
    from diffusion import create_diffusion
    from trainer.export import load_exported
    from trainer.export_diffusers import export_diffusers
    out = export_diffusers(model, os.path.join(work, "hf"))
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    sched = diffusers.DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    ours, dkw, meta = load_exported(model)
    size = meta["model"]["image_size"]
    shape = (n, meta["model"]["in_channels"], size, size)
    t0 = time.perf_counter()
    mine = create_diffusion(**dkw, timestep_respacing=f"ddim{steps}").p_sample_loop(
        ours, shape, generator=torch.Generator().manual_seed(0))
    t_ours = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    sched.set_timesteps(steps)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
    t_hf = time.perf_counter() - t0
    u8 = lambda z: ((z + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return {"model": model, "samples": n, "steps": steps, "diffusion": dkw,
            "scheduler": {k: sched.config[k] for k in ("beta_schedule", "variance_type", "prediction_type")},
            "max_abs_diff": (x - mine).abs().max().item(),
            "uint8_pixels_differing": int((u8(x) != u8(mine)).sum()), "uint8_pixels": int(x.numel()),
            "ours_s": round(t_ours, 2), "diffusers_s": round(t_hf, 2)}


def markdown(r: dict) -> str:
    lines = [f"# Checkpoints in and out at full size ({r['date']})", "", f"Machine: {r['machine']}; torch threads "
             f"{r['threads']}; load average at start {r['load']}.", f"Command: `{r['command']}`", "",
             "## Converted released configurations vs guided-diffusion-sdk (random weights, fp32, CPU)", "",
             "| configuration | params (M) | convert (s) | max abs diff | max abs output | relative |",
             "|---|---|---|---|---|---|"]
    for row in r["part1"]:
        lines.append(f"| {row['name']} | {row['params_m']:.1f} | {row['convert_s']} | {row['max_abs_diff']:.2e} | "
                     f"{row['max_abs_ref']:.3g} | {row['rel_diff']:.1e} |")
    p = r["part2"]
    lines += ["", "## Digits model exported to diffusers: the same 16 samples", "",
              f"`{p['model']}`, {p['steps']} steps ({p['scheduler']}).", "",
              f"- max |diffusers - ours| over the samples in [-1, 1]: {p['max_abs_diff']:.2e}",
              f"- uint8 pixels differing: {p['uint8_pixels_differing']} of {p['uint8_pixels']}",
              f"- wall time (shared, loaded CPU; not a speed comparison): ours {p['ours_s']} s, "
              f"diffusers {p['diffusers_s']} s", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convert_parity", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/shared_models/uncond16/model.safetensors")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    r = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "machine": f"{cpu}, nproc {os.cpu_count()}, {platform.python_version()}, torch {torch.__version__}",
         "threads": a.threads, "load": os.getloadavg()[0],
         "command": "python -m benchmarks.convert_parity " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as work:
        r["part1"] = part1(work)
        r["part2"] = part2(a.model, work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(str(RESULTS / "convert-parity.json"), r)
    atomic_write_text(str(RESULTS / "convert-parity.md"), markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
