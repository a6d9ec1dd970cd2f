"""Named training metrics: summed per sample on each rank, reduced over ranks with ONE all-gather at log time.

Per-sample values `[B]` are accumulated as (sum, count) pairs; NaN entries are not counted (an objective marks
"this sample does not belong to this metric" with NaN, e.g. a timestep quartile). Per-rank values (images/s,
bad samples, peak memory) ride in the same gather and are summed, maxed or listed per rank.
"""
from __future__ import annotations

import torch

from trainer.sync import AllGather


class MetricSums:
    """Running (sum, count) of named per-sample metrics on one rank. Every rank must see the same names."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums = torch.zeros(0, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = list(metrics)
            self.sums = torch.zeros(len(self.names), dtype=torch.float64)
            self.counts = torch.zeros(len(self.names), dtype=torch.float64)
        if list(metrics) != self.names:
            raise ValueError(f"an objective must return the same metric names every step: {self.names} vs "
                             f"{list(metrics)}")
        v = torch.stack([m.detach().double().flatten().cpu() for m in metrics.values()])  # [names, B]
        seen = ~torch.isnan(v)
        self.sums += torch.where(seen, v, torch.zeros_like(v)).sum(1)
        self.counts += seen.sum(1)

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()


def reduce_metrics(sums: MetricSums, per_rank: dict[str, float], all_gather: AllGather, world: int
                   ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Collective (every rank calls it): -> (means of the metrics over every sample of every rank, one entry per
    name that was seen; per-rank values by name, `world` floats each, in rank order)."""
    n = len(sums.names)
    mine = torch.cat([sums.sums, sums.counts, torch.tensor(list(per_rank.values()), dtype=torch.float64)])
    allv = all_gather(mine.reshape(1, -1), same_size=True).reshape(world, -1)
    tot_s, tot_c = allv[:, :n].sum(0), allv[:, n:2 * n].sum(0)
    means = {k: float(tot_s[i] / tot_c[i]) for i, k in enumerate(sums.names) if tot_c[i] > 0}
    ranks = {k: allv[:, 2 * n + j].tolist() for j, k in enumerate(per_rank)}
    return means, ranks
