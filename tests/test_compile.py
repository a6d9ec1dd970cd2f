"""--compile: compiled inference equals eager within fp32 rounding (inductor), compiled training under DeepSpeed
ZeRO 0/1/2 equals eager (dynamo + AOTAutograd graphs, backend aot_eager: the same graphs inductor gets, without its
minutes of C++ compilation on 2 cores), ZeRO-3 refused with one line, the CLI flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest UNet with every kind of block (res, attention, down/up, skip concat); inductor compiles it fast.
SMALL = dict(image_size=8, model_channels=8, num_res_blocks=1, attention_resolutions=[4], channel_mult=[1, 2],
             num_classes=3, num_head_channels=8, num_groups=4)


def small_model(seed: int = 0) -> torch.nn.Module:
    """SMALL with every parameter random (the zero-initialised output convs would hide differences)."""
    from diffusion.presets import ModelConfig
    torch.manual_seed(seed)
    m = ModelConfig.from_dict(SMALL).build()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def small_path(tmp_path_factory) -> str:
    from trainer.export import save_exported
    path = str(tmp_path_factory.mktemp("model") / "small.safetensors")
    save_exported(path, small_model().state_dict(), SMALL, {"steps": 100, "noise_schedule": "cosine",
                                                            "learn_sigma": True}, step=0, ema="model")
    return path


@pytest.mark.slow
def test_compiled_sampling_equals_eager(small_path, monkeypatch):
    """sample() with compile=True vs eager: DDIM 4 steps with classifier-free guidance (one batched forward of 2B),
    the same uint8 images up to one level where rounding straddles a boundary; compilation reported outside the
    timed seconds. Backend aot_eager (dynamo + AOTAutograd graphs; inductor's numerics: the next test)."""
    from evaluations.sample import sample
    monkeypatch.setenv("IDDPM_COMPILE_BACKEND", "aot_eager")
    kw = dict(batch_size=2, ddim=4, guidance_scale=2.0, seed=1, progress=False, threads=1)
    eager = sample(small_path, 2, **kw)
    compiled = sample(small_path, 2, compile=True, **kw)
    diff = np.abs(eager.images.astype(int) - compiled.images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    np.testing.assert_array_equal(eager.labels, compiled.labels)
    assert compiled.report["compile"] == "default" and eager.report["compile"] is False
    assert compiled.report["warmup_seconds"] > 0 and eager.report["warmup_seconds"] == 0


@pytest.mark.slow
def test_inductor_forward_equals_eager():
    """The inductor-compiled UNet (InferenceNet, fp32) equals eager within fp32 rounding. Inductor compiles C++
    kernels: minutes with a cold cache on 2 busy cores, seconds once TORCHINDUCTOR_CACHE_DIR holds them."""
    from trainer.compile import InferenceNet
    m = small_model().eval()
    net, ref = InferenceNet(m, torch.device("cpu"), compile=True), InferenceNet(m, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 10, 50, 99]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        a, b = net(x, t, y=y), ref(x, t, y=y)
    assert a.dtype == torch.float32 and b.abs().max() > 1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.gpu
def test_cuda_compiled_bf16_channels_last_close_to_fp32():
    """On CUDA: InferenceNet compiled, bf16 autocast, channels_last (the default there) stays within bf16 rounding
    of the fp32 eager model, returns fp32, and compiled fp32 equals eager fp32 within fp32 rounding (TF32 off)."""
    from trainer.compile import InferenceNet
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    m = small_model().eval().to(dev)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g).to(dev), torch.tensor([0, 10, 50, 99], device=dev), \
        torch.tensor([0, 1, 2, 3], device=dev)
    with torch.no_grad():
        ref = m(x, t, y)
        fast = InferenceNet(m, dev, compile=True, precision="bf16")
        out = fast(x, t, y=y)
        exact = InferenceNet(m, dev, compile=True)(x, t, y=y)
    assert fast.channels_last and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def engine_losses(stage: int, compiled: bool, steps: int = 3) -> tuple[list[float], torch.Tensor]:
    """`steps` AdamW steps of SMALL under a DeepSpeed engine (the trainer's generated config for ZeRO `stage`);
    returns the losses and the final flat fp32 parameters."""
    import deepspeed
    from trainer.compile import compile_engine
    from trainer.config import TrainConfig, deepspeed_config
    cfg = TrainConfig()
    cfg.optim.global_batch, cfg.optim.zero_stage, cfg.optim.lr = 4, stage, 1e-3
    m = small_model()
    engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=deepspeed_config(cfg, 1))
    if compiled:
        compile_engine(engine, stage)
    g, losses = torch.Generator().manual_seed(1), []
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 100, (4,), generator=g), \
        torch.randint(0, 4, (4,), generator=g)
    for _ in range(steps):  # one fixed batch: the loss must fall
        loss = (engine(x, t, y) - x.repeat(1, 2, 1, 1)).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])


@pytest.mark.slow
def test_compiled_training_equals_eager_zero_0_1_2(tmp_path):
    """Compiled (aot_eager) and eager training give the same losses and weights at ZeRO 0, 1 and 2 (one rank,
    real DeepSpeed engines, in a child process that owns the process group)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", IDDPM_COMPILE_BACKEND="aot_eager", RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    out = tmp_path / "engine.json"
    subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    res = json.loads(out.read_text())
    for stage in ("0", "1", "2"):
        eager, compiled = res[stage]
        assert eager["losses"][0] > eager["losses"][-1] > 0  # it trains
        np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-5)
        assert compiled["param_max_diff"] <= 1e-5 * compiled["param_max"]


def test_zero3_refused_and_flags(capsys):
    """--compile parses into optim.compile; with --zero-stage 3 the trainer refuses in one line (exit 2); the
    inference CLIs take --compile/--precision and refuse a precision they do not know."""
    from trainer.config import parse_config
    from trainer.main import main as train_main
    cfg = parse_config(["--data", "x", "--run-dir", "r", "--compile"])
    assert cfg.optim.compile and cfg.to_dict()["optim"]["compile"] is True
    assert parse_config(["--data", "x", "--run-dir", "r"]).optim.compile is False
    with pytest.raises(SystemExit) as e:
        train_main(["--data", "x", "--run-dir", "r", "--compile", "--zero-stage", "3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--zero-stage 3" in err and "--no-compile" in err
    from evaluations.sample import build_parser
    a = build_parser().parse_args(["--model", "m", "--num-samples", "1", "--out", "o.npz", "--compile",
                                   "--precision", "bf16"])
    assert a.compile and a.precision == "bf16"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--model", "m", "--num-samples", "1", "--out", "o.npz", "--precision", "fp8"])
    assert e.value.code == 2


def test_inference_net_checks():
    """bf16 on a device without it is one UsageError; fp32 eager InferenceNet is the model itself, in fp32."""
    from data.cli import UsageError
    from trainer.compile import InferenceNet, bf16_supported, compile_options
    m = small_model().eval()
    if not bf16_supported(torch.device("cpu")):
        with pytest.raises(UsageError, match="bf16"):
            InferenceNet(m, torch.device("cpu"), precision="bf16")
    with pytest.raises(UsageError, match="fp8"):
        InferenceNet(m, torch.device("cpu"), precision="fp8")
    with pytest.raises(UsageError, match="compile mode"):
        compile_options("fastest")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(InferenceNet(m, torch.device("cpu"))(x, t, y=y), m(x, t, y), rtol=0, atol=0)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # the child of test_compiled_training_equals_eager_zero_0_1_2
    import deepspeed
    from trainer.dist import skip_shm_comm_op
    skip_shm_comm_op()  # as the trainer does
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    result = {}
    for z in (0, 1, 2):
        runs = []
        for compiled in (False, True):
            losses, params = engine_losses(z, compiled)
            runs.append({"losses": losses, "params": params})
        diff = float((runs[0]["params"] - runs[1]["params"]).abs().max())
        result[str(z)] = [{"losses": r["losses"], "param_max_diff": diff, "param_max": float(r["params"].abs().max())}
                          for r in runs]
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
