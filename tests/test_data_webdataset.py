"""Any webdataset in: shards written by webdataset.ShardWriter (jpg/png/webp/npy images of several sizes, labels in
cls/label/txt/json) stream with read-time resizing, convert once with data.prepare webdataset to the same pixels,
and our shards read back through plain webdataset."""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.decode import RESIZERS, center_crop_adm, decode_image, find_label
from data.errors import DataError
from data.prepare import main as prepare
from data.prepare import prepare_webdataset
from data.stream import EvalStream, TrainStream
from data.verify import main as verify

torch.set_num_threads(1)
N, SIZE, CLASSES = 14, 8, 3
SHAPES = [(20, 12), (8, 8), (40, 40), (9, 30), (17, 17)]  # non-square, exact, halving, wide, odd


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def sample(i: int) -> tuple[dict, np.ndarray]:
    """Sample i as ShardWriter takes it (image format and label source cycle) and the RGB image it decodes to."""
    h, w = SHAPES[i % len(SHAPES)]
    img = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
    s: dict = {"__key__": f"img{i:05d}"}
    kind, label = i % 4, i % CLASSES
    if kind == 0:
        s["png"], s["cls"] = encode(img, "PNG"), label
    elif kind == 1:
        s["webp"], s["json"] = encode(img, "WEBP"), {"label": label, "caption": "a"}
    elif kind == 2:
        s["npy"], s["txt"] = img, str(label)
    else:
        s["jpg"], s["json"] = encode(img, "JPEG"), {"class": label, "width": w}
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))  # what the JPEG decodes to
    return s, img


def expected(resize: str = "adm") -> tuple[np.ndarray, np.ndarray]:
    imgs = [sample(i)[1] for i in range(N)]
    return np.stack([RESIZERS[resize](im, SIZE) for im in imgs]), np.arange(N) % CLASSES


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory) -> str:
    import webdataset as wds

    root = tmp_path_factory.mktemp("wds")
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(N):
            sink.write(sample(i)[0])
    return str(root)


def pattern(root: str) -> str:
    return os.path.join(root, "train-{000000..000002}.tar")


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_adm_resize_matches_guided_diffusion():
    """Our centre_crop_adm == guided-diffusion's center_crop_arr (test-only peer) on odd, wide, tall, big images."""
    from guided_diffusion.image_datasets import center_crop_arr

    rng = np.random.default_rng(1)
    for h, w in [(20, 12), (9, 30), (64, 64), (300, 199), (33, 130), (16, 16), (5, 7)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in (8, 16):
            ours = center_crop_adm(img, size)
            assert ours.shape == (size, size, 3)
            assert np.array_equal(ours, center_crop_arr(img, size))
            assert np.array_equal(center_crop_adm(np.asarray(img), size), ours)


def test_label_sources_and_image_keys():
    def one(**members: bytes):
        buf, where, off = b"", {}, 0
        for k, v in members.items():
            where[k], buf, off = (off, len(v)), buf + v, off + len(v)
        return find_label(buf, where)

    assert one(cls=b"3") == (3, None) and one(label=b" 4\n") == (4, None) and one(txt=b"5") == (5, None)
    assert one(json=b'{"label": 6}') == (6, None) and one(json=b'{"class": "7"}') == (7, None)
    assert one(cls=b"1", json=b'{"label": 2}') == (1, None)  # cls first
    assert one(txt=b"a photo of a cat") == (None, None)  # a caption is no label
    assert one(json=b'{"url": "x", "width": 3}') == (None, None)  # metadata is no label
    assert one(json=b'{"url": "x"}', txt=b"8") == (8, None)
    assert one(cls=b"abc")[0] is None and "unparseable" in one(cls=b"abc")[1]
    assert "unparseable" in one(json=b'{"label": 1.5}')[1]
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for arr in (grey, grey[..., None], np.dstack([grey] * 3 + [grey * 0])):
        buf = io.BytesIO()
        np.save(buf, arr)
        assert np.array_equal(decode_image("npy", buf.getvalue()), np.dstack([grey] * 3))
    with pytest.raises(ValueError, match="dtype"):
        buf = io.BytesIO()
        np.save(buf, grey.astype(np.float32))
        decode_image("npy", buf.getvalue())


def test_streams_read_shardwriter_shards_with_resize(wds_dir):
    want, labels = expected()
    for source in (pattern(wds_dir), wds_dir, os.path.join(wds_dir, "train-*.tar"),
                   ",".join(sorted(glob.glob(os.path.join(wds_dir, "*.tar"))))):
        stream = EvalStream(source, 4, image_size=SIZE)
        xs, ys, ids = zip(*stream)
        assert stream.image_size == (SIZE, SIZE) and stream.total == N and stream.bad_samples == 0
        assert np.array_equal(torch.cat(ids).numpy(), np.arange(N))
        assert np.array_equal(to_u8(torch.cat(xs)), want) and np.array_equal(torch.cat(ys).numpy(), labels)
    area = EvalStream(pattern(wds_dir), 16, image_size=SIZE, resize="area")
    assert np.array_equal(to_u8(next(iter(area))[0]), expected("area")[0])


def test_mixed_sizes_without_resizing_is_one_clear_error(wds_dir, tmp_path):
    for make in (lambda: EvalStream(pattern(wds_dir), 4), lambda: TrainStream(pattern(wds_dir), 4)):
        with pytest.raises(DataError, match=r"sample 1 is 8x8 but earlier images are 20x12.*data.prepare webdataset"):
            make()
    import webdataset as wds  # sizes differ only in a later shard: the stream stops with the same error

    with wds.ShardWriter(str(tmp_path / "m-%06d.tar"), maxcount=2, verbose=0) as sink:
        for i, side in enumerate([8, 8, 8, 8, 12, 8]):
            sink.write({"__key__": f"k{i}", "npy": np.zeros((side, side, 3), np.uint8), "cls": 0})
    with pytest.raises(DataError, match="is 12x12 but earlier images are 8x8") as e:
        list(EvalStream(str(tmp_path / "m-*.tar"), 2))
    assert "\n" not in str(e.value)
    for x, _, _ in EvalStream(str(tmp_path / "m-*.tar"), 2, image_size=8):
        assert x.shape[-2:] == (8, 8)


def test_train_stream_resumes_exactly_with_resize(wds_dir):
    a = TrainStream(pattern(wds_dir), 3, seed=5, image_size=SIZE, shards_per_block=2)
    assert a.num_classes is None and a.image_size == (SIZE, SIZE)
    first = [next(a) for _ in range(4)]
    state = json.loads(json.dumps(a.state_dict()))
    rest = [next(a) for _ in range(5)]
    b = TrainStream(pattern(wds_dir), 3, seed=5, image_size=SIZE, shards_per_block=2, state=state)
    for (x, y), (x2, y2) in zip(rest, [next(b) for _ in range(5)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    c = TrainStream(pattern(wds_dir), 3, seed=5, image_size=SIZE, shards_per_block=2, num_workers=1)
    for (x, y), (x2, y2) in zip(first, [next(c) for _ in range(4)]):  # one DataLoader worker process: the same
        assert torch.equal(x, x2) and torch.equal(y, y2)
    c.close()
    want, labels = expected()
    for x, y in first + rest:  # every image is one of the resized samples (maybe mirrored), with its label
        for img, lab in zip(to_u8(x), y.numpy()):
            hit = [i for i in range(N) if np.array_equal(img, want[i]) or np.array_equal(img, want[i][:, ::-1])]
            assert hit and labels[hit[0]] == lab


def test_prepare_webdataset_equals_read_time_resize_and_resumes(wds_dir, tmp_path):
    out = str(tmp_path / "conv")
    assert prepare(["webdataset", pattern(wds_dir), "--out-dir", out, "--size", str(SIZE), "--workers", "0",
                    "--no-progress"]) == 0
    m = json.load(open(os.path.join(out, "train-manifest.json")))
    assert (m["total"], m["num_classes"], m["image_size"], len(m["shards"])) == (N, CLASSES, [SIZE, SIZE], 3)
    assert m["conversion"] == {"from": "webdataset", "source": pattern(wds_dir), "input_shards": 3, "size": SIZE,
                               "resize": "adm", "labels": True}
    assert verify([out]) == 0
    converted = [(x, y) for x, y, _ in EvalStream(out, 5)]
    on_the_fly = [(x, y) for x, y, _ in EvalStream(pattern(wds_dir), 5, image_size=SIZE)]
    for (x, y), (x2, y2) in zip(converted, on_the_fly, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    sums = {p: m["shards"][i]["sha256"] for i, p in enumerate(sorted(glob.glob(os.path.join(out, "*.tar"))))}
    os.unlink(os.path.join(out, "train-000001.tar"))  # a crash before shard 1 and the manifest were written
    os.unlink(os.path.join(out, "train-manifest.json"))
    prepare_webdataset(pattern(wds_dir), out, size=SIZE, workers=2, progress=False)  # writer processes too
    m2 = json.load(open(os.path.join(out, "train-manifest.json")))
    assert [s["sha256"] for s in m2["shards"]] == list(sums.values()) and m2["num_classes"] == CLASSES
    m3 = prepare_webdataset(pattern(wds_dir), str(tmp_path / "two"), size=SIZE, num_classes=2, workers=0,
                            progress=False)[0]  # labels >= --num-classes are bad samples: skipped and counted
    assert (m3["total"], m3["skipped"], m3["num_classes"]) == (N - sum(i % CLASSES == 2 for i in range(N)), 4, 2)
    with pytest.raises(SystemExit) as e:  # complete: refused without --overwrite
        prepare(["webdataset", pattern(wds_dir), "--out-dir", out, "--size", str(SIZE), "--no-progress"])
    assert e.value.code == 2


def test_our_shards_read_back_through_plain_webdataset(wds_dir, tmp_path):
    import webdataset as wds

    out = str(tmp_path / "conv")
    prepare_webdataset(pattern(wds_dir), out, size=SIZE, resize="area", workers=0, progress=False)
    want, labels = expected("area")
    urls = sorted(glob.glob(os.path.join(out, "*.tar")))
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple("__key__", "npy", "cls"))
    assert [k for k, _, _ in got] == [f"{i // 5:06d}-{i % 5:06d}" for i in range(N)]
    assert np.array_equal(np.stack([img for _, img, _ in got]), want) and [c for _, _, c in got] == list(labels)


def test_bad_samples_skipped_and_counted_gzip_and_unlabelled(tmp_path):
    import webdataset as wds

    img = np.full((10, 6, 3), 7, np.uint8)
    with wds.ShardWriter(str(tmp_path / "u-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(8):  # captions in txt: unlabelled; sample 2 is a broken jpeg
            image = {"jpg": b"\xff\xd8junk"} if i == 2 else {"png": encode(img, "PNG")}
            sink.write({"__key__": f"k{i}", **image, "txt": "a caption"})
    with open(tmp_path / "u-000001.tar", "rb") as f, gzip.open(tmp_path / "u-000001.tar.gz", "wb") as g:
        g.write(f.read())
    os.unlink(tmp_path / "u-000001.tar")
    src = [str(tmp_path / "u-000000.tar"), str(tmp_path / "u-000001.tar.gz")]
    stream = EvalStream(src, 8, image_size=4, max_bad_fraction=0.5)
    (x, y, idx), = list(stream)
    assert stream.bad_samples == 1 and idx.tolist() == [0, 1, 3, 4, 5, 6, 7] and (y == -1).all()
    assert np.array_equal(to_u8(x)[0], center_crop_adm(img, 4))
    with pytest.raises(DataError, match="too much bad data"):
        list(EvalStream(src, 8, image_size=4, max_bad_fraction=0.1))
    m = prepare_webdataset(src, str(tmp_path / "conv"), size=4, workers=0, progress=False)[0]
    assert (m["total"], m["num_classes"], m["skipped"]) == (7, 0, 1) and "undecodable jpg" in m["skipped_examples"][0]


def test_bad_input_is_one_line_exit_2(wds_dir, tmp_path, capsys):
    cases = [(["--size", "0"], "--size must be positive"), (["--resize", "bicubic"], "invalid choice"),
             (["--num-classes", "-1"], "--num-classes must be"), (["--shard-size", "5"], "unrecognized arguments")]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            prepare(["webdataset", pattern(wds_dir), "--out-dir", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        prepare(["webdataset", str(tmp_path / "none-{0..3}.tar"), "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "matches no files" in capsys.readouterr().err
    with pytest.raises(ValueError, match="resize must be one of"):
        EvalStream(pattern(wds_dir), 4, image_size=SIZE, resize="nearest")


def _trainer(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=root, PYTHONWARNINGS="ignore::FutureWarning")
    return subprocess.run([sys.executable, "-m", "trainer.main", *args, "--run-dir", str(tmp_path / "run")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_trainer_data_flags(wds_dir, tmp_path):
    """trainer --data takes the ShardWriter pattern: mixed sizes are one line and exit 2 without
    --data-image-size, and train with it (unconditional tiny16: the labels are there but unused)."""
    base = ["--data", pattern(wds_dir), "--model-size", "tiny16", "--diffusion-steps", "20", "--global-batch", "4",
            "--num-classes", "0", "--total-steps", "2", "--save-every", "2", "--sample-every", "0",
            "--sample-respacing", "4"]
    r = _trainer(base, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert r.returncode == 2 and len(lines) == 1 and "--data-image-size" in lines[0], r.stderr[-2000:]
    r = _trainer([*base, "--data-image-size", "16", "--resize", "area"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["data"]["image_size"] == 16 and cfg["data"]["resize"] == "area"


def test_nll_reads_a_webdataset_with_resize(wds_dir, tmp_path):
    """evaluations.nll --data takes the ShardWriter pattern: --resize gives the same bits/dim as the converted
    shards; without it, mixed sizes are one UsageError."""
    from data.cli import UsageError
    from diffusion.presets import get_config
    from evaluations.nll import nll
    from trainer.export import save_exported

    torch.manual_seed(0)
    cfg = get_config("tiny16")
    model = str(tmp_path / "m.safetensors")
    save_exported(model, cfg.build().state_dict(), cfg.to_dict(), {"steps": 20, "noise_schedule": "cosine",
                                                                    "learn_sigma": True}, step=0, ema="model")
    prepare_webdataset(pattern(wds_dir), str(tmp_path / "c16"), size=16, workers=0, progress=False)
    kw = dict(respace="4", batch_size=8, threads=1, progress=False)
    read = nll(model, pattern(wds_dir), resize="adm", **kw)
    conv = nll(model, str(tmp_path / "c16"), **kw)
    assert read.report["images"] == conv.report["images"] == N
    assert np.array_equal(read.total_bpd, conv.total_bpd) and np.array_equal(read.index, np.arange(N))
    with pytest.raises(UsageError, match="earlier images are"):
        nll(model, pattern(wds_dir), **kw)


def test_verify_inspects_shards_without_a_manifest(wds_dir, tmp_path, capsys):
    import webdataset as wds

    assert verify([pattern(wds_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{N} decodable of {N} samples in 3 shards" in out and "5 sizes (8x8 to 40x40)" in out
    assert "labels 0..2" in out and "--data-image-size" in out
    with wds.ShardWriter(str(tmp_path / "b-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "png": encode(np.zeros((4, 4, 3), np.uint8), "PNG") if i != 1
                        else b"\x89PNGbroken", "cls": i})
    assert verify([str(tmp_path / "b-000000.tar")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("FAILED") and "2 decodable of 3 samples" in err and "sample 1: undecodable png" in err
    assert err.count("\n") == 1


def test_comma_lists_and_commas_in_file_names(wds_dir, tmp_path):
    import shutil

    from data.sources import resolve

    a, b = sorted(glob.glob(os.path.join(wds_dir, "*.tar")))[:2]
    odd = str(tmp_path / "x,y.tar")
    shutil.copy(a, odd)
    assert resolve(f"{a}, {b}").urls == [a, b] and resolve(odd).urls == [odd]
    braced = os.path.join(wds_dir, "train-{000000,000002}.tar")  # commas inside braces belong to the pattern
    assert resolve(f"{braced},{b}").urls == [a, os.path.join(wds_dir, "train-000002.tar"), b]
    assert resolve([odd, b]).urls == [odd, b]  # a list item is split only when it names no file
    with pytest.raises(DataError, match="no such file"):
        resolve(f"{a},{tmp_path / 'nope.tar'}")
