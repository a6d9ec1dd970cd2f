"""Timestep samplers for training: uniform, and the loss-aware sampler of Improved DDPM (section 3.3)."""
from __future__ import annotations

from typing import Callable

import numpy as np
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
    `history` of them; mixed with `uniform_prob` of the uniform distribution so that no p_t is ever 0.

    The bookkeeping is small host-side work, kept in numpy (no intra-op thread pool, microsecond-scale calls), in a
    ring buffer per t so that an update touches only the slots it writes."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if not (isinstance(history, int) and history >= 1) or not 0 < uniform_prob <= 1:
            raise ValueError(f"need history >= 1 and 0 < uniform_prob <= 1, got {history!r}, {uniform_prob!r}")
        self.history, self.uniform_prob = history, uniform_prob
        # per t a ring buffer of the last `history` losses; the next write goes to slot loss_pos[t]
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)
        self.loss_pos = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def weights(self) -> torch.Tensor:
        T = self.num_timesteps
        if not self.warmed_up():
            return torch.ones(T, dtype=torch.float64)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=1))  # order within the ring does not matter here
        w = w / w.sum() if w.sum() > 0 else np.full(T, 1.0 / T)
        return torch.from_numpy(w * (1 - self.uniform_prob) + self.uniform_prob / T)

    def update_with_all_losses(self, ts: torch.Tensor, losses: torch.Tensor) -> None:
        """Vectorized equivalent of appending each (t, loss) in order to a per-t queue of length `history`."""
        T, H = self.num_timesteps, self.history
        ts = np.asarray(torch.as_tensor(ts).detach().cpu(), dtype=np.int64).ravel()
        losses = np.asarray(torch.as_tensor(losses).detach().cpu(), dtype=np.float64).ravel()
        if ts.shape != losses.shape:
            raise ValueError(f"shape mismatch: ts {ts.shape} vs losses {losses.shape}")
        if ts.size == 0:
            return
        if ts.min() < 0 or ts.max() >= T:
            raise ValueError(f"t out of range: timesteps must lie in [0, {T - 1}], got min {ts.min()}, max {ts.max()}")
        k = np.bincount(ts, minlength=T)  # new losses per t
        order = np.argsort(ts, kind="stable")
        rank = np.empty_like(ts)
        rank[order] = np.arange(ts.size) - (np.cumsum(k) - k)[ts[order]]  # occurrence index within its t
        keep = rank >= k[ts] - H  # only the last H losses of a t in this batch can survive
        t_keep = ts[keep]
        self.loss_history[t_keep, (self.loss_pos[t_keep] + rank[keep]) % H] = losses[keep]
        self.loss_pos = (self.loss_pos + k) % H
        self.loss_counts = np.minimum(self.loss_counts + k, H)

    def ordered_history(self) -> np.ndarray:
        """[T, history] losses per t, oldest first (entries past loss_counts[t] are 0)."""
        H = self.history
        idx = (self.loss_pos - self.loss_counts)[:, None] + np.arange(H)[None, :]
        out = np.take_along_axis(self.loss_history, idx % H, axis=1)
        return np.where(np.arange(H)[None, :] < self.loss_counts[:, None], out, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The ring buffers as they are (loss_history [T, H] float64, loss_counts [T], loss_pos [T] int64), so a
        restored sampler computes bit-identical probabilities; ordered_history() gives them oldest first."""
        return {"loss_history": torch.from_numpy(self.loss_history.copy()),
                "loss_counts": torch.from_numpy(self.loss_counts.copy()),
                "loss_pos": torch.from_numpy(self.loss_pos.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore state_dict(); without loss_pos the history is taken as oldest first."""
        T, H = self.num_timesteps, self.history
        hist, counts = state.get("loss_history"), state.get("loss_counts")
        if hist is None or counts is None:
            raise ValueError(f"sampler state needs loss_history and loss_counts, got keys {sorted(state)}")
        pos = state.get("loss_pos", counts)
        if tuple(hist.shape) != (T, H) or tuple(counts.shape) != (T,) or tuple(pos.shape) != (T,):
            raise ValueError(f"sampler state shape mismatch: loss_history {tuple(hist.shape)}, loss_counts "
                             f"{tuple(counts.shape)}, loss_pos {tuple(pos.shape)}; expected ({T}, {H}), ({T},), ({T},)")
        counts = torch.as_tensor(counts).detach().cpu().numpy().astype(np.int64)
        if counts.min() < 0 or counts.max() > H:
            raise ValueError(f"sampler state loss_counts must lie in [0, {H}]")
        self.loss_history = torch.as_tensor(hist).detach().cpu().numpy().astype(np.float64)  # astype copies
        self.loss_counts = counts
        self.loss_pos = torch.as_tensor(pos).detach().cpu().numpy().astype(np.int64) % H


def create_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    """"uniform" or "loss-second-moment" over num_timesteps (T of the diffusion being trained)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
