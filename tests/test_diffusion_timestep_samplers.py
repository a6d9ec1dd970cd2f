"""Timestep samplers: the vectorized loss-aware update against a plain per-sample loop, rank sync, state, bias."""
import math

import pytest
import torch

from diffusion.timestep_samplers import LossSecondMomentResampler, create_timestep_sampler

torch.set_num_threads(1)


class LoopReference:
    """The loss-aware sampler's bookkeeping written the obvious way, one sample at a time."""

    def __init__(self, T, H=10):
        self.hist, self.H = [[] for _ in range(T)], H

    def update(self, ts, losses):
        for t, l in zip(ts.tolist(), losses.tolist()):
            self.hist[t] = (self.hist[t] + [l])[-self.H:]


def test_vectorized_update_equals_per_sample_loop():
    T = 7
    s, ref = LossSecondMomentResampler(T), LoopReference(T)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        n = int(torch.randint(1, 30, (1,), generator=g))
        ts = torch.randint(0, T, (n,), generator=g) if step % 3 else torch.full((n,), step % T)  # many repeats
        losses = torch.rand(n, generator=g, dtype=torch.float64)
        s.update_with_all_losses(ts, losses)
        ref.update(ts, losses)
        ordered = s.ordered_history()
        for t in range(T):
            c = int(s.loss_counts[t])
            assert c == len(ref.hist[t])
            assert ordered[t, :c].tolist() == ref.hist[t] and (ordered[t, c:] == 0).all()
    assert s.warmed_up()


def test_weights_follow_the_papers_rule():
    T = 5
    s = LossSecondMomentResampler(T)
    s.update_with_all_losses(torch.arange(T).repeat(9), torch.ones(T * 9, dtype=torch.float64))
    assert not s.warmed_up() and torch.equal(s.weights(), torch.ones(T, dtype=torch.float64))
    losses = torch.arange(1, T + 1, dtype=torch.float64)
    s.update_with_all_losses(torch.arange(T).repeat(10), losses.repeat(10) * torch.tensor([1.0, -1.0]).repeat_interleave(25))
    p = losses / losses.sum() * 0.999 + 0.001 / T  # sqrt(E[L^2]) = |L|; mixed with 0.001 uniform
    torch.testing.assert_close(s.probabilities(), p)


def test_importance_weighted_loss_is_unbiased():
    T = 6
    s = LossSecondMomentResampler(T)
    L = torch.tensor([5.0, 1.0, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    s.update_with_all_losses(torch.arange(T).repeat(10), L.repeat(10))
    p = s.probabilities()
    assert (p.max() / p.min()) > 50  # far from uniform
    # exactly: sum_t p_t * 1/(T p_t) * L_t = mean_t L_t
    w = 1.0 / (T * p)
    assert (p * w * L).sum().item() == pytest.approx(L.mean().item(), rel=1e-12)
    # by sampling, with the weights the sampler hands out
    n = 200_000
    t, wt = s.sample(n, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and wt.dtype == torch.float32 and t.shape == wt.shape == (n,)
    est = wt.double() * L[t]
    assert abs(est.mean().item() - L.mean().item()) < 5 * est.std().item() / math.sqrt(n)
    counts = torch.bincount(t, minlength=T).double() / n
    assert torch.all((counts - p).abs() < 5 * torch.sqrt(p * (1 - p) / n))


def test_two_ranks_sync_through_all_gather_equals_one_sampler():
    T, B = 50, 16
    g = torch.Generator().manual_seed(1)
    ranks = [create_timestep_sampler("loss-second-moment", T) for _ in range(2)]
    single = create_timestep_sampler("loss-second-moment", T)
    for step in range(60):
        ts = [torch.randint(0, T, (B,), generator=g) for _ in range(2)]
        losses = [torch.rand(B, generator=g, dtype=torch.float32) for _ in range(2)]
        rows = [torch.stack([t.double(), l.double()], 1) for t, l in zip(ts, losses)]
        for r, s in enumerate(ranks):
            def all_gather(x, r=r):
                assert x.shape == (B, 2) and x.dtype == torch.float64
                torch.testing.assert_close(x, rows[r])  # each rank hands in only its own rows
                return torch.cat(rows)  # every rank's rows, in rank order
            s.update_with_local_losses(ts[r], losses[r], all_gather)
        single.update_with_all_losses(torch.cat(ts), torch.cat(losses))
    for s in ranks:
        for k, v in single.state_dict().items():
            assert torch.equal(s.state_dict()[k], v)
    assert single.warmed_up()
    a = ranks[0].sample(8, generator=torch.Generator().manual_seed(3))
    b = ranks[1].sample(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_state_dict_round_trip():
    T = 20
    s = create_timestep_sampler("loss-second-moment", T)
    s.update_with_all_losses(torch.arange(T).repeat(12), torch.rand(T * 12, dtype=torch.float64))
    state = s.state_dict()
    fresh = create_timestep_sampler("loss-second-moment", T)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert torch.equal(fresh.probabilities(), s.probabilities())
    assert torch.equal(fresh.sample(10, generator=torch.Generator().manual_seed(0))[0],
                       s.sample(10, generator=torch.Generator().manual_seed(0))[0])
    state["loss_history"][0, 0] = 123.0  # the state is a copy, not a view of the sampler
    assert s.state_dict()["loss_history"][0, 0] != 123.0
    fresh.update_with_all_losses(torch.arange(T), torch.arange(T, dtype=torch.float64))  # resumes identically
    s.update_with_all_losses(torch.arange(T), torch.arange(T, dtype=torch.float64))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in s.state_dict().items())
    oldest_first = {"loss_history": torch.from_numpy(s.ordered_history()), "loss_counts": state["loss_counts"]}
    again = create_timestep_sampler("loss-second-moment", T)
    again.load_state_dict(oldest_first)  # a state without ring positions, e.g. written by hand
    torch.testing.assert_close(again.probabilities(), s.probabilities(), rtol=1e-14, atol=0)
    assert (again.ordered_history() == s.ordered_history()).all()
    with pytest.raises(ValueError, match=r"sampler state shape mismatch.*expected \(21, 10\)"):
        create_timestep_sampler("loss-second-moment", T + 1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="needs loss_history and loss_counts"):
        fresh.load_state_dict({})


def test_uniform_sampler():
    s = create_timestep_sampler("uniform", 10)
    t, w = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert torch.all(w == 1) and t.min() == 0 and t.max() == 9
    s.update_with_all_losses(t, torch.ones(5000))  # accepted and ignored
    assert s.state_dict() == {}
    s.load_state_dict({})


def test_sampler_bad_inputs():
    with pytest.raises(ValueError, match="unknown timestep sampler 'importance'; allowed: uniform, loss-second-moment"):
        create_timestep_sampler("importance", 10)
    s = create_timestep_sampler("loss-second-moment", 10)
    with pytest.raises(ValueError, match=r"t out of range: timesteps must lie in \[0, 9\]"):
        s.update_with_all_losses(torch.tensor([10]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape mismatch: ts"):
        s.update_with_all_losses(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="all_gather must return a"):
        s.update_with_local_losses(torch.tensor([1]), torch.tensor([1.0]), lambda x: x.flatten())
