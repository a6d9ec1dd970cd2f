"""Streaming: exactly-once evaluation over ranks x workers, deterministic and resumable training order,
flips, source forms (manifest, folder, brace, glob, list), blobfile reads, clear source errors."""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.prepare import main as prepare
from data.stream import EvalStream, TrainStream

torch.set_num_threads(1)
N, SIDE = 60, 8


def make_images(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Image i carries its index in pixel (0, 0) (channels 0, 1) and a left/right asymmetric ramp."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
    imgs[:, 0, 0, 0], imgs[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    imgs[:, 0, -1, :2] = 255  # top-right corner marker: tells a flipped image from the original
    return imgs, np.arange(n) % 5


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ds")
    imgs, labels = make_images()
    np.savez(root / "src.npz", imgs, labels)
    assert prepare(["npz", str(root / "src.npz"), "--out-dir", str(root / "out"), "--shard-size", "7", "--workers", "0",
                    "--no-progress"]) == 0
    return str(root / "out")


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def identify(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """-> (sample index [B], flipped [B] bool) read back from the pixels."""
    u = to_u8(x)
    flipped = (u[:, 0, 0, :2] == 255).all(1) & ~(u[:, 0, -1, :2] == 255).all(1)
    corner = np.where(flipped[:, None], u[:, 0, -1, :2], u[:, 0, 0, :2]).astype(np.int64)
    return corner[:, 0] + 256 * corner[:, 1], flipped


def test_eval_exactly_once_2_ranks_x_2_workers(ds):
    imgs, labels = make_images()
    seen = []
    for rank in range(2):
        stream = EvalStream(os.path.join(ds, "train-manifest.json"), 4, rank=rank, world_size=2, num_workers=2)
        assert len(stream) == N // 2
        for x, y, i in stream:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, SIDE, SIDE) and y.dtype == torch.int64
            assert np.array_equal(to_u8(x), imgs[i.numpy()])  # pixel-exact, right index
            assert np.array_equal(y.numpy(), labels[i.numpy()])
            seen += i.tolist()
        assert stream.bad_samples == 0
    assert sorted(seen) == list(range(N))  # union is everything, no duplicates


@pytest.mark.parametrize("world, workers", [(3, 0), (1, 2), (4, 2)])
def test_eval_exactly_once_other_splits(ds, world, workers):
    seen = []
    for rank in range(world):
        seen += [int(k) for _, _, i in EvalStream(ds, 5, rank=rank, world_size=world, num_workers=workers)
                 for k in i]
    assert sorted(seen) == list(range(N))


def test_eval_without_manifest_counts_shards(ds, tmp_path):
    for p in glob.glob(os.path.join(ds, "*.tar")):
        shutil.copy(p, tmp_path)
    src = str(tmp_path / "train-{000000..000008}.tar")
    seen = [int(k) for r in range(2) for _, _, i in EvalStream(src, 8, rank=r, world_size=2) for k in i]
    assert sorted(seen) == list(range(N))


def take(stream: TrainStream, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n):
        x, y = next(stream)
        idx, flipped = identify(x)
        out.append((idx, flipped, y.numpy()))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_train_resume_is_exact(ds, workers):
    kw = dict(seed=3, rank=1, world_size=2, num_workers=workers)
    full = TrainStream(ds, 8, **kw)
    ref = take(full, 11)
    full.close()
    first = TrainStream(ds, 8, **kw)
    take(first, 5)  # 40 samples: stops in the middle of a 28-sample block
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["samples"] == 40 and state["batches"] == 5
    resumed = TrainStream(ds, 8, state=state, **kw)
    got = take(resumed, 6)
    resumed.close()
    for (a, fa, ya), (b, fb, yb) in zip(ref[5:], got):
        assert np.array_equal(a, b) and np.array_equal(fa, fb) and np.array_equal(ya, yb)


def test_train_order_depends_on_seed_and_rank_only_as_it_should(ds):
    a = take(TrainStream(ds, 16, seed=0, rank=0, world_size=2), 4)
    b = take(TrainStream(ds, 16, seed=0, rank=0, world_size=2), 4)
    c = take(TrainStream(ds, 16, seed=0, rank=1, world_size=2), 4)
    d = take(TrainStream(ds, 16, seed=1, rank=0, world_size=2), 4)
    cat = lambda r: np.concatenate([t[0] for t in r])  # noqa: E731
    assert np.array_equal(cat(a), cat(b))
    assert not np.array_equal(cat(a), cat(c)) and not np.array_equal(cat(a), cat(d))


def test_train_content_labels_flip_and_shuffle(ds):
    imgs, labels = make_images()
    stream = TrainStream(os.path.join(ds, "train-manifest.json"), 32, seed=5)
    n_flip, ids = 0, []
    for _ in range(30):
        x, y = next(stream)
        idx, flipped = identify(x)
        u = to_u8(x)
        u[flipped] = u[flipped, :, ::-1]
        assert np.array_equal(u, imgs[idx]) and np.array_equal(y.numpy(), labels[idx])
        n_flip += int(flipped.sum())
        ids += idx.tolist()
    assert 0.4 < n_flip / 960 < 0.6  # fair coin per sample
    assert set(ids) == set(range(N))  # resampling reaches every shard
    assert ids[:N] != sorted(ids[:N])  # shuffled
    x, _ = next(TrainStream(ds, 64, flip=False))
    assert not identify(x)[1].any()


def test_train_block_draws_follow_the_documented_seed_derivation(ds):
    """Block b of worker w on rank r: shards, permutation and flips from np.random.default_rng([seed, r, w, b])."""
    counts = np.array([7] * 8 + [4])
    first = np.concatenate([[0], np.cumsum(counts)])
    stream = TrainStream(ds, 8, seed=4, rank=1, world_size=2, shards_per_block=2)
    got = take(stream, 6)  # 48 samples: several blocks
    ids, flips = [], []
    for block in range(6):  # every block holds >= 8 samples (two shards of 4 or 7)
        rng = np.random.default_rng([4, 1, 0, block])
        picks = rng.choice(len(counts), size=2, replace=True, p=counts / counts.sum())
        samples = np.concatenate([np.arange(first[i], first[i + 1]) for i in picks])
        ids.append(samples[rng.permutation(len(samples))])
        flips.append(rng.random(len(samples)) < 0.5)
    ids, flips = np.concatenate(ids)[:48], np.concatenate(flips)[:48]
    assert np.array_equal(np.concatenate([g[0] for g in got]), ids)
    assert np.array_equal(np.concatenate([g[1] for g in got]), flips)


def test_state_mismatch_is_a_clear_error(ds):
    s = TrainStream(ds, 4, num_workers=0)
    next(s)
    with pytest.raises(DataError, match="num_workers=0"):
        TrainStream(ds, 4, num_workers=2, state=s.state_dict())
    with pytest.raises(DataError, match="not a TrainStream state_dict"):
        TrainStream(ds, 4, state={"seed": 0})


def test_source_forms_agree(ds):
    base = [sorted(glob.glob(os.path.join(ds, "*.tar")))]
    forms = [ds, os.path.join(ds, "train-manifest.json"), os.path.join(ds, "train-{000000..000008}.tar"),
             os.path.join(ds, "train-*.tar"), base[0], [os.path.join(ds, "train-00000{0..4}.tar"),
                                                         os.path.join(ds, "train-00000[5-8].tar")]]
    for f in forms:
        s = EvalStream(f, 100)
        assert s.spec.urls == base[0] and s.total == N and s.spec.counts == [7] * 8 + [4], f
        assert s.num_classes == 5 and s.image_size == (SIDE, SIDE)


def test_clear_errors_for_missing_paths_and_empty_patterns(ds, tmp_path):
    cases = [(str(tmp_path / "nope.tar"), "no such file"), (str(tmp_path / "nope-manifest.json"), "not found"),
             (os.path.join(ds, "val-*.tar"), "matches no files"),
             (os.path.join(ds, "val-{000000..000003}.tar"), "matches no files"),
             (os.path.join(ds, "train-{000007..000010}.tar"), "2 of 4 shards"), ([], "empty data source"),
             (str(tmp_path), "no manifest and no .tar")]
    for source, needle in cases:
        with pytest.raises(DataError, match=needle) as e:
            TrainStream(source, 4)
        assert "\n" not in str(e.value)


def test_reads_go_through_blobfile(ds, monkeypatch):
    """Every shard read is a blobfile.BlobFile open (here blobfile's local-path backend; gs:// and az:// use
    the same call). Checked with a spy that delegates to the real BlobFile."""
    import blobfile

    real, opened = blobfile.BlobFile, []

    def spy(path, mode="r", **kw):
        opened.append(path)
        return real(path, mode, **kw)

    monkeypatch.setattr(blobfile, "BlobFile", spy)
    stream = TrainStream(ds, 16, seed=0)
    for _ in range(3):
        next(stream)
    assert any(p.endswith("train-manifest.json") for p in opened)
    assert sum(p.endswith(".tar") for p in opened) >= 4  # one block = 4 shard reads
    seen = [int(k) for _, _, i in EvalStream(ds, 16) for k in i]
    assert sorted(seen) == list(range(N)) and sum(p.endswith(".tar") for p in opened) >= 13


def test_webdataset_interoperability(ds, tmp_path):
    """Our shards decode with plain webdataset; PNG shards written by webdataset stream through ours."""
    import io

    import webdataset as wds
    from PIL import Image

    imgs, labels = make_images()
    urls = sorted(glob.glob(os.path.join(ds, "*.tar")))
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode().to_tuple("__key__", "npy", "cls"))
    assert len(got) == N
    for key, img, cls in got:
        assert np.array_equal(img, imgs[int(key)]) and cls == labels[int(key)]
    with wds.TarWriter(str(tmp_path / "png-000000.tar")) as sink:
        for i in range(10):
            buf = io.BytesIO()
            Image.fromarray(imgs[i]).save(buf, format="PNG")
            sink.write({"__key__": f"s{i}", "png": buf.getvalue(), "cls": str(int(labels[i]))})
    stream = EvalStream(str(tmp_path / "png-000000.tar"), 4)
    assert stream.image_size == (SIDE, SIDE) and stream.total == 10
    xs, ys = zip(*[(x, y) for x, y, _ in stream])
    assert np.array_equal(to_u8(torch.cat(xs)), imgs[:10]) and np.array_equal(torch.cat(ys).numpy(), labels[:10])
