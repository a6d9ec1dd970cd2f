"""Sample-quality metrics on feature arrays: FID / sFID, Inception Score, precision / recall.

All functions take plain arrays (numpy or torch) and know nothing about images or networks.

- Frechet distance (Heusel et al. 2017) between Gaussians N(mu1, S1), N(mu2, S2):
      |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
  tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
  S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which avoids the complex-valued sqrtm of a non-symmetric product.
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over equal splits.
- Precision / recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around its points with
  radius = distance to the point's k-th nearest neighbour in the same set (the point itself excluded). Precision is
  the fraction of samples inside the reference manifold; recall the fraction of references inside the sample
  manifold. Distances are computed in row blocks so memory stays bounded (O(block * N), never N x N).
"""
from __future__ import annotations

import numpy as np
import torch

from data.cli import UsageError

__all__ = ["MetricError", "check_features", "feature_statistics", "frechet_distance", "inception_score",
           "knn_radii", "precision_recall"]


class MetricError(UsageError, ValueError):
    """Bad input to a metric (wrong shape, NaN, too few samples): a `data.cli.UsageError` (one line, exit code 2
    in the CLIs) and, for callers that expect it, a ValueError."""


def check_features(x, name: str, min_rows: int = 1) -> np.ndarray | torch.Tensor:
    """Check a feature array [N, D]: 2-D, floating, finite, at least `min_rows` rows. Returns it unchanged."""
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise MetricError(f"{name}: expected an array of features [N, D], got {type(x).__name__}")
    if x.ndim != 2:
        raise MetricError(f"{name}: expected features of shape [N, D], got shape {tuple(x.shape)}")
    floating = x.dtype.is_floating_point if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)
    if not floating:
        raise MetricError(f"{name}: expected floating-point features, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise MetricError(f"{name}: need at least {min_rows} feature rows, got {x.shape[0]}")
    finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not finite:
        raise MetricError(f"{name}: features contain NaN or Inf (a diverged model or a broken extractor?)")
    return x


def feature_statistics(features: np.ndarray, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    f = np.asarray(check_features(features, name, min_rows=2), dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricError(f"{name}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricError(f"{name}: statistics contain NaN or Inf")
    return mu, sigma


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D]; float64 throughout."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise MetricError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (different extractors?)")
    s1 = _sqrt_psd(sigma1)
    m = s1 @ sigma2 @ s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits [N, C] (softmax applied here): (mean, std) over `splits` equal parts.

    Computed in float64 with log-softmax, so confident predictions do not produce log(0).
    """
    check_features(logits, "logits", min_rows=splits)
    lp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = []
    for part in torch.tensor_split(lp, splits, dim=0):
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])       # log of the marginal p(y) [C]
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _as_tensor(x, device, dtype) -> torch.Tensor:
    return torch.as_tensor(x).to(device=device, dtype=dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] from precomputed squared norms (clamped at 0)."""
    return (a2[:, None] - 2 * (a @ b.T) + b2[None, :]).clamp_(min=0)


def knn_radii(x, k: int = 3, block: int = 1024, device=None, dtype=torch.float32) -> torch.Tensor:
    """Squared distance of each row of x [N, D] to its k-th nearest other row -> [N] (on `device`).

    Blocks of `block` rows against all N rows: peak extra memory is block * N * itemsize.
    """
    check_features(x, "features", min_rows=k + 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = _as_tensor(x, device, dtype)
    x2 = (x * x).sum(1)
    out = torch.empty(x.shape[0], device=device, dtype=dtype)
    for i in range(0, x.shape[0], block):
        d = _sq_dists(x[i:i + block], x, x2[i:i + block], x2)
        # The k+1 smallest include the point itself at distance 0; the largest of them is the k-th neighbour.
        out[i:i + block] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return out


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each query row: is it within radii[j] of some support row j?  -> bool [len(queries)]."""
    q2, s2 = (queries * queries).sum(1), (support * support).sum(1)
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for i in range(0, queries.shape[0], block):
        for j in range(0, support.shape[0], block * 4):
            d = _sq_dists(queries[i:i + block], support[j:j + block * 4], q2[i:i + block], s2[j:j + block * 4])
            inside[i:i + block] |= (d <= radii[None, j:j + block * 4]).any(dim=1)
            if bool(inside[i:i + block].all()):
                break                               # every query of this block is covered already
    return inside


def precision_recall(reference, samples, k: int = 3, block: int = 1024, device=None,
                     dtype=torch.float32) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of samples [M, D] against reference [N, D].

    A point is covered when its distance to some point of the other set is <= that point's k-NN radius
    (the original code's `<=`; ties have probability zero for continuous features). GPU when available.
    """
    check_features(reference, "reference features", min_rows=k + 1)
    check_features(samples, "sample features", min_rows=k + 1)
    if reference.shape[1] != samples.shape[1]:
        raise MetricError(f"feature dimensions differ: {reference.shape[1]} vs {samples.shape[1]}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref, smp = _as_tensor(reference, device, dtype), _as_tensor(samples, device, dtype)
    ref_r = knn_radii(ref, k, block, device, dtype)
    smp_r = knn_radii(smp, k, block, device, dtype)
    precision = _coverage(smp, ref, ref_r, block).double().mean().item()
    recall = _coverage(ref, smp, smp_r, block).double().mean().item()
    return precision, recall
