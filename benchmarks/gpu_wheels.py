"""Wheels for the GPU machine: what benchmarks/gpu_check.sh needs there and that machine's Python lacks (issue 19).

    python -m benchmarks.gpu_wheels             # build/download into .whl/, then check (make gpu-wheels)
    python -m benchmarks.gpu_wheels --check     # only check an existing .whl/

The lent GPU machine (../shared/ENVIRONMENT.md, /work/.library/device/KINDS.md) has Python 3.12, torch 2.11 (CUDA),
mpi4py, tensorboard, pytest and many other packages (IMAGE_PACKAGES) but no deepspeed, webdataset, blobfile or
diffusers, and it reaches no registry. This script fetches, on a machine that does, exactly the missing ones
(CARRY) at the versions of this checkout (constraints.txt, else the version installed in the running Python)
as cp312 manylinux x86-64 wheels; DeepSpeed, published only as a source package, is built as a pure-Python wheel
(its ops compile just in time there). gpu_check.sh installs them with `pip install --no-index --no-deps --target`.

The check, the part that matters because that machine cannot fetch a forgotten dependency: every requirement of
every carried wheel (its METADATA's Requires-Dist, markers evaluated for CPython 3.12 on x86-64 Linux, extras
left out) is met by another carried wheel (name and version specifier) or by a package of IMAGE_PACKAGES (name
only: their versions were not all read); one version per name; the folder within the device tool's 64 MiB.
Exit 0 when the folder is complete, 1 with one line per problem otherwise, 2 for bad input.
"""
from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging import tags
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from data.cli import ArgumentParser, die

REPO = Path(__file__).resolve().parents[1]
# The packages the GPU machine's image holds (KINDS.md, "Python packages already there", read on 2026-11-17).
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
# What gpu_check needs there and the image lacks: our imports (deepspeed, blobfile, braceexpand; webdataset and
# diffusers for tests and bench_sampling) and their own missing requirements.
CARRY = ("deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "blobfile",
         "pycryptodomex", "braceexpand", "webdataset", "diffusers", "importlib-metadata", "lazy-importer")
BUILD_FROM_SOURCE = ("deepspeed",)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# Every wheel tag CPython 3.12 accepts on those platforms (cp312, abi3 of older CPythons, py3, none-any, ...).
TARGET_TAGS = frozenset(list(tags.cpython_tags((3, 12), platforms=PLATFORMS))
                        + list(tags.compatible_tags((3, 12), "cp312", platforms=PLATFORMS)))
LIMIT_MIB = 64  # the device tool's working-tree limit, carried paths included
PROG = "python -m benchmarks.gpu_wheels"


def pinned_versions(names: tuple[str, ...] = CARRY) -> dict[str, str]:
    """name -> version: constraints.txt's pin, else the version installed in this Python (known-good here)."""
    from importlib.metadata import PackageNotFoundError, version
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    out = {}
    for n in names:
        key = canonicalize_name(n)
        if key not in pins:
            try:
                pins[key] = version(n)
            except PackageNotFoundError:
                die(f"{n} is neither pinned in constraints.txt nor installed here; run make venv first", PROG, 1)
        out[n] = pins[key]
    return out


def fetch(dest: Path, versions: dict[str, str]) -> None:
    """Build (BUILD_FROM_SOURCE) or download (cp312 manylinux binaries or pure wheels) each name==version."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, ver in versions.items():
        spec = f"{name}=={ver}"
        print(f"{spec}", flush=True)
        if name in BUILD_FROM_SOURCE:
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", TARGET["python_version"], "--implementation", "cp", "-d", str(dest), spec]
            for plat in PLATFORMS:
                cmd += ["--platform", plat]
        subprocess.run(cmd, check=True)


def wheel_requirements(path: Path) -> list[Requirement]:
    """Requires-Dist of a wheel's METADATA whose markers hold on the GPU machine (extras left out)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    reqs = []
    for line in msg.get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is None or Marker(str(r.marker)).evaluate(dict(TARGET)):
            reqs.append(r)
    return reqs


def check(folder: Path, image: frozenset[str] = IMAGE_PACKAGES, limit_mib: float = LIMIT_MIB) -> list[str]:
    """Problems with the wheel folder (empty list: complete). See the module docstring for what is checked."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return [f"{folder}: no wheels"]
    problems, have = [], {}
    for w in wheels:
        name, ver, _, wheel_tags = parse_wheel_filename(w.name)
        if not wheel_tags & TARGET_TAGS:
            problems.append(f"{w.name}: not a wheel for CPython 3.12 on x86-64 Linux")
        if name in have:
            problems.append(f"{name}: two versions ({have[name]} and {ver}); pip --no-deps would stop on them")
        have[name] = ver
    for w in wheels:
        for r in wheel_requirements(w):
            key = canonicalize_name(r.name)
            if key in have:
                if r.specifier and not r.specifier.contains(Version(str(have[key])), prereleases=True):
                    problems.append(f"{w.name}: needs {r}, carried {key} {have[key]}")
            elif key not in image:
                problems.append(f"{w.name}: needs {r}, which is neither carried nor on the GPU machine")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > limit_mib:
        problems.append(f"{folder}: {size:.1f} MiB of wheels, over the device tool's {limit_mib} MiB")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--dest", default=str(REPO / ".whl"), help="wheel folder (default: .whl/ in the checkout, "
                   "git-ignored; name it in the device tool's carry)")
    p.add_argument("--check", action="store_true", help="only check the folder, fetch nothing")
    a = p.parse_args(argv)
    dest = Path(a.dest)
    if a.check and not dest.is_dir():
        die(f"{dest} is not a folder; run python -m benchmarks.gpu_wheels first", PROG)
    if not a.check:
        fetch(dest, pinned_versions())
    problems = check(dest)
    for line in problems:
        print(f"gpu_wheels: {line}", file=sys.stderr)
    if not problems:
        n = len(list(dest.glob("*.whl")))
        size = sum(w.stat().st_size for w in dest.glob("*.whl")) / 2**20
        print(f"{dest}: {n} wheels, {size:.1f} MiB, every requirement met by a carried wheel or the GPU image")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
