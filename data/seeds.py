"""The one seed derivation: every random stream of a run is a pure function of (seed, rank, step, ...) parts, so
that a resumed run draws exactly the numbers an uninterrupted one would."""
from __future__ import annotations

import numpy as np


def derive_rng(*parts: int) -> np.random.Generator:
    """A numpy Generator seeded by `np.random.SeedSequence(parts)` (parts: non-negative integers)."""
    return np.random.default_rng([int(p) for p in parts])


def derive_seed(*parts: int) -> int:
    """A 63-bit integer seed (for torch generators) from the same SeedSequence as `derive_rng(*parts)`."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))
