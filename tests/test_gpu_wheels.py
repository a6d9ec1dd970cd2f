"""The GPU machine's wheel folder check (benchmarks.gpu_wheels): a forgotten dependency, a second version, a wheel
for the wrong Python or a folder over the device tool's limit is reported before the wheels travel, since that
machine cannot fetch anything. Synthetic wheels (a METADATA file in a zip), no network."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from benchmarks.gpu_wheels import check, wheel_requirements

ROOT = Path(__file__).resolve().parents[1]


def make_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_markers_are_evaluated_for_cpython_312_on_linux(tmp_path) -> None:
    w = make_wheel(tmp_path, "pkg", "1.0", ["a", "b; python_version < '3.10'", "c; sys_platform == 'win32'",
                                            "d; extra == 'dev'", "e>=2; python_version >= '3.12'"])
    assert [r.name for r in wheel_requirements(w)] == ["a", "e"]


def test_a_complete_folder_passes(tmp_path) -> None:
    make_wheel(tmp_path, "deepspeed", "0.19.8", ["torch", "hjson", "pydantic>=2.0.0", "pywin32; sys_platform=='win32'"])
    make_wheel(tmp_path, "hjson", "3.1.0", [])
    make_wheel(tmp_path, "pydantic", "2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.6"])
    make_wheel(tmp_path, "pydantic-core", "2.50.5", [], tag="cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64")
    make_wheel(tmp_path, "pycryptodomex", "3.24.2", [], tag="cp37-abi3-manylinux2014_x86_64")  # stable ABI: fine
    assert check(tmp_path, image=frozenset({"torch", "typing-extensions"})) == []


def test_every_problem_is_one_line(tmp_path) -> None:
    make_wheel(tmp_path, "deepspeed", "0.19.8", ["torch", "hjson", "pydantic>=2"])  # hjson forgotten
    make_wheel(tmp_path, "pydantic", "1.10.0", [])  # too old for deepspeed
    make_wheel(tmp_path, "blobfile", "3.3.0", [])
    make_wheel(tmp_path, "blobfile", "3.2.0", [])  # a second version
    make_wheel(tmp_path, "lib", "1.0", [], tag="cp311-cp311-manylinux_2_17_x86_64")  # the wrong Python
    make_wheel(tmp_path, "mac", "1.0", [], tag="cp312-cp312-macosx_11_0_arm64")  # the wrong platform
    problems = check(tmp_path, image=frozenset({"torch"}), limit_mib=1e-6)
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "mac-1.0-cp312-cp312-macosx_11_0_arm64.whl: not a wheel for CPython 3.12" in text
    assert "needs hjson, which is neither carried nor on the GPU machine" in text
    assert "needs pydantic>=2, carried pydantic 1.10.0" in text
    assert "blobfile: two versions" in text
    assert "lib-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: not a wheel for CPython 3.12" in text
    assert "over the device tool's" in text


def test_cli_check_of_a_missing_folder_is_one_line_exit_2(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_wheels", "--check", "--dest", str(tmp_path / "no")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a folder" in r.stderr
