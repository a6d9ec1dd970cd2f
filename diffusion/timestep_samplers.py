"""Timestep samplers for training: uniform, and the loss-aware sampler of Improved DDPM (section 3.3)."""
from __future__ import annotations

from typing import Callable

import torch

SAMPLERS = ("uniform", "loss-second-moment")
AllGather = Callable[[torch.Tensor], torch.Tensor]


class TimestepSampler:
    """Draws t ~ p_t with importance weights 1 / (T p_t), so E_t[w_t L_t] = (1/T) sum_t L_t for any p."""

    def __init__(self, num_timesteps: int):
        if not (isinstance(num_timesteps, int) and num_timesteps >= 1):
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps

    def weights(self) -> torch.Tensor:
        """Unnormalised sampling weights [T] float64 (CPU)."""
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def probabilities(self) -> torch.Tensor:
        w = self.weights()
        return w / w.sum()

    def sample(self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [B] int64, weights [B] float32) on `device`; draws on the CPU (pass a CPU generator to reproduce)."""
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), w.to(device=device, dtype=torch.float32)

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor, all_gather: AllGather) -> None:
        """Sync with every rank: one all_gather of this rank's [B, 2] float64 (t, loss) rows, which must return
        [world*B, 2] in rank order (every rank needs the same B), then update_with_all_losses on the result."""
        rows = torch.stack([local_ts.detach().to(torch.float64).flatten(), local_losses.detach().to(torch.float64).flatten()], dim=1)
        gathered = all_gather(rows).to("cpu", torch.float64)
        if gathered.ndim != 2 or gathered.shape[1] != 2:
            raise ValueError(f"all_gather must return a [N, 2] tensor, got {tuple(gathered.shape)}")
        self.update_with_all_losses(gathered[:, 0].round().long(), gathered[:, 1])

    def update_with_all_losses(self, ts: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the losses of every rank (ts [N] int, losses [N], in rank order). No-op for the uniform sampler."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class UniformSampler(TimestepSampler):
    """p_t = 1/T, weights all 1."""


class LossSecondMomentResampler(TimestepSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last `history` losses seen at each t; uniform until every t has
    `history` of them; mixed with `uniform_prob` of the uniform distribution so that no p_t is ever 0."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if not (isinstance(history, int) and history >= 1) or not 0 < uniform_prob <= 1:
            raise ValueError(f"need history >= 1 and 0 < uniform_prob <= 1, got {history!r}, {uniform_prob!r}")
        self.history, self.uniform_prob = history, uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)  # oldest first
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def weights(self) -> torch.Tensor:
        T = self.num_timesteps
        if not self.warmed_up():
            return torch.ones(T, dtype=torch.float64)
        w = self.loss_history.square().mean(dim=1).sqrt()
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / T)
        return w * (1 - self.uniform_prob) + self.uniform_prob / T

    def update_with_all_losses(self, ts: torch.Tensor, losses: torch.Tensor) -> None:
        """Vectorized equivalent of appending each (t, loss) in order to a per-t queue of length `history`."""
        T, H = self.num_timesteps, self.history
        ts = ts.detach().to("cpu", torch.int64).flatten()
        losses = losses.detach().to("cpu", torch.float64).flatten()
        if ts.shape != losses.shape:
            raise ValueError(f"shape mismatch: ts {tuple(ts.shape)} vs losses {tuple(losses.shape)}")
        if ts.numel() == 0:
            return
        if bool(((ts < 0) | (ts >= T)).any()):
            raise ValueError(f"t out of range: timesteps must lie in [0, {T - 1}]")
        k = torch.bincount(ts, minlength=T)  # new losses per t
        order = torch.sort(ts, stable=True).indices
        starts = torch.cumsum(k, 0) - k
        rank = torch.empty_like(ts)
        rank[order] = torch.arange(len(ts)) - starts[ts[order]]  # occurrence index of each sample within its t
        n = self.loss_counts
        drop = (n + k - H).clamp(min=0)  # oldest entries pushed out of each queue
        # old entries move left by `drop`: new[t, j] = old[t, j + drop[t]] when j + drop[t] < n[t]
        src = torch.arange(H).unsqueeze(0) + drop.unsqueeze(1)
        keep_old = src < n.unsqueeze(1)
        new_hist = torch.where(keep_old, self.loss_history.gather(1, src.clamp(max=H - 1)), 0.0)
        dest = n[ts] + rank - drop[ts]  # the queue slot of each new loss; < 0 when a later one pushes it out
        ok = dest >= 0
        new_hist[ts[ok], dest[ok]] = losses[ok]
        self.loss_history = new_hist
        self.loss_counts = (n + k).clamp(max=H)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        hist, counts = state.get("loss_history"), state.get("loss_counts")
        if hist is None or counts is None:
            raise ValueError(f"sampler state needs loss_history and loss_counts, got keys {sorted(state)}")
        if tuple(hist.shape) != (self.num_timesteps, self.history) or tuple(counts.shape) != (self.num_timesteps,):
            raise ValueError(f"sampler state shape mismatch: loss_history {tuple(hist.shape)}, loss_counts "
                             f"{tuple(counts.shape)}; expected ({self.num_timesteps}, {self.history}) and "
                             f"({self.num_timesteps},)")
        self.loss_history = hist.detach().to("cpu", torch.float64).clone()
        self.loss_counts = counts.detach().to("cpu", torch.int64).clone()


def create_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    """"uniform" or "loss-second-moment" over num_timesteps (T of the diffusion being trained)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
