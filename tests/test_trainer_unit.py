"""Trainer parts in one process: EMA closed form, config/CLI validation, DeepSpeed config, export round trip."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from data.cli import UsageError
from trainer.config import RECIPES, TrainConfig, batch_layout, config_from_dict, deepspeed_config, parse_config
from trainer.ema import EMA, Shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ema_matches_closed_form() -> None:
    # ema_n = r^n p_0 + sum_{k=1..n} (1 - r) r^(n-k) p_k, for every rate at once
    torch.manual_seed(0)
    seq = [torch.randn(5, 3, dtype=torch.float64) for _ in range(41)]
    rates = ["0.9", "0.5", "0.99"]
    w = seq[0].float()
    ema = EMA(rates, [Shard("w", w.shape, 0, w.view(-1))], sharded=False, names=[("w", w.shape)])
    for p in seq[1:]:
        w.copy_(p)  # the optimizer updates the masters in place; the EMA reads them through its view
        ema.update()
    n = len(seq) - 1
    for r in rates:
        rf = float(r)
        want = rf ** n * seq[0] + sum((1 - rf) * rf ** (n - k) * seq[k] for k in range(1, n + 1))
        got = ema.full_state_dict(r)["w"]
        assert got.dtype == torch.float32 and got.shape == (5, 3)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_ema_of_bf16_source_accumulates_in_fp32() -> None:
    w = torch.zeros(4, dtype=torch.bfloat16)
    ema = EMA(["0.999"], [Shard("w", w.shape, 0, w)], sharded=False, names=[("w", w.shape)])
    w.fill_(1)
    for _ in range(10):
        ema.update()
    want = 1 - 0.999 ** 10  # 0.00995..., below bf16 resolution near 1 but exact in fp32
    torch.testing.assert_close(ema.full_state_dict("0.999")["w"], torch.full((4,), want),
                               rtol=1e-5, atol=0)


def test_ema_load_takes_each_shard_from_the_full_tensor() -> None:
    a, b = torch.zeros(3), torch.zeros(2)  # two ranks' fragments of one [5] parameter, as shards
    names = [("w", torch.Size([5]))]
    left = EMA(["0.5"], [Shard("w", torch.Size([5]), 0, a)], sharded=True, names=names)
    right = EMA(["0.5"], [Shard("w", torch.Size([5]), 3, b)], sharded=True, names=names)
    full = {"w": torch.arange(5.0)}
    left.load("0.5", full), right.load("0.5", full)
    assert left.shadow["0.5"][0].tolist() == [0, 1, 2] and right.shadow["0.5"][0].tolist() == [3, 4]
    with pytest.raises(ValueError, match="shape"):
        left.load("0.5", {"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="missing"):
        left.load("0.5", {"v": torch.zeros(5)})


def _sharded_ema_rank(rank: int, port: int, q) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # parameter u [2, 3] split 4 | 2, parameter v [3] held whole by rank 1
    full_u, full_v = torch.arange(6.0).view(2, 3), torch.tensor([10.0, 11.0, 12.0])
    shards = [Shard("u", full_u.shape, 0, full_u.view(-1)[:4].clone())] if rank == 0 else \
        [Shard("u", full_u.shape, 4, full_u.view(-1)[4:].clone()), Shard("v", full_v.shape, 0, full_v.clone())]
    names = [("u", full_u.shape), ("v", full_v.shape)]
    ema = EMA(["0.5"], shards, sharded=True, names=names)
    for s in shards:
        s.master.mul_(3)  # one step toward 3 x: ema = 0.5 x + 0.5 * 3x = 2x
    ema.update()
    out = ema.full_state_dict("0.5")
    masters = ema.full_masters()
    ema.check_coverage()  # 4 + 2 + 3 elements: complete
    bigger = EMA(["0.5"], shards, sharded=True, names=names + [("w", torch.Size([2]))])
    try:  # a layout that covers fewer elements than the model has is refused on every rank
        bigger.check_coverage()
        refused = False
    except RuntimeError as e:
        refused = "cover 9 parameter elements" in str(e)
    assert refused
    q.put((rank, out, masters))
    dist.destroy_process_group()


def test_sharded_ema_assembles_full_tensors_on_rank0_over_gloo() -> None:
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sharded_ema_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (o, m)) for r, o, m in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[1] == (None, None)
    out, masters = got[0]
    torch.testing.assert_close(out["u"], 2 * torch.arange(6.0).view(2, 3))
    torch.testing.assert_close(out["v"], torch.tensor([20.0, 22.0, 24.0]))
    torch.testing.assert_close(masters["u"], 3 * torch.arange(6.0).view(2, 3))


def make_config(**optim) -> TrainConfig:
    return config_from_dict({"data": {"source": "d"}, "run": {"run_dir": "r"}, "optim": optim})


def test_batch_layout_and_errors() -> None:
    c = make_config(global_batch=64, micro_batch=8)
    assert batch_layout(c, 2) == (8, 4)
    assert batch_layout(make_config(global_batch=64), 4) == (16, 1)
    with pytest.raises(UsageError, match="not divisible by the 3 ranks"):
        batch_layout(c, 3)
    with pytest.raises(UsageError, match="not a multiple of --micro-batch 12"):
        batch_layout(make_config(global_batch=64, micro_batch=12), 2)


def test_deepspeed_config_generation_and_override(tmp_path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}))
    c = make_config(global_batch=32, micro_batch=4, precision="bf16", zero_stage=2, lr=3e-4, weight_decay=0.01,
                    deepspeed_config=str(user))
    ds = deepspeed_config(c, 2, on_gpu=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_scatter": False,
                                       "use_multi_rank_bucket_allreduce": False,
                                       "contiguous_gradients": False}  # merged, not replaced
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True
    gpu = deepspeed_config(c, 2, on_gpu=True)  # on GPU: torch's fused AdamW too (no JIT-built op), DeepSpeed's
    assert gpu["optimizer"] == ds["optimizer"] and "reduce_scatter" not in gpu["zero_optimization"]  # ZeRO defaults
    assert "contiguous_gradients" not in gpu["zero_optimization"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    fp16 = deepspeed_config(make_config(precision="fp16"), 1)
    assert fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling


def test_recipes_and_precedence(tmp_path) -> None:
    cfile = tmp_path / "c.json"
    cfile.write_text(json.dumps({"optim": {"lr": 5e-5, "total_steps": 7}}))
    c = parse_config(["--recipe", "imagenet64-vlb", "--config", str(cfile), "--total-steps", "9",
                      "--data", "x", "--run-dir", "y"])
    o = c.objective.options
    assert (o.diffusion.loss, o.timestep_sampler, o.model.size, o.diffusion.steps) == \
        ("vlb", "loss-second-moment", "120M", 4000)
    assert c.optim.lr == 5e-5 and c.optim.total_steps == 9  # recipe < config file < flags
    assert {"imagenet64-hybrid", "imagenet64-cond", "imagenet64-scale-270M", "digits-demo"} <= set(RECIPES)
    for name in RECIPES:  # every recipe is a valid configuration
        parse_config(["--recipe", name, "--data", "x", "--run-dir", "y"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of fp16")
def test_fp16_refused_on_cpu() -> None:
    with pytest.raises(UsageError, match="use --precision bf16 or fp32"):
        parse_config(["--data", "x", "--run-dir", "y", "--precision", "fp16"])


@pytest.mark.parametrize("args, msg", [
    (["--model-size", "nope"], "model.size (--model-size): 'nope' is not one of 30M, 70M, 120M, 270M, tiny16"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--precision", "fp8"], "optim.precision (--precision): 'fp8' is not one of fp32, bf16, fp16"),
    (["--global-batch", "10", "--micro-batch", "3"], "not a multiple of --micro-batch 3"),
    (["--ema", "1.5"], "optim.ema (--ema) '1.5'"),
    (["--recipe", "imagenet256"], "unknown recipe 'imagenet256'"),
    (["--lr", "-1"], "optim.lr (--lr): -1.0 must be > 0.0"),
    (["--total-steps", "2.5"], "optim.total_steps (--total-steps): '2.5' is not an integer"),
    (["--label-dropout", "1"], "objective.iddpm.label_dropout (--label-dropout): 1.0 must be < 1.0"),
    (["--timestep-sampler", "x"], "objective.iddpm.timestep_sampler (--timestep-sampler): 'x' is not one of uniform"),
    (["--objective", "nope"], "objective.name (--objective) 'nope' is not one of"),  # iddpm, and any registered
    (["--adam-betas", "0.9"], "optim.adam_betas (--adam-betas): '0.9' is not a comma-separated pair"),
])
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, args: list[str], msg: str) -> None:
    from trainer.main import main
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path / "missing.tar"), "--run-dir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    if "--objective" in args:
        assert "iddpm" in err[0] and "path/to/file.py:Class" in err[0]


@pytest.mark.parametrize("content, msg", [
    ({"model": {"size": "nope"}}, "model.size (--model-size): 'nope' is not one of 30M"),
    ({"optim": {"lrr": 1}}, "unknown setting optim.lrr; optim has adam_betas"),
    ({"optim": {"zero_stage": 5}}, "optim.zero_stage (--zero-stage): 5 is not one of 0, 1, 2, 3"),
    ({"data": {"flip": "maybe"}}, "data.flip (--flip): 'maybe' is not true or false"),
    ({"objective": {"iddpm": {"label_dropout": -0.5}}}, "objective.iddpm.label_dropout (--label-dropout): -0.5 must"),
    ({"diffusion": 3}, "section diffusion must be a JSON object"),
])
def test_bad_config_file_value_one_line_exit_2(tmp_path, monkeypatch, capsys, content: dict, msg: str) -> None:
    """A bad value in a config file names the field, its flag and the allowed values, like a bad flag."""
    from trainer.main import main
    cfile = tmp_path / "c.json"
    cfile.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as e:
        main(["--data", "x", "--run-dir", str(tmp_path / "run"), "--config", str(cfile)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and msg in err[0], err


def test_config_json_round_trip_reproduces_the_run(tmp_path) -> None:
    """config.json of a run is the nested config; --config RUN/config.json gives the same configuration, and
    frozen settings are field metadata (a changed one is reported by flag)."""
    from trainer.config import frozen_changes
    c = parse_config(["--recipe", "digits-demo", "--data", "x", "--run-dir", "y", "--lr", "3e-3", "--no-flip"])
    iddpm = c.to_dict()["objective"]["iddpm"]
    assert c.to_dict()["objective"]["name"] == "iddpm" and c.to_dict()["objective"]["sampler_sync"] == "torch"
    assert (iddpm["label_dropout"], iddpm["timestep_sampler"], iddpm["model"]["size"], iddpm["diffusion"]["steps"]) \
        == (0.1, "loss-second-moment", "tiny16", 1000) and "model" not in c.to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(c.to_dict()))
    again = parse_config(["--config", str(path)])
    assert again.to_dict() == c.to_dict() and again.data.flip is False and again.optim.lr == 3e-3
    other = parse_config(["--config", str(path), "--seed", "5", "--timestep-sampler", "uniform", "--lr", "1"])
    assert frozen_changes(c.to_dict(), other) == ["--seed"]  # lr is not frozen; the objective's are checked next
    assert frozen_changes(c.to_dict(), parse_config(["--config", str(path), "--timestep-sampler", "uniform"])) == \
        ["--timestep-sampler"]


def test_help_is_grouped_by_section() -> None:
    from trainer.config import build_parser
    text = build_parser().format_help()
    for title in ("run:", "data:", "objective iddpm: model (a diffusion.presets UNet plus overrides):",
                  "objective iddpm: diffusion process and loss:", "objective:", "optimisation (DeepSpeed):",
                  "checkpoints and preemption:", "logging and preview grids:", "objective iddpm:"):
        assert "\n" + title + "\n" in text, title
    assert "--model-size {30M,70M,120M,270M,tiny16,tiny32}" in text and "frozen on resume" in text
    assert "--max-t" not in text and "--objective NAME --help" in text  # another objective's settings: its own help
    vdm = build_parser("vdm").format_help()
    assert "\nobjective vdm: model (a diffusion.presets UNet plus overrides):\n" in vdm and "--fourier" in vdm
    assert "--timestep-sampler" not in vdm and "--diffusion-steps" not in vdm


def test_configs_of_the_one_network_trainer_are_read_in_todays_layout(tmp_path) -> None:
    """config.json of runs before the objectives owned their settings (global model/diffusion sections) still
    resumes and serves as --config: the sections move under the objective, model.compile to optim.compile."""
    from trainer.config import frozen_changes, upgrade
    old = {"run": {"run_dir": "r", "seed": 0}, "data": {"source": "x"},
           "model": {"size": "tiny16", "image_size": 16, "num_classes": 10, "dropout": None, "grad_checkpoint": False,
                     "compile": True},
           "diffusion": {"steps": 50, "noise_schedule": "cosine", "loss": "hybrid", "vlb_weight": 0.001,
                         "learn_sigma": True},
           "objective": {"name": "classifier", "sampler_sync": "torch", "classifier": {"classifier_size": "tiny16"}}}
    new = upgrade(old)
    assert new["objective"]["classifier"] == {"classifier_size": "tiny16", "model": {
        "image_size": 16, "num_classes": 10, "dropout": None, "grad_checkpoint": False},
        "diffusion": {"steps": 50, "noise_schedule": "cosine"}} and new["optim"] == {"compile": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**old, "optim": {"zero_stage": 0}}))
    c = parse_config(["--config", str(path)])
    assert c.objective.options.diffusion.steps == 50 and c.objective.options.model.num_classes == 10
    legacy = c.to_dict()  # the whole config.json such a run wrote
    own = legacy["objective"]["classifier"]
    legacy["model"] = {**own.pop("model"), "size": "tiny16", "compile": legacy["optim"].pop("compile")}
    legacy["diffusion"] = {**own.pop("diffusion"), "loss": "hybrid", "vlb_weight": 0.001, "learn_sigma": True}
    assert frozen_changes(legacy, c) == []
    assert frozen_changes(legacy, parse_config(["--config", str(path), "--diffusion-steps", "60"])) == \
        ["--diffusion-steps"]


def test_a_subclass_sharing_its_parents_options_shares_its_section() -> None:
    """A plugin subclassing a built-in objective (same Options class) neither breaks --help nor its own flags."""
    from trainer.config import build_parser, parse_config
    from trainer.iddpm import ImprovedDDPM
    from trainer.objective import OBJECTIVES, register_objective
    register_objective("test-iddpm-subclass")(type("IddpmSubclass", (ImprovedDDPM,), {}))
    try:
        assert build_parser().format_help().count("\n  --timestep-sampler") == 1
        c = parse_config(["--data", "x.tar", "--run-dir", "r", "--objective", "test-iddpm-subclass",
                          "--timestep-sampler", "uniform"])
        assert c.objective.name == "test-iddpm-subclass" and c.objective.options.timestep_sampler == "uniform"
        assert parse_config(["--data", "x.tar", "--run-dir", "r", "--timestep-sampler", "uniform"]
                            ).objective.options.timestep_sampler == "uniform"
    finally:
        del OBJECTIVES["test-iddpm-subclass"]


def test_cli_missing_dataset_one_line_exit_2(tmp_path) -> None:
    """The real command line: a missing data set is one line on stderr and exit code 2."""
    r = subprocess.run([sys.executable, "-m", "trainer.main", "--data", "/nonexistent/shards-{000000..000003}.tar",
                        "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "--data /nonexistent/shards-" in lines[0], r.stderr


def test_help_exits_0() -> None:
    for mod in ("trainer.main", "trainer.export"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout, (mod, r.stderr)


def test_export_round_trip_and_sample(tmp_path) -> None:
    from diffusion import create_diffusion
    from diffusion.presets import create_model, get_config
    from trainer.export import load_exported, save_exported
    torch.manual_seed(0)
    model = create_model("tiny16")
    dkw = {"steps": 100, "noise_schedule": "cosine", "learn_sigma": True, "loss": "hybrid", "vlb_weight": 0.001}
    path = str(tmp_path / "m.safetensors")
    save_exported(path, model.state_dict(), get_config("tiny16").to_dict(), dkw, step=12, ema="0.9999")
    loaded, kw, meta = load_exported(path)
    assert kw == dkw and meta["step"] == 12 and meta["ema"] == "0.9999"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = create_diffusion(**kw, timestep_respacing="4").p_sample_loop(
        loaded, (2, 3, 16, 16), model_kwargs={"y": torch.tensor([3, 10])})  # 10 = the null label
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_export_cli_errors(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "trainer.export", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no checkpoint" in r.stderr


_THP_PROBE = """
import os
import trainer.main  # first, as in a real run: it sets the variable before torch is imported
import torch
x = torch.ones(64 << 18)  # 64 MiB, touched
kb = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print(os.environ["THP_MEM_ALLOC_ENABLE"], kb[0] if kb else -1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_trainer_turns_on_transparent_huge_pages_unless_told_not_to() -> None:
    def probe(value: str | None) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = value
        out = subprocess.run([sys.executable, "-c", _THP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    flag, huge_kb = probe(None)
    assert flag == "1"  # set by trainer.main before torch's first allocation
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in mode:  # the kernel honours madvise: the 64 MiB tensor sits (mostly) on 2 MiB pages
        assert huge_kb >= 32 * 1024, (mode, huge_kb)
    flag, huge_kb = probe("0")
    assert flag == "0"  # the user's setting wins
    if "[madvise]" in mode:
        assert huge_kb < 4 * 1024
