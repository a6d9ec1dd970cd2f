"""Converters: pixel-exact round trips with labels, resumability, overwrite refusal, verify, CLI errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data.prepare import main as prepare
from data.stream import EvalStream
from data.verify import main as verify

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream a data set back: uint8 [N, H, W, 3] in index order, labels [N], indices [N]."""
    xs, ys, ids = [], [], []
    for x, y, i in EvalStream(source, 7):
        xs.append(x), ys.append(y), ids.append(i)
    x = torch.cat(xs)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ids = torch.cat(ids).numpy()
    order = np.argsort(ids)
    return u8[order], torch.cat(ys).numpy()[order], ids[order]


def run(*argv: str) -> int:
    return prepare([*argv, "--workers", "0", "--no-progress"])


def test_npz_batches_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    planar = [rng.integers(0, 256, (n, 3 * 8 * 8), dtype=np.uint8) for n in (13, 9)]
    labels = [rng.integers(1, 1001, n) for n in (13, 9)]
    files = []
    for k, (d, l) in enumerate(zip(planar, labels)):
        files.append(str(tmp_path / f"train_data_batch_{k + 1}.npz"))
        np.savez(files[-1], data=d, labels=list(l), mean=np.zeros(192))
    out = tmp_path / "out"
    assert run("npz-batches", *files, "--out-dir", str(out), "--shard-size", "5") == 0
    m = json.loads((out / "train-manifest.json").read_text())
    assert m["total"] == 22 and [s["samples"] for s in m["shards"]] == [5, 5, 5, 5, 2]  # shard 2 spans both files
    assert m["image_size"] == [8, 8] and m["num_classes"] == 1000
    imgs, labs, ids = read_all(str(out / "train-manifest.json"))
    # independent reference: channel-planar rows -> HWC by explicit per-channel indexing
    data = np.concatenate(planar)
    ref = np.empty((22, 8, 8, 3), np.uint8)
    for c in range(3):
        ref[..., c] = data[:, c * 64:(c + 1) * 64].reshape(22, 8, 8)
    assert np.array_equal(imgs, ref)
    assert np.array_equal(labs, np.concatenate(labels) - 1)
    assert np.array_equal(ids, np.arange(22))
    # resume: only the last shard is missing, so the first batch file is not even read (placeholder path)
    os.unlink(out / "train-manifest.json")
    os.unlink(out / "train-000004.tar")
    assert run("npz-batches", *files, "--out-dir", str(out), "--shard-size", "5") == 0
    assert json.loads((out / "train-manifest.json").read_text())["shards"] == m["shards"]


def test_npz_round_trip_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)  # non-square on purpose
    labels = rng.integers(0, 4, 11)
    np.savez(tmp_path / "s.npz", imgs, labels)
    assert run("npz", str(tmp_path / "s.npz"), "--out-dir", str(tmp_path / "a"), "--shard-size", "4") == 0
    got, labs, _ = read_all(str(tmp_path / "a" / "train-manifest.json"))
    assert np.array_equal(got, imgs) and np.array_equal(labs, labels)
    assert run("npz", str(tmp_path / "s.npz"), "--out-dir", str(tmp_path / "c"), "--shard-size", "4", "--labels") == 0
    shards = lambda d: json.loads((tmp_path / d / "train-manifest.json").read_text())["shards"]  # noqa: E731
    assert shards("c") == shards("a")  # --labels is the default
    assert run("npz", str(tmp_path / "s.npz"), "--out-dir", str(tmp_path / "b"), "--no-labels") == 0
    got, labs, _ = read_all(str(tmp_path / "b" / "train-manifest.json"))
    assert np.array_equal(got, imgs) and (labs == -1).all()
    assert json.loads((tmp_path / "b" / "train-manifest.json").read_text())["num_classes"] == 0


def _jpeg_tree(root, sizes) -> dict[str, tuple[int, str]]:
    rng = np.random.default_rng(2)
    files = {}
    for c, cls in enumerate(["n01", "n02", "n03"]):
        os.makedirs(root / cls)
        for k, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            p = root / cls / f"img{k}.JPEG"
            Image.fromarray(arr).save(p, quality=90)
            files[f"{cls}/img{k}.JPEG"] = (c, str(p))
    return files


def test_folder_round_trip_area(tmp_path):
    files = _jpeg_tree(tmp_path / "tree", [(24, 16), (16, 32), (16, 16)])
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "tree"), "--out-dir", str(out), "--size", "8", "--shard-size", "4") == 0
    m = json.loads((out / "train-manifest.json").read_text())
    assert m["total"] == 9 and m["class_names"] == ["n01", "n02", "n03"]
    assert json.loads((out / "train-classes.json").read_text()) == {"n01": 0, "n02": 1, "n03": 2}
    index = dict(line.split(" ", 1) for line in (out / "train-files.txt").read_text().splitlines())
    imgs, labs, ids = read_all(str(out))
    for img, lab, i in zip(imgs, labs, ids):
        cls_idx, path = files[index[f"{i:09d}"]]
        src = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)  # PIL's own JPEG decode
        h, w = src.shape[:2]
        s = min(h, w)
        crop = src[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        f = s // 8  # integer factors here: area downsampling == block mean
        ref = crop.reshape(8, f, 8, f, 3).mean(axis=(1, 3))
        assert lab == cls_idx
        assert np.abs(img.astype(np.float64) - ref).max() <= 0.5 + 1e-9  # rounding only


def test_folder_adm_resize_and_unreadable_file(tmp_path):
    _jpeg_tree(tmp_path / "tree", [(40, 20), (20, 20)])
    (tmp_path / "tree" / "n02" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert run("folder", str(tmp_path / "tree"), "--out-dir", str(out), "--size", "8", "--resize", "adm") == 0
    m = json.loads((out / "train-manifest.json").read_text())
    assert m["total"] == 6 and m["skipped"] == 1 and "broken.jpg" in m["skipped_examples"][0]
    imgs, _, _ = read_all(str(out))
    assert imgs.shape == (6, 8, 8, 3)


def test_digits_round_trip_and_split(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    assert run("digits", "--out-dir", str(out), "--size", "16") == 0
    tr, trl, _ = read_all(str(out / "train-manifest.json"))
    va, val, _ = read_all(str(out / "val-manifest.json"))
    assert len(tr) + len(va) == 1797 and len(va) == 359
    d = load_digits()  # independent reference: PIL bicubic of the 0..255-scaled 8x8 digits
    ref = {}
    for im, t in zip(d.images, d.target):
        small = np.round(im * 255 / 16).astype(np.uint8)
        big = np.asarray(Image.fromarray(small, "L").resize((16, 16), Image.BICUBIC))
        ref.setdefault(big.tobytes(), set()).add(int(t))
    for x, y in zip(np.concatenate([tr, va]), np.concatenate([trl, val])):
        assert (x == x[..., :1]).all()  # grey as RGB
        assert int(y) in ref[np.ascontiguousarray(x[..., 0]).tobytes()]
    assert set(trl.tolist()) == set(range(10)) and set(val.tolist()) == set(range(10))


def test_refuses_overwrite_and_resumes_only_missing_shards(tmp_path, capsys):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8), np.arange(10) % 3)
    out = tmp_path / "out"
    args = ("npz", str(tmp_path / "s.npz"), "--out-dir", str(out), "--shard-size", "3")
    assert run(*args) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        run(*args, "--no-overwrite")  # the explicit spelling of the default
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    first = json.loads((out / "train-manifest.json").read_text())
    # simulate a crash: manifest and one shard missing, a stale temporary file left behind
    os.unlink(out / "train-manifest.json")
    os.unlink(out / "train-000002.tar")
    (out / ".tmp-train-000002.tar-x").write_bytes(b"partial")  # as written by earlier versions
    stale = [out / ".train-000002.tar.x1.tmp", out / ".train-manifest.json.x2.tmp"]  # data.fsio's names
    for p in stale:
        p.write_bytes(b"partial")
    (out / ".other-000002.tar.x3.tmp").write_bytes(b"another data set's")
    stamp = {p: os.stat(out / p).st_mtime_ns for p in ("train-000000.tar", "train-000001.tar", "train-000003.tar")}
    os.utime(out / "train-000000.tar", ns=(1, 1))  # old mtime: a rewrite would change it
    stamp["train-000000.tar"] = 1
    assert run(*args) == 0
    assert all(os.stat(out / p).st_mtime_ns == t for p, t in stamp.items())
    assert not (out / ".tmp-train-000002.tar-x").exists()
    assert not any(p.exists() for p in stale) and (out / ".other-000002.tar.x3.tmp").exists()
    again = json.loads((out / "train-manifest.json").read_text())
    assert again["shards"] == first["shards"]  # deterministic bytes: same sha256 for the rewritten shard
    assert run(*args, "--overwrite") == 0
    assert os.stat(out / "train-000000.tar").st_mtime_ns != 1


def test_partial_dataset_with_other_settings_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.zeros((10, 4, 4, 3), np.uint8))
    out = tmp_path / "out"
    assert run("npz", str(tmp_path / "s.npz"), "--out-dir", str(out), "--shard-size", "3") == 0
    os.unlink(out / "train-manifest.json")
    (out / ".train-progress.json").write_text(json.dumps({"kind": "npz", "shard_size": 99}))
    with pytest.raises(SystemExit) as e:
        run("npz", str(tmp_path / "s.npz"), "--out-dir", str(out), "--shard-size", "3")
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err


def test_verify_detects_damage(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", np.full((6, 4, 4, 3), 7, np.uint8), np.arange(6) % 2)
    out = tmp_path / "out"
    assert run("npz", str(tmp_path / "s.npz"), "--out-dir", str(out), "--shard-size", "3") == 0
    assert verify([str(out)]) == 0
    assert verify([str(out), "--no-quick"]) == 0
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[600] ^= 0xFF  # flip one pixel byte: sizes fine, sha256 not
    (out / "train-000001.tar").write_bytes(bytes(data))
    capsys.readouterr()
    assert verify([str(out / "train-manifest.json")]) == 1
    assert "train-000001.tar: sha256 mismatch" in capsys.readouterr().err
    os.unlink(out / "train-000000.tar")
    assert verify([str(out), "--quick"]) == 1
    assert "train-000000.tar: missing" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["npz", "/nonexistent/x.npz", "--out-dir", "OUT"], "no such file"),
    (["digits", "--out-dir", "OUT", "--size", "0"], "--size"),
    (["digits", "--out-dir", "OUT", "--shard-size", "-3"], "--shard-size"),
    (["npz-batches", "--out-dir", "OUT"], "required"),
    (["frobnicate"], "invalid choice"),
    (["digits", "--out-dir", "IN"], "is a file"),
    (["npz", "IN", "--out-dir", "OUT"], "cannot read"),
    (["npz", "IN", "--out-dir", "OUT", "--shard-size", "ten"], "invalid int"),
])
def test_cli_bad_input_exit_2_one_line(tmp_path, argv, needle):
    argv = [a.replace("OUT", str(tmp_path / "o")).replace("IN", str(tmp_path / "in.npz")) for a in argv]
    (tmp_path / "in.npz").write_bytes(b"not an npz")
    r = subprocess.run([sys.executable, "-m", "data.prepare", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_cli_help_and_verify_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data.prepare", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "npz-batches" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data.verify", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and r.stderr.count("\n") == 1


def test_area_resize_non_integer_factor_matches_supersampled_block_mean():
    from data.prepare import area_resize

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    # independent: repeat pixels to a common multiple (12->24, 15->30), then exact block means (3 x 6 -> 8 x 5)
    up = np.repeat(np.repeat(a.astype(np.float64), 2, axis=0), 2, axis=1)
    ref = up.reshape(8, 3, 5, 6, 3).mean(axis=(1, 3))
    from data.prepare import _area_weights
    assert np.allclose(_area_weights(12, 8).sum(1), 1) and np.allclose(_area_weights(12, 8).sum(0), 8 / 12)
    got = np.tensordot(np.tensordot(_area_weights(12, 8), a.astype(np.float64), (1, 0)), _area_weights(15, 5), (1, 1))
    assert np.allclose(got.transpose(0, 2, 1), ref)
    sq = area_resize(np.ascontiguousarray(a[:12, :12]), 8)
    ref_sq = np.repeat(np.repeat(a[:12, :12].astype(np.float64), 2, 0), 2, 1).reshape(8, 3, 8, 3, 3).mean((1, 3))
    assert np.abs(sq - ref_sq).max() <= 0.5 + 1e-9 and sq.dtype == np.uint8


def test_parallel_writers_give_identical_shards(tmp_path):
    """The process pool path (--workers 2) writes byte-identical shards to the in-process path."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert prepare(["digits", "--out-dir", str(a), "--size", "8", "--shard-size", "300", "--workers", "0",
                    "--no-progress"]) == 0
    assert prepare(["digits", "--out-dir", str(b), "--size", "8", "--shard-size", "300", "--workers", "2",
                    "--no-progress"]) == 0
    for name in ("train", "val"):
        ma = json.loads((a / f"{name}-manifest.json").read_text())
        mb = json.loads((b / f"{name}-manifest.json").read_text())
        assert ma["shards"] == mb["shards"] and len(ma["shards"]) == (5 if name == "train" else 2)


def test_python_call_writes_the_same_shards_as_the_cli(tmp_path):
    """prepare_digits(...) from Python == the CLI with the same settings (sha256 of every shard in the manifest)."""
    from data.prepare import prepare_digits

    settings = ["--size", "8", "--val-fraction", "0.25", "--seed", "5", "--shard-size", "400"]
    assert run("digits", "--out-dir", str(tmp_path / "cli"), *settings) == 0
    manifests = prepare_digits(tmp_path / "py", size=8, val_fraction=0.25, seed=5, shard_size=400, workers=0,
                               progress=False)  # a pathlib.Path is fine too
    assert [m["name"] for m in manifests] == ["train", "val"] and manifests[1]["total"] == 449
    for m in manifests:
        cli = json.loads((tmp_path / "cli" / f"{m['name']}-manifest.json").read_text())
        on_disk = json.loads((tmp_path / "py" / f"{m['name']}-manifest.json").read_text())
        assert on_disk == m
        assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in cli["shards"]]
        assert {k: v for k, v in m.items() if k != "created"} == {k: v for k, v in cli.items() if k != "created"}


def test_python_call_with_bad_argument_raises_usage_error(tmp_path):
    from data.cli import UsageError
    from data.prepare import prepare_digits, prepare_folder, prepare_npz, prepare_npz_batches

    out = tmp_path / "out"
    np.savez(tmp_path / "s.npz", np.zeros((4, 4, 4, 3), np.uint8))
    (tmp_path / "file").write_text("x")
    calls = [
        (lambda: prepare_digits(out, size=12), "--size must be positive (digits: 8, 16, 32 or 64), got 12"),
        (lambda: prepare_digits(out, shard_size=0), "--shard-size must be >= 1, got 0"),
        (lambda: prepare_digits(out, workers=-1), "--workers must be >= 0, got -1"),
        (lambda: prepare_digits(out, val_fraction=1.0), "--val-fraction must be in (0, 1), got 1.0"),
        (lambda: prepare_digits(out, seed=-1), "--seed must be an integer >= 0, got -1"),
        (lambda: prepare_digits(tmp_path / "file"), "is a file; give a folder"),
        (lambda: prepare_folder(tmp_path, out, resize="bicubic"), "--resize must be one of adm, area, got 'bicubic'"),
        (lambda: prepare_folder(tmp_path, out, size=8.0), "--size must be positive"),
        (lambda: prepare_npz(tmp_path / "s.npz", out, name="a/b"), "--name may hold only"),
        (lambda: prepare_npz(tmp_path / "s.npz", out, shard_size="10"), "--shard-size must be >= 1, got '10'"),
        (lambda: prepare_npz_batches([], out), "at least one input file"),
    ]
    for call, needle in calls:
        with pytest.raises(UsageError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()  # checked before anything is written
