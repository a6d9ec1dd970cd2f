"""trainer.networks without processes: what an objective may declare, checkpoint names, frozen files, and a frozen
network's function (cast to the run's precision, fp32 out)."""
from __future__ import annotations

import pytest
import torch

from data.cli import UsageError
from trainer.networks import (CastNet, Network, check_networks, deepspeed_dir, frozen, frozen_mismatch,
                              frozen_record, prepare_frozen, weights_file)


def lin() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def test_checkpoint_names_keep_the_one_network_layout() -> None:
    assert (weights_file("model"), weights_file("model", "0.9999"), deepspeed_dir("model")) == \
        ("model.safetensors", "ema_0.9999.safetensors", "ds")
    assert (weights_file("generator"), weights_file("generator", "0.999"), deepspeed_dir("generator")) == \
        ("generator.safetensors", "generator.ema_0.999.safetensors", "ds_generator")


@pytest.mark.parametrize("nets, error", [
    ({}, "non-empty dict"),
    ({"Gen": Network(lin())}, "network name 'Gen'"),
    ({"rng": Network(lin())}, "network name 'rng'"),
    ({"model": lin()}, "expected a trainer.networks.Network"),
    ({"teacher": frozen(lin(), None)}, "every network is frozen"),
    ({"model": Network(lin()), "teacher": Network(lin(), frozen=True)}, "frozen network 'teacher' has no EMA"),
])
def test_a_bad_declaration_is_a_type_error_naming_it(nets, error) -> None:
    with pytest.raises(TypeError, match=error):
        check_networks(nets, 0)


def test_zero3_is_refused_in_one_line_only_where_a_trained_network_needs_double_backward() -> None:
    nets = {"g": Network(lin()), "d": Network(lin(), double_backward=True)}
    for stage in (0, 1, 2):
        check_networks(nets, stage)
    with pytest.raises(UsageError, match="network 'd' is trained with a gradient penalty.*--zero-stage 0, 1 or 2"):
        check_networks(nets, 3)
    check_networks({"g": Network(lin()), "d": Network(lin(), double_backward=False)}, 3)


def test_frozen_files_are_recorded_and_a_changed_one_is_named(tmp_path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"teacher weights")
    nets = {"model": Network(lin()), "teacher": frozen(lin(), str(path)), "scratch": frozen(lin(), None)}
    rec = frozen_record(nets)
    assert list(rec) == ["teacher"] and rec["teacher"]["source"] == str(path)
    assert frozen_mismatch(rec, frozen_record(nets)) is None
    path.write_bytes(b"other weights")
    msg = frozen_mismatch(rec, frozen_record(nets))
    assert "frozen network 'teacher'" in msg and "not the file this run started with" in msg
    assert "was not part of this run" in frozen_mismatch({}, rec)
    assert "is no longer part of this run" in frozen_mismatch(rec, {})


def test_a_frozen_network_runs_in_the_runs_precision_without_gradients() -> None:
    n = frozen(lin(), None)
    fn = prepare_frozen(n, torch.device("cpu"), torch.bfloat16)
    assert isinstance(fn, CastNet) and not n.module.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in n.module.parameters())
    x = torch.randn(4, 3, requires_grad=True)
    out = fn(x)
    assert out.dtype == torch.float32 and out.shape == (4, 2)
    out.sum().backward()  # gradients flow to the input, none to the frozen weights
    assert x.grad is not None and all(p.grad is None for p in n.module.parameters())
