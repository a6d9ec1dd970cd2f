"""trainer.dist.init on CPU: DeepSpeed's backend starts without building its shared-memory op, so a lock file left
in the torch extensions cache by a killed rank cannot hang later launches."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_init_builds_no_jit_op_and_ignores_a_stale_lock(tmp_path: Path) -> None:
    ext = tmp_path / "torch_extensions"
    stale = ext / "deepspeed_shm_comm" / "lock"  # as left by a rank killed during the op's build or load
    stale.parent.mkdir(parents=True)
    stale.touch()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    script = ("from trainer.dist import discover, init\nimport torch.distributed as dist\n"
              "print(init(discover()), dist.get_world_size(), flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "cpu 1"
    assert "built successfully" not in r.stdout + r.stderr
    assert sorted(p.relative_to(ext).as_posix() for p in ext.rglob("*")) == ["deepspeed_shm_comm",
                                                                            "deepspeed_shm_comm/lock"]
