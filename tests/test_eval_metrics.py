"""Metrics against closed forms and independent implementations (scipy, prdc)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from evaluations.metrics import (MetricError, feature_statistics, frechet_distance, inception_score, knn_radii,
                                 precision_recall)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-10)


def test_frechet_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 24)), rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.5
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert np.allclose(s1, np.cov(a, rowvar=False))


def test_frechet_rejects_bad_stats():
    with pytest.raises(MetricError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricError, match="NaN"):
        frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(MetricError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_inception_score_closed_form():
    # Every sample puts mass q on its own class and (1-q)/(C-1) on the others; classes balanced in each split,
    # so p(y) is uniform and KL = q log(qC) + (1-q) log((1-q) C / (C-1)).
    c, q, splits = 8, 0.7, 10
    p = np.full((c, c), (1 - q) / (c - 1))
    np.fill_diagonal(p, q)
    logits = np.log(np.tile(p, (splits * 5, 1)))   # 400 rows, each split of 40 holds every class 5 times
    kl = q * np.log(q * c) + (1 - q) * np.log((1 - q) * c / (c - 1))
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(np.exp(kl), rel=1e-10)
    assert std == pytest.approx(0, abs=1e-10)
    # Identical predictions everywhere -> IS = 1; shifting logits by a constant changes nothing.
    same = np.tile(np.log(p[0]), (100, 1)) + 3.0
    assert inception_score(same)[0] == pytest.approx(1.0, rel=1e-12)


def test_inception_score_extreme_logits_finite():
    logits = np.zeros((20, 5))
    logits[np.arange(20), np.arange(20) % 5] = 1e4   # one-hot to machine precision
    assert inception_score(logits, splits=2)[0] == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_precision_recall_equals_prdc(dtype):
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 32))
    fake = rng.normal(size=(250, 32)) * 1.2 + 0.15
    expected = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    # small blocks so the blocked code paths (partial last block, several support blocks) are exercised
    p, r = precision_recall(real, fake, k=3, block=64, device="cpu", dtype=dtype)
    assert p == expected["precision"]
    assert r == expected["recall"]
    assert 0 < p < 1 and 0 < r < 1


def test_knn_radii_bruteforce():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 4))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]            # column 0 is the point itself
    got = knn_radii(x, k=3, block=7, device="cpu", dtype=torch.float64).numpy()
    assert np.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_precision_recall_bad_inputs():
    rng = np.random.default_rng(4)
    good = rng.normal(size=(10, 4))
    with pytest.raises(MetricError, match="at least 4"):
        precision_recall(good, good[:3], k=3)
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(MetricError, match="NaN"):
        precision_recall(good, bad)
    with pytest.raises(MetricError, match="shape"):
        precision_recall(good, good[:, :, None])
    with pytest.raises(MetricError, match="dimensions differ"):
        precision_recall(good, good[:, :3])
    with pytest.raises(MetricError, match="floating"):
        precision_recall(good, good.astype(np.int64))
    with pytest.raises(MetricError, match="at least 2"):
        feature_statistics(good[:1])
