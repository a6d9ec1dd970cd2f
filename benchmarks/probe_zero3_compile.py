"""ZeRO-3 + torch.compile probe (issue 19): the tests' small UNet on 2 gloo ranks, eager vs engine.compile(BACKEND).

    for r in 0 1; do RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 OMP_NUM_THREADS=1 \
        python benchmarks/probe_zero3_compile.py aot_eager & done; wait

Prints (rank 0) one JSON line: the losses and per-step seconds of 3 steps on one fixed batch, eager and compiled,
dynamo's graph count and number of graph breaks. Why the trainer refuses --compile at ZeRO-3 (trainer/compile.py).
"""
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
import deepspeed  # noqa: E402
from test_compile import small_model  # noqa: E402
from trainer.config import TrainConfig, deepspeed_config  # noqa: E402
from trainer.dist import skip_shm_comm_op  # noqa: E402


def run(compiled: bool, backend: str, rank: int) -> tuple[list[float], list[float]]:
    cfg = TrainConfig()
    cfg.optim.global_batch, cfg.optim.zero_stage, cfg.optim.lr = 8, 3, 1e-3
    m = small_model()
    e, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=deepspeed_config(cfg, 2))
    if compiled:
        e.compile(backend=backend, compile_kwargs={"dynamic": False})
    g = torch.Generator().manual_seed(1 + rank)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 100, (4,), generator=g), \
        torch.randint(0, 4, (4,), generator=g)
    losses, times = [], []
    for _ in range(3):
        t0 = time.time()
        loss = (e(x, t, y) - x.repeat(1, 2, 1, 1)).square().mean()
        e.backward(loss)
        e.step()
        losses.append(loss.item())
        times.append(time.time() - t0)
    return losses, times


if __name__ == "__main__":
    skip_shm_comm_op()  # as the trainer does (trainer.dist)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    backend, rank = sys.argv[1] if len(sys.argv) > 1 else "aot_eager", int(os.environ["RANK"])
    eager = run(False, backend, rank)
    from torch._dynamo.utils import counters
    compiled = run(True, backend, rank)
    if rank == 0:
        print(json.dumps({"backend": backend, "eager": eager, "compiled": compiled, "graphs": dict(counters["stats"]),
                          "graph_breaks": sum(counters["graph_break"].values())}), flush=True)
