"""gradguard.distributed in one process: names under wrappers, placements, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

import gradguard as gg
import gradguard.distributed as ggd


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def test_clean_name_removes_checkpoint_and_compile_wrappers_at_any_depth():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = [n for n, _ in _net().named_parameters()]
    net = _net()
    net[0] = checkpoint_wrapper(net[0])  # torchtitan: activation checkpointing per block
    net[2] = torch.compile(net[2])  # torchtitan: torch.compile per block
    wrapped = torch.compile(net)
    names = [n for n, _ in wrapped.named_parameters()]
    assert names[0] == "_orig_mod.0._checkpoint_wrapped_module.weight"
    assert [ggd.clean_name(n) for n in names] == plain


def test_clean_name_keeps_user_names_that_only_contain_a_wrapper_word():
    assert ggd.clean_name("my_orig_mod.weight") == "my_orig_mod.weight"
    assert ggd.clean_name("module.layers.0.weight") == "module.layers.0.weight"


def test_unwrap_returns_the_users_module_under_compile_and_dataparallel():
    net = _net()
    assert ggd.unwrap(torch.compile(nn.DataParallel(net))) is net
    assert ggd.unwrap(net) is net


def test_telemetry_layers_from_clean_names_equal_the_plain_models():
    net = _net()
    compiled = torch.compile(net)
    named = [(ggd.clean_name(n), p) for n, p in compiled.named_parameters()]
    tel = gg.Telemetry(named, every=2)
    assert tel.layers == ["0", "2"]


class FakeMesh:
    """The two things shard_count reads from a DeviceMesh."""

    def __init__(self, sizes: tuple[int, ...], names: tuple[str, ...]) -> None:
        self.sizes, self.mesh_dim_names = sizes, names

    def size(self, dim: int | None = None) -> int:
        return self.sizes[dim] if dim is not None else int(torch.tensor(self.sizes).prod())

    def __repr__(self) -> str:
        return f"FakeMesh({self.mesh_dim_names})"


class FakeDTensor:
    def __init__(self, *placements: object) -> None:
        self.device_mesh = FakeMesh((2, 3), ("dp", "tp"))
        self.placements = placements


@pytest.mark.parametrize(
    ("placements", "shards"),
    [
        ((_StridedShard(0, split_factor=3), Shard(0)), 6),  # FSDP over a colwise TP weight
        ((Shard(0), Shard(1)), 6),  # FSDP over a rowwise TP weight
        ((Shard(0), Replicate()), 2),  # rowwise bias: replicated over tp
        ((Replicate(), Shard(0)), 3),  # HSDP
        ((Replicate(), Replicate()), 1),
    ],
)
def test_shard_count_multiplies_the_sharding_dims_only(placements, shards):
    assert ggd.shard_count(FakeDTensor(*placements)) == shards


def test_shard_count_refuses_partial_naming_the_dim_and_the_fix():
    with pytest.raises(TypeError) as e:
        ggd.shard_count(FakeDTensor(Shard(0), Partial()), "parameter 3")
    msg = str(e.value)
    assert msg.startswith("parameter 3: placement Partial(sum) on mesh dimension 'tp'")
    assert "Shard, _StridedShard or Replicate" in msg
    assert "reduce_partial_grads_" in msg


def test_reduce_partial_grads_is_a_noop_on_plain_gradients():
    net = _net()
    net(torch.ones(2, 3)).sum().backward()
    before = [p.grad.clone() for p in net.parameters()]
    assert ggd.reduce_partial_grads_(net.parameters()) == 0
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))


def test_pipeline_group_without_a_process_group_is_refused():
    net = _net()
    with pytest.raises(ValueError, match=r"pipeline_group=.*not initialised"):
        gg.Telemetry(list(net.named_parameters()), pipeline_group=object())


@pytest.mark.parametrize("kept", [5, 6], ids=["before_the_loss_given_column",
                                               "before_the_dying_units_columns"])
def test_telemetry_resumes_a_ring_buffer_of_an_older_layout(kept):
    """Checkpoints of the 5-column (no loss-given flag) and 6-column (no dying-units share)
    layouts resume: the missing columns come back as a loss given and no unit sample."""
    net = _net()
    tel = gg.Telemetry(list(net.named_parameters()), every=3)
    net(torch.ones(2, 3)).sum().backward()
    tel.record(tel.measure(), loss=0.5, clip_coef=None, skipped=None)
    sd = tel.state_dict()
    buf = sd["buf"]
    sd["buf"] = torch.cat([buf[:, :kept], buf[:, 8:]], dim=1)  # the old layout
    fresh = gg.Telemetry(list(net.named_parameters()), every=3)
    fresh.load_state_dict(sd)
    assert torch.allclose(fresh.pending_rows(), tel.pending_rows(), equal_nan=True)
    assert fresh.pending_rows()[0, 6:8].isnan().all()  # no unit sample on the old row
