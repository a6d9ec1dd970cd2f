"""evaluations.evaluate and the feature extractors: end to end with the stand-in, input checks, Inception shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluations import evaluate as ev
from evaluations.features import InceptionExtractor, StandinExtractor, extract
from evaluations.metrics import frechet_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n: int, seed: int, bright: int = 0) -> np.ndarray:
    """Smooth random images uint8 [n, 16, 16, 3] (blobs), optionally brightened."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(n, 4, 4, 3))
    x = np.kron(low, np.ones((1, 4, 4, 1))) * 50 + 128 + bright
    return np.clip(x, 0, 255).astype(np.uint8)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = ev.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def batches(tmp_path):
    ref, same, shifted = tmp_path / "ref.npz", tmp_path / "ours.npz", tmp_path / "other.npz"
    np.savez(ref, arr_0=_images(80, 0))
    np.savez(same, arr_0=_images(60, 1), arr_1=np.arange(60) % 10)
    np.savez(shifted, arr_0=_images(60, 2, bright=60))
    return ref, same, shifted


def test_evaluate_standin_end_to_end(tmp_path, batches, capsys):
    torch.set_num_threads(1)
    ref, same, shifted = batches
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--reference", str(ref), str(same), str(shifted), str(ref), "--names", "ours,shifted,self",
            "--out-dir", str(out), "--features", "standin", "--cache-dir", str(cache), "--splits", "5"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    rep = json.loads((out / "metrics.json").read_text())
    rows = {r["name"]: r for r in rep["batches"]}
    assert rep["comparable_to_published"] is False and "NOT comparable" in (out / "metrics.md").read_text()
    assert (out / "precision_recall.png").stat().st_size > 1000
    # The reference against itself: FID = sFID = 0 (up to round-off of rank-deficient covariances), P = R = 1.
    assert rows["self"]["fid"] == pytest.approx(0, abs=1e-4) and rows["self"]["sfid"] == pytest.approx(0, abs=1e-4)
    assert rows["self"]["precision"] == 1.0 and rows["self"]["recall"] == 1.0
    assert rows["shifted"]["fid"] > rows["ours"]["fid"] > 0
    assert rows["shifted"]["precision"] < rows["ours"]["precision"]
    assert all(r["is"] >= 1.0 for r in rows.values())
    assert "| ours | 60 |" in stdout
    # The same files again: all features come from the content-hash cache, with identical results.
    code, _, _ = _run(argv, capsys)
    rep2 = json.loads((out / "metrics.json").read_text())
    assert code == 0 and all(r["cached"] for r in rep2["batches"])
    assert [r["fid"] for r in rep2["batches"]] == [r["fid"] for r in rep["batches"]]


def test_python_entry_point_returns_what_the_cli_writes(tmp_path, batches, capsys):
    """evaluate(...) from Python returns the report that the CLI writes to metrics.json (timings aside)."""
    torch.set_num_threads(1)
    ref, same, shifted = batches
    out = tmp_path / "out"
    code, stdout, err = _run(["--reference", str(ref), str(same), str(shifted), "--out-dir", str(out),
                              "--features", "standin", "--no-cache", "--no-progress", "--splits", "5"], capsys)
    assert code == 0, err
    rep = json.loads((out / "metrics.json").read_text())
    r = ev.evaluate(str(ref), [str(same), str(shifted)], features="standin", splits=5, progress=False)

    def untimed(report: dict) -> dict:
        return {**{k: v for k, v in report.items() if k != "date"},
                "batches": [{k: v for k, v in row.items() if k != "seconds"} for row in report["batches"]]}
    assert untimed(r) == untimed(rep)
    assert [row["name"] for row in r["batches"]] == ["ours", "other"] and r["batches"][0]["cached"] is False
    assert ev.markdown(r).splitlines()[5:] == (out / "metrics.md").read_text().splitlines()[5:]
    from data.cli import UsageError
    with pytest.raises(UsageError, match="positive"):
        ev.evaluate(str(ref), [str(same)], features="standin", k=0)


def test_precomputed_reference_statistics_used_as_given(tmp_path, batches, capsys):
    ref, same, _ = batches
    rng = np.random.default_rng(5)
    mu, a = rng.normal(size=256), rng.normal(size=(256, 256)) * 0.05
    mu_s, b = rng.normal(size=448), rng.normal(size=(448, 448)) * 0.05
    ref2 = tmp_path / "ref_stats.npz"
    np.savez(ref2, arr_0=np.load(ref)["arr_0"], mu=mu, sigma=a @ a.T, mu_s=mu_s, sigma_s=b @ b.T)
    code, _, err = _run(["--reference", str(ref2), str(same), "--out-dir", str(tmp_path / "o"),
                         "--features", "standin", "--no-cache", "--splits", "5"], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "o" / "metrics.json").read_text())["batches"][0]
    f = extract(np.load(same)["arr_0"], StandinExtractor())
    assert row["fid"] == pytest.approx(frechet_distance(f["mu"], f["sigma"], mu, a @ a.T), rel=1e-9)
    assert row["sfid"] == pytest.approx(frechet_distance(f["mu_s"], f["sigma_s"], mu_s, b @ b.T), rel=1e-9)
    assert row["precision"] is not None          # P/R still uses the reference images
    # Statistics alone (no images): FID/sFID as before, precision/recall reported as n/a.
    np.savez(ref2, mu=mu, sigma=a @ a.T, mu_s=mu_s, sigma_s=b @ b.T)
    code, _, err = _run(["--reference", str(ref2), str(same), "--out-dir", str(tmp_path / "o2"),
                         "--features", "standin", "--no-cache", "--splits", "5"], capsys)
    assert code == 0, err
    row2 = json.loads((tmp_path / "o2" / "metrics.json").read_text())["batches"][0]
    assert row2["fid"] == pytest.approx(row["fid"], rel=1e-12) and row2["precision"] is None
    assert "n/a" in (tmp_path / "o2" / "metrics.md").read_text()
    # Statistics of the wrong dimension (e.g. Inception stats with the stand-in) are refused clearly.
    np.savez(ref2, arr_0=np.load(ref)["arr_0"], mu=np.zeros(2048), sigma=np.eye(2048))
    code, _, err = _run(["--reference", str(ref2), str(same), "--out-dir", str(tmp_path / "o"),
                         "--features", "standin", "--no-cache"], capsys)
    assert code == 2 and "different network" in err and err.count("\n") == 1


@pytest.mark.parametrize("case, message", [
    ("pickle", "pickled"),
    ("float", "must be uint8"),
    ("nchw", "[N, H, W, 3]"),
    ("few", "at least 4"),
    ("nan_stats", "NaN"),
    ("missing", "no such file"),
])
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, batches, capsys, case, message):
    ref, same, _ = batches
    bad = tmp_path / "bad.npz"
    if case == "pickle":
        np.savez(bad, arr_0=np.array([{"evil": 1}, None], dtype=object))
    elif case == "float":
        np.savez(bad, arr_0=_images(20, 3).astype(np.float32) / 255)
    elif case == "nchw":
        np.savez(bad, arr_0=_images(20, 3).transpose(0, 3, 1, 2))
    elif case == "few":
        np.savez(bad, arr_0=_images(3, 3))
    elif case == "nan_stats":
        np.savez(bad, arr_0=np.load(ref)["arr_0"], mu=np.full(256, np.nan), sigma=np.eye(256))
        ref, bad = bad, same
    elif case == "missing":
        bad = tmp_path / "nope.npz"
    code, _, err = _run(["--reference", str(ref), str(bad), "--out-dir", str(tmp_path / "o"),
                         "--features", "standin", "--no-cache", "--splits", "2"], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("evaluations.evaluate: error:")


def test_cli_help_and_missing_inception_weights(tmp_path, batches):
    ref, same, _ = batches
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("IDDPM_INCEPTION_WEIGHTS", None)
    h = subprocess.run([sys.executable, "-m", "evaluations.evaluate", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert h.returncode == 0 and "--inception-weights" in h.stdout
    r = subprocess.run([sys.executable, "-m", "evaluations.evaluate", "--reference", str(ref), str(same),
                        "--out-dir", str(tmp_path / "o"), "--inception-weights", str(tmp_path / "w.pth")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "w.pth" in r.stderr and "weights-inception-2015-12-05" in r.stderr and "Traceback" not in r.stderr


def test_inception_path_shapes_with_random_weights():
    """The TF-compatible Inception (torch-fidelity's port) with random init: feature shapes and finiteness."""
    torch.set_num_threads(2)
    net = InceptionExtractor(random_init=True)
    assert "torch_fidelity" not in sys.modules or hasattr(sys.modules["torch_fidelity"], "__version__")
    f = extract(_images(3, 4), net, batch_size=2)
    assert f["pool"].shape == (3, 2048) and f["logits"].shape == (3, 1008)
    assert f["mu_s"].shape == (2023,) and f["sigma_s"].shape == (2023, 2023)
    assert f["sigma"].shape == (2048, 2048) and np.isfinite(f["sigma"]).all()


def test_inception_weights_loaded_without_pickle(tmp_path):
    """A weights file with the right tensors loads; one with pickled objects is refused by weights_only."""
    net = InceptionExtractor(random_init=True)
    sd = {k: v.clone() for k, v in net.net.state_dict().items()}
    good = tmp_path / "w.pth"
    torch.save(sd, good)
    loaded = InceptionExtractor(str(good))
    assert loaded.name.startswith("inception-v3-tf-")
    k = "Conv2d_1a_3x3.conv.weight"
    assert torch.equal(loaded.net.state_dict()[k], sd[k])

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, evil)
    from data.cli import UsageError
    with pytest.raises(UsageError, match="not a loadable"):
        InceptionExtractor(str(evil))
