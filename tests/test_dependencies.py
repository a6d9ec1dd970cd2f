"""pyproject.toml declares exactly what the code imports.

Every third-party import of product code (diffusion/, data/, trainer/, evaluations/, cluster/*.py) is a core
dependency, or an optional extra imported lazily (inside a function, with a clear error when missing); every
core dependency is imported by product code (or is in NO_IMPORT with the reason); tests and benchmarks import
only declared distributions, and the `dev` extra holds nothing they do not use. Imports are read with `ast`:
`import x`, `from x import y`, and the string forms `importlib.import_module("x")`,
`importlib.util.find_spec("x")` and `pytest.importorskip("x")`.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ["diffusion", "data", "trainer", "evaluations"]
# import name -> distribution name, where they differ by more than '_' vs '-'
DIST_OF = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "cv2": "opencv-python",
           "skimage": "scikit-image", "google": "protobuf", "attr": "attrs",
           "guided_diffusion": "guided-diffusion-sdk"}
# a module whose import needs a distribution that provides no module of that name
IMPLIED = {"torch.utils.tensorboard": "tensorboard"}
# declared, never imported: why they are needed anyway
NO_IMPORT = {"mpich": "the MPI library mpi4py loads, and the mpiexec launcher",
             "ninja": "DeepSpeed's C++/CUDA op builds"}
STRING_IMPORTERS = {"import_module", "find_spec", "importorskip"}


@dataclass(frozen=True)
class Import:
    module: str  # dotted name as written
    where: str  # path:line
    lazy: bool  # inside a function body (not run at import time)


def dist_name(requirement: str) -> str:
    """'torch>=2.4' -> 'torch'; PEP 503 normalised ('Scikit_Learn' -> 'scikit-learn')."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def dists_of(module: str) -> set[str]:
    """Distributions an import of `module` needs (top-level name mapped, plus IMPLIED ones)."""
    top = module.split(".")[0]
    out = {dist_name(DIST_OF.get(top, top))}
    out |= {dist_name(d) for m, d in IMPLIED.items() if module == m or module.startswith(m + ".")}
    return out


def imports_of(path: Path) -> list[Import]:
    """Absolute imports of one file, with whether each runs only when a function is called."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, where, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(Import(node.module, where, lazy))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in STRING_IMPORTERS:
                found.append(Import(node.args[0].value, where, lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def local_names() -> set[str]:
    """First-party top-level names: the packages, and modules importable from tests/ and benchmarks/."""
    names = set(PRODUCT) | {"tests", "benchmarks", "cluster"}
    for folder in ("tests", "benchmarks"):
        names |= {p.stem for p in (REPO / folder).glob("*.py")}
    return names


def third_party(files: list[Path]) -> list[Import]:
    skip = set(sys.stdlib_module_names) | local_names()
    return [i for f in files for i in imports_of(f) if i.module.split(".")[0] not in skip]


def _product_files() -> list[Path]:
    return [p for d in PRODUCT for p in sorted((REPO / d).rglob("*.py"))] + sorted((REPO / "cluster").glob("*.py"))


def _test_files() -> list[Path]:
    return sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))


@pytest.fixture(scope="module")
def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core dependencies, {extra: dependencies}) from pyproject.toml, normalised."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {dist_name(r) for r in project["dependencies"]}
    extras = {k: {dist_name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return core, extras


def test_the_parser_sees_every_import_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "m.py").write_text("import numpy as np, os.path\nfrom PIL import Image\nfrom . import sibling\n"
                                   "def f():\n    import sklearn.datasets\n    importlib.util.find_spec('torch_fidelity')\n"
                                   "from torch.utils.tensorboard import SummaryWriter\n")
    got = {(i.module, i.lazy) for i in imports_of(tmp_path / "m.py")}
    assert got == {("numpy", False), ("os.path", False), ("PIL", False), ("sklearn.datasets", True),
                   ("torch_fidelity", True), ("torch.utils.tensorboard", False)}
    assert dists_of("PIL") == {"pillow"} and dists_of("torch_fidelity.x") == {"torch-fidelity"}
    assert dists_of("torch.utils.tensorboard") == {"torch", "tensorboard"}
    assert dist_name("Scikit_Learn>=1.0 ; python_version>'3'") == "scikit-learn"


def test_product_imports_are_declared(declared) -> None:
    core, extras = declared
    optional = set().union(*extras.values()) - core
    missing, eager = [], []
    for imp in third_party(_product_files()):
        for d in dists_of(imp.module):
            if d in optional and not imp.lazy:
                eager.append(f"{imp.where}: {imp.module} ({d} is only an extra: import it inside a function)")
            elif d not in core | optional:
                missing.append(f"{imp.where}: {imp.module} needs {d}")
    assert not missing, "product code imports undeclared distributions: " + "; ".join(missing)
    assert not eager, "optional distributions imported at module level: " + "; ".join(eager)


def test_declared_dependencies_are_used(declared) -> None:
    core, extras = declared
    product = {d for i in third_party(_product_files()) for d in dists_of(i.module)}
    tests = {d for i in third_party(_test_files()) for d in dists_of(i.module)} | {"pytest"}
    unused_core = core - product - set(NO_IMPORT)
    assert not unused_core, f"declared but never imported by product code: {sorted(unused_core)}"
    assert not set(NO_IMPORT) - core, "NO_IMPORT names a distribution that is not a core dependency"
    for name, dists in extras.items():
        users = tests if name == "dev" else product
        assert not dists - users, f"extra {name!r} declares {sorted(dists - users)}, which nothing imports"
    assert not extras.get("dev", set()) & core, "a dev extra repeats a core dependency"


def test_test_and_benchmark_imports_are_declared(declared) -> None:
    core, extras = declared
    everything = core.union(*extras.values())
    missing = [f"{i.where}: {i.module}" for i in third_party(_test_files())
               if not dists_of(i.module) <= everything]
    assert not missing, "tests/benchmarks import undeclared distributions (add them to the dev extra): " \
        + "; ".join(missing)


def test_mapping_agrees_with_installed_metadata() -> None:
    """Where a package is installed, the import -> distribution mapping is what its metadata says."""
    installed = importlib.metadata.packages_distributions()
    for imp in {i.module.split(".")[0] for i in third_party(_product_files() + _test_files())}:
        if imp in installed:
            assert dists_of(imp) & {dist_name(d) for d in installed[imp]}, (imp, installed[imp])
