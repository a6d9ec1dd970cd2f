"""Streaming shards into training and evaluation batches.

Training (TrainStream): each rank runs ``max(num_workers, 1)`` logical workers. Logical worker w of rank r
reads an infinite sequence of blocks; block b draws ``shards_per_block`` shards with replacement (weighted by
their sample counts when a manifest gives them) and a permutation + flip bits of the block's good samples, all
from ``data.seeds.derive_rng(seed, r, w, b)``. Worker w makes batches w, w+W, w+2W, ... of the rank's
stream, which is also the order in which torch's DataLoader hands worker batches back. So the stream is a
pure function of (seed, rank, num_workers, position), and ``state_dict()`` (each worker's block and offset,
plus counters) resumes it exactly, mid-block included: the block is re-drawn and re-read, nothing replayed.

Evaluation (EvalStream): the global sample order is the manifest's shard order, then member order; rank r
takes the contiguous range [N r / R, N (r+1) / R) and its workers split that range again, so every sample
is read exactly once (indices are yielded to prove it).

Bad data (see ``shards.read_shard``) is skipped, counted in ``.bad_samples`` and reported by a rate-limited
warning; once ``bad / seen > max_bad_fraction`` the stream raises one DataError naming the shards.

Any webdataset (``data.decode``: image and label members; ``image_size``: resized when read) streams the same
way: decoding and resizing are pure functions of a shard's bytes, so order and resume are unchanged.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .decode import DEFAULT_RESIZE, RESIZERS
from .errors import DataError
from .seeds import derive_rng
from .shards import ShardData, count_samples, first_sample, read_shard
from .sources import Source, SourceLike, resolve

log = logging.getLogger("data")
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- helpers
def _empty(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """float32 tensor; ``shared``: allocated in shared memory, so a DataLoader worker hands it to the main
    process without the extra copy torch would otherwise make when pickling it."""
    if not shared:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.UntypedStorage._new_shared(4 * int(np.prod(shape)))
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def to_float(images: Sequence[np.ndarray] | np.ndarray, flips: np.ndarray | None = None,
             shared: bool = False) -> torch.Tensor:
    """uint8 images [H, W, 3] (an array [B, H, W, 3] or a list) -> float32 [B, 3, H, W] in [-1, 1]
    (0 -> -1, 255 -> 1 exactly); ``flips[i]`` mirrors image i left-right.

    One pass per image: numpy reads the HWC (possibly mirrored) view with strides and writes CHW floats,
    so there is no separate gather, transpose or flip copy.
    """
    B = len(images)
    H, W = (images[0].shape[:2]) if B else (0, 0)
    result = _empty((B, 3, H, W), shared)
    out = result.numpy()
    for i in range(B):
        v = images[i].transpose(2, 0, 1)
        if flips is not None and flips[i]:
            v = v[:, :, ::-1]
        out[i] = v  # uint8 -> float32 cast while reading the strided view
    np.divide(out, np.float32(127.5), out=out)  # exact: 255 / 127.5 == 2
    np.subtract(out, np.float32(1.0), out=out)
    return result


class _BadData:
    """Counts good/bad samples of one worker, warns at most every ``interval`` s, enforces the limit."""

    def __init__(self, max_bad_fraction: float, bad: int = 0, seen: int = 0, interval: float = 30.0) -> None:
        self.max_bad_fraction, self.bad, self.seen, self.interval = max_bad_fraction, bad, seen, interval
        self.shards: dict[str, str] = {}  # shard -> first problem, for the final message
        self._last_warn, self._unwarned = -1e18, 0

    def add(self, sd: ShardData) -> None:
        self.seen += sd.seen
        if not sd.bad:
            return
        self.bad += sd.bad
        self.shards.setdefault(sd.path, sd.problems[0] if sd.problems else "bad samples")
        self._unwarned += sd.bad
        now = time.monotonic()
        if now - self._last_warn >= self.interval:
            log.warning("data: skipped %d bad sample(s) (%d of %d so far); e.g. %s",
                        self._unwarned, self.bad, self.seen, sd.problems[0] if sd.problems else sd.path)
            self._last_warn, self._unwarned = now, 0

    def check(self) -> None:
        if self.seen and self.bad / self.seen > self.max_bad_fraction:
            items = list(self.shards.items())
            more = f"; and {len(items) - 5} more shards" if len(items) > 5 else ""
            named = "; ".join(p for _, p in items[:5]) + more
            raise DataError(f"too much bad data: {self.bad} of {self.seen} samples ({100 * self.bad / self.seen:.2f}%) "
                            f"exceed max_bad_fraction={self.max_bad_fraction}: {named}")


def _peek(src: Source, shape: tuple[int, int] | None) -> tuple[tuple[int, int], bool]:
    """Image size and labelled-ness from the first shard with a readable sample (when no manifest says). With
    ``shape`` (images are resized to it) only the first decodable sample is read; without, the first image sets
    the size and another size anywhere in that shard raises MixedSizes at once."""
    for url in src.urls[:8]:
        if shape is not None:  # resized anyway: only labelled-ness is wanted, from the first decodable sample
            first = first_sample(url)
            if first is not None:
                return shape, first[1] if src.num_classes is None else src.num_classes > 0
            continue
        sd = read_shard(url, shape, labelled=None if src.num_classes is None else src.num_classes > 0,
                        num_classes=src.num_classes, strict_shape=True)
        if len(sd):
            labelled = bool((sd.labels >= 0).all()) if src.num_classes is None else src.num_classes > 0
            return (int(sd.images[0].shape[0]), int(sd.images[0].shape[1])), labelled
    raise DataError(f"no readable sample in the first {min(len(src.urls), 8)} shard(s) of {src.urls[0]}")


class _Spec:
    """What every worker needs to know about the data (picklable, small).

    image_size: every image becomes image_size x image_size, resized with ``decode.RESIZERS[resize]`` when it
    has another size (None: no resizing; a source without a manifest must then hold one image size)."""

    def __init__(self, source: SourceLike, max_bad_fraction: float, image_size: int | None = None,
                 resize: str = DEFAULT_RESIZE) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if image_size is not None:
            _check_int("image_size", image_size, 1)
        if resize not in RESIZERS:
            raise ValueError(f"resize must be one of {', '.join(sorted(RESIZERS))}, got {resize!r}")
        src = resolve(source)
        target = None if image_size is None else (int(image_size), int(image_size))
        self.resize = resize if target is not None and tuple(src.shape or ()) != target else None
        if src.shape is None or src.num_classes is None:
            shape, labelled = _peek(src, target)
        else:
            shape, labelled = src.shape, src.num_classes > 0
        self.urls, self.counts, self.shape = src.urls, src.counts, tuple(target or shape)
        self.labelled, self.num_classes = labelled, src.num_classes or None
        self.max_bad_fraction = max_bad_fraction
        self.strict = src.shape is None and self.resize is None  # size from a peek: another size = mixed sizes

    def read(self, i: int) -> ShardData:
        return read_shard(self.urls[i], self.shape, labelled=self.labelled, num_classes=self.num_classes,
                          expected=None if self.counts is None else self.counts[i], resize=self.resize,
                          strict_shape=self.strict)


def _check_rank(rank: int, world_size: int) -> tuple[int, int]:
    """(rank, world_size) checked: world_size >= 1 and 0 <= rank < world_size."""
    world_size, rank = _check_int("world_size", world_size, 1), _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} must be < world_size {world_size}")
    return rank, world_size


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


# ------------------------------------------------------------------------------------------- training
class _TrainWorker:
    """Logical worker ``worker`` of ``rank``: an infinite batch stream resumable from (block, pos)."""

    def __init__(self, spec: _Spec, batch_size: int, seed: int, rank: int, worker: int, flip: bool,
                 shards_per_block: int, state: dict, shared: bool = False) -> None:
        self.spec, self.B, self.key, self.flip, self.K = spec, batch_size, (seed, rank, worker), flip, shards_per_block
        self.shared = shared
        self.block, self.pos = int(state["block"]), int(state["pos"])
        self.stats = _BadData(spec.max_bad_fraction, int(state["bad_before"]), int(state["seen_before"]))
        n = len(spec.urls)
        c = np.asarray(spec.counts if spec.counts is not None else [1] * n, np.float64)
        self.p = c / c.sum() if c.sum() > 0 else np.full(n, 1.0 / n)
        self.loaded = -1

    def _load(self) -> None:
        """Read block ``self.block``: shards, permutation and flip bits from rng(seed, rank, worker, block)."""
        rng = derive_rng(*self.key, self.block)
        picks = rng.choice(len(self.spec.urls), size=self.K, replace=True, p=self.p)
        shards = [self.spec.read(int(i)) for i in picks]
        self.before = (self.stats.bad, self.stats.seen)
        for sd in shards:
            self.stats.add(sd)
        self.stats.check()
        self.shard_images = [s.images for s in shards]
        which = np.concatenate([np.full(len(s), k, np.int64) for k, s in enumerate(shards)])
        local = np.concatenate([np.arange(len(s)) for s in shards])
        labels = np.concatenate([s.labels for s in shards])
        perm = rng.permutation(len(labels))
        flips = rng.random(len(labels)) < 0.5
        self.which, self.local, self.labels, self.flips = which[perm], local[perm], labels[perm], flips
        self.loaded = self.block

    def state(self) -> dict:
        bad_before, seen_before = self.before if self.loaded == self.block else (self.stats.bad, self.stats.seen)
        return {"block": self.block, "pos": self.pos, "bad_before": bad_before, "seen_before": seen_before,
                "bad": self.stats.bad, "seen": self.stats.seen}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(images float32 [B, 3, H, W] in [-1, 1], labels int64 [B], state after this batch)."""
        views: list[np.ndarray] = []
        labels, flips, empty = [], [], 0
        while len(views) < self.B:
            if self.loaded != self.block:
                self._load()
            n = len(self.labels)
            a, b = self.pos, min(n, self.pos + self.B - len(views))
            views += [self.shard_images[s][j] for s, j in zip(self.which[a:b].tolist(), self.local[a:b].tolist())]
            labels.append(self.labels[a:b])
            flips.append(self.flips[a:b])
            self.pos = b
            if self.pos >= n:
                self.block, self.pos = self.block + 1, 0
                empty = empty + 1 if n == 0 else 0
                if empty >= 100:
                    raise DataError(f"no readable samples in 100 consecutive blocks of {self.spec.urls[0]} ...")
        f = np.concatenate(flips) if self.flip else None
        return to_float(views, f, self.shared), torch.from_numpy(np.concatenate(labels)), self.state()


def _make_train_worker(spec: _Spec, batch_size: int, seed: int, rank: int, flip: bool, shards_per_block: int,
                       states: list[dict], w: int) -> _TrainWorker:
    in_worker = torch.utils.data.get_worker_info() is not None
    return _TrainWorker(spec, batch_size, seed, rank, w, flip, shards_per_block, states[w], shared=in_worker)


class _TrainDataset(torch.utils.data.IterableDataset):
    def __init__(self, make: Any, num_workers: int, offset: int) -> None:
        self.make, self.W, self.offset = make, num_workers, offset

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        w = ((info.id if info else 0) + self.offset) % self.W
        try:
            worker = self.make(w)
            while True:
                x, y, st = worker.next_batch()
                yield x, y, w, st
        except DataError as e:  # travels as data: the main process raises it as one clean line
            yield "error", str(e), w, None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class TrainStream:
    """Infinite, shuffled, resampled, resumable training batches.

    Yields ``(images float32 [B, 3, H, W] in [-1, 1], labels int64 [B])``; labels are -1 for an unlabelled
    data set. ``state_dict()`` is JSON-serialisable and per rank: pass it back as ``state=`` to continue
    exactly (same seed, rank, world_size and num_workers required). ``bad_samples``: bad samples skipped.
    ``image_size``: centre-crop and resize every image of another size to image_size x image_size when read, with
    ``data.decode.RESIZERS[resize]`` ("adm": guided-diffusion's center_crop_arr, or "area"); None: images as
    stored (a source without a manifest must then hold one size, else MixedSizes, a DataError).
    """

    def __init__(self, source: SourceLike, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, flip: bool = True, state: dict | None = None,
                 max_bad_fraction: float = 0.01, shards_per_block: int = 4, prefetch_factor: int = 2,
                 multiprocessing_context: str | None = None, image_size: int | None = None,
                 resize: str = DEFAULT_RESIZE) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.seed, self.num_workers = _check_int("seed", seed, 0), _check_int("num_workers", num_workers, 0)
        self.shards_per_block = _check_int("shards_per_block", shards_per_block, 1)
        self.flip, self.prefetch_factor, self.mp_context = bool(flip), prefetch_factor, multiprocessing_context
        self.spec = _Spec(source, max_bad_fraction, image_size, resize)
        self.image_size: tuple[int, int] = self.spec.shape  # (H, W)
        self.num_classes: int | None = self.spec.num_classes
        W = max(1, self.num_workers)
        fresh = {"block": 0, "pos": 0, "bad_before": 0, "seen_before": 0, "bad": 0, "seen": 0}
        self._workers = [dict(fresh) for _ in range(W)]
        self._batches = self._samples = 0
        if state is not None:
            self.load_state_dict(state)
        self._it: Iterator | None = None

    # -- resumable position
    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's stream (after the last batch returned)."""
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "shards_per_block": self.shards_per_block,
                "batches": self._batches, "samples": self._samples, "workers": [dict(w) for w in self._workers]}

    def load_state_dict(self, state: dict) -> None:
        if getattr(self, "_it", None) is not None:
            raise RuntimeError("load_state_dict must be called before iterating")
        try:
            mine = {k: getattr(self, k) for k in ("seed", "rank", "world_size", "num_workers", "shards_per_block")}
            diff = [f"{k}={state[k]} (now {v})" for k, v in mine.items() if int(state[k]) != v]
            workers = [{k: int(w[k]) for k in self._workers[0]} for w in state["workers"]]
            batches, samples = int(state["batches"]), int(state["samples"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a TrainStream state_dict (missing or bad {e})") from None
        if diff:
            raise DataError("cannot resume the data stream exactly: it was saved with " + ", ".join(diff))
        self._workers, self._batches, self._samples = workers, batches, samples

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped so far by this rank (as of the last batch returned)."""
        return sum(w["bad"] for w in self._workers)

    @property
    def samples_seen(self) -> int:
        return sum(w["seen"] for w in self._workers)

    # -- iteration
    def _start(self) -> None:
        make = functools.partial(_make_train_worker, self.spec, self.batch_size, self.seed, self.rank, self.flip,
                                 self.shards_per_block, [dict(w) for w in self._workers])
        if self.num_workers == 0:
            self._it = iter(_TrainDataset(make, 1, 0))
        else:
            ds = _TrainDataset(make, self.num_workers, self._batches % self.num_workers)
            self._loader = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                worker_init_fn=_worker_init, multiprocessing_context=self.mp_context)
            self._it = iter(self._loader)

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._start()
        x, y, w, st = next(self._it)  # type: ignore[arg-type]
        if isinstance(x, str):
            self.close()
            raise DataError(y)
        self._workers[w] = st
        self._batches += 1
        self._samples += len(y)
        return x, y

    def close(self) -> None:
        """Stop loader workers (also done at garbage collection)."""
        self._it = None
        self._loader = None


# ------------------------------------------------------------------------------------------ evaluation
class _EvalDataset(torch.utils.data.IterableDataset):
    def __init__(self, spec: _Spec, offsets: np.ndarray, lo: int, hi: int, batch_size: int, W: int) -> None:
        self.spec, self.offsets, self.lo, self.hi, self.B, self.W = spec, offsets, lo, hi, batch_size, W

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        w = info.id if info else 0
        n = self.hi - self.lo
        lo, hi = self.lo + n * w // self.W, self.lo + n * (w + 1) // self.W
        stats = _BadData(self.spec.max_bad_fraction)
        imgs: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        try:
            for s in range(len(self.spec.urls)):
                a, b = int(self.offsets[s]), int(self.offsets[s + 1])
                if b <= lo or a >= hi:
                    continue
                sd = self.spec.read(s)
                idx = a + sd.positions
                # positions past the manifest count (a shard longer than recorded) would alias the next shard
                keep = np.nonzero((idx >= lo) & (idx < hi) & (sd.positions < b - a))[0]
                want = min(b, hi) - max(a, lo)  # samples of this shard in our range; the rest of them are bad
                sd.seen, sd.bad = want, want - len(keep)
                stats.add(sd)
                stats.check()
                imgs += [sd.images[k] for k in keep]
                labs.append(sd.labels[keep]), ids.append(idx[keep])
                last = b >= hi or s == len(self.spec.urls) - 1
                while len(imgs) >= self.B or (imgs and last):
                    k = min(self.B, len(imgs))
                    lab, ix = np.concatenate(labs), np.concatenate(ids)
                    x = to_float(imgs[:k], shared=info is not None)
                    yield x, torch.from_numpy(lab[:k]), torch.from_numpy(ix[:k]), w, (stats.bad, stats.seen)
                    imgs, labs, ids = imgs[k:], [lab[k:]], [ix[k:]]
        except DataError as e:
            yield "error", str(e), None, w, None


class EvalStream:
    """Every sample exactly once across ranks and workers: yields ``(images float32 [B, 3, H, W] in [-1, 1],
    labels int64 [B], indices int64 [B])``; indices are global positions (shard order, then member order).
    Batches may be short at the end of each worker's range. Iterating again starts a new pass. ``image_size`` and
    ``resize``: as for TrainStream."""

    def __init__(self, source: SourceLike, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, max_bad_fraction: float = 0.01,
                 multiprocessing_context: str | None = None, image_size: int | None = None,
                 resize: str = DEFAULT_RESIZE) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.num_workers, self.mp_context = _check_int("num_workers", num_workers, 0), multiprocessing_context
        self.spec = _Spec(source, max_bad_fraction, image_size, resize)
        self.image_size, self.num_classes = self.spec.shape, self.spec.num_classes
        counts = self.spec.counts
        if counts is None:  # no manifest: count members once (reads every shard)
            counts = [count_samples(u) for u in self.spec.urls]
            self.spec.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.lo, self.hi = self.total * self.rank // self.world_size, self.total * (self.rank + 1) // self.world_size
        self._bad: dict[int, int] = {}

    def __len__(self) -> int:
        """Samples this rank will yield if none are bad."""
        return self.hi - self.lo

    @property
    def bad_samples(self) -> int:
        return sum(self._bad.values())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        W = max(1, self.num_workers)
        ds = _EvalDataset(self.spec, self.offsets, self.lo, self.hi, self.batch_size, W)
        it = iter(ds) if self.num_workers == 0 else iter(torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
            multiprocessing_context=self.mp_context))
        self._bad = {}
        for x, y, i, w, st in it:
            if isinstance(x, str):
                raise DataError(y)
            self._bad[w] = st[0]
            yield x, y, i
