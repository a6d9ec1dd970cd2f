"""Bad data is skipped and counted, warned about at a limited rate, and stops the run past a threshold."""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.shards import FORMAT, encode_image
from data.stream import EvalStream, TrainStream

torch.set_num_threads(1)
SHARDS, PER, SIDE, CLASSES = 4, 10, 8, 5


def image(i: int) -> np.ndarray:
    img = np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    img[0, 0, 0] = i
    return img


def members(i: int) -> list[tuple[str, bytes]]:
    return [(f"{i:09d}.npy", encode_image(image(i))), (f"{i:09d}.cls", str(i % CLASSES).encode())]


def tar_of(items: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def build(root, damage) -> tuple[str, set[int]]:
    """4 shards x 10 samples; ``damage(shard_1_members) -> (bytes | None | 'dir', bad indices)`` spoils shard 1."""
    os.makedirs(root, exist_ok=True)
    entries, bad = [], set()
    for s in range(SHARDS):
        items = [m for i in range(s * PER, (s + 1) * PER) for m in members(i)]
        data = tar_of(items)
        path = os.path.join(root, f"train-{s:06d}.tar")
        if s == 1:
            data, bad = damage(items)
        if data == "dir":
            os.makedirs(path)
        elif data is not None:
            with open(path, "wb") as f:
                f.write(data)
        entries.append({"path": os.path.basename(path), "samples": PER})
    manifest = {"format": FORMAT, "version": 1, "name": "train", "image_size": [SIDE, SIDE], "channels": 3,
                "num_classes": CLASSES, "total": SHARDS * PER, "shards": entries}
    with open(os.path.join(root, "train-manifest.json"), "w") as f:
        json.dump(manifest, f)
    return os.path.join(root, "train-manifest.json"), bad


def replace(items, name, payload):
    return [(n, payload if n == name else d) for n, d in items]


def truncated(items):
    data = tar_of(items)
    cut = data.find(b"000000016.npy") + 512 + 300  # inside sample 16's image
    return data[:cut], set(range(16, 20))


CASES = {
    "corrupt npy": lambda it: (tar_of(replace(it, "000000013.npy", b"\x93NUMPY garbage" + b"\0" * 200)), {13}),
    "corrupt png": lambda it: (tar_of([(n.replace("013.npy", "013.png"), b"\x89PNG\r\n\x1a\nbroken" if "013" in n
                                         and n.endswith("npy") else d) for n, d in it]), {13}),
    "wrong size": lambda it: (tar_of(replace(it, "000000013.npy", encode_image(np.zeros((4, 4, 3), np.uint8)))), {13}),
    "wrong shape": lambda it: (tar_of(replace(it, "000000013.npy", encode_image(np.zeros((SIDE, 2 * SIDE, 3),
                                                                                            np.uint8)))), {13}),
    "short member": lambda it: (tar_of(replace(it, "000000013.npy", encode_image(image(13))[:-10])), {13}),
    "missing label": lambda it: (tar_of([m for m in it if m[0] != "000000013.cls"]), {13}),
    "label out of range": lambda it: (tar_of(replace(it, "000000013.cls", b"7")), {13}),
    "label not a number": lambda it: (tar_of(replace(it, "000000013.cls", b"seven")), {13}),
    "truncated tar": truncated,
    "bad tar header": lambda it: (lambda d: (d[:512 * 8 + 100] + b"X" + d[512 * 8 + 101:], set(range(12, 20))))(tar_of(it)),
    "empty shard": lambda it: (tar_of([]), set(range(10, 20))),
    "zero-byte shard": lambda it: (b"", set(range(10, 20))),
    "missing file": lambda it: (None, set(range(10, 20))),
    "unreadable file": lambda it: ("dir", set(range(10, 20))),
}


def identify(x: torch.Tensor) -> np.ndarray:
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_skipped_counted_and_limited(tmp_path, case):
    manifest, bad = build(tmp_path / "ds", CASES[case])
    good = sorted(set(range(SHARDS * PER)) - bad)
    stream = EvalStream(manifest, 6, max_bad_fraction=0.5)
    got = []
    for x, y, i in stream:
        assert np.array_equal(identify(x), i.numpy())
        assert np.array_equal(y.numpy(), i.numpy() % CLASSES)
        got += i.tolist()
    assert sorted(got) == good
    assert stream.bad_samples == len(bad)
    with pytest.raises(DataError, match="train-000001.tar") as e:
        list(EvalStream(manifest, 6, max_bad_fraction=0.01))
    assert "\n" not in str(e.value) and "max_bad_fraction=0.01" in str(e.value)
    train = TrainStream(manifest, 8, max_bad_fraction=0.5, flip=False, seed=1)
    for _ in range(10):
        x, y = next(train)
        assert not set(identify(x).tolist()) & bad
    assert train.bad_samples > 0 and train.bad_samples % len(bad) == 0


def test_train_stops_past_threshold_with_workers(tmp_path):
    manifest, _ = build(tmp_path / "ds", CASES["missing file"])
    stream = TrainStream(manifest, 8, num_workers=2, max_bad_fraction=0.01, seed=0)
    with pytest.raises(DataError, match=r"too much bad data: .*train-000001.tar: missing") as e:
        for _ in range(50):
            next(stream)
    assert "\n" not in str(e.value)


def test_warnings_are_rate_limited(tmp_path, caplog):
    manifest, _ = build(tmp_path / "ds", CASES["label out of range"])
    stream = TrainStream(manifest, 8, max_bad_fraction=0.5, seed=2)
    with caplog.at_level(logging.WARNING, logger="data"):
        for _ in range(40):  # about eight blocks, most of them draw the bad shard
            next(stream)
    assert stream.bad_samples >= 3
    warned = [r for r in caplog.records if r.name == "data"]
    assert len(warned) == 1 and "label 7 out of range" in warned[0].getMessage()
