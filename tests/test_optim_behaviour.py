"""Contracts of Lamb and Lars beyond the math: no host sync in step, gradients left alone, zero norms, trust
statistics, param groups, and clear errors for bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from optim_registry import NAMED, PRECISIONS
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from legw_hf import Lamb, Lars, SettingError, decay_param_groups, decay_parameter_names


def problem(dtype: torch.dtype = torch.float32) -> list[dict]:
    torch.manual_seed(0)
    shapes = [(6, 5), (5,), (1,), (3, 2, 2)]
    params = [nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]
    return [
        {"params": params[:3], "weight_decay": 0.01, "param_names": ["w", "b", "s"]},
        {"params": params[3:], "weight_decay": 0.0, "param_names": ["k"]},
    ]


def set_grads(groups: list[dict], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


BEHAVIOUR = (
    "lamb",
    "lamb-single",
    "lamb-foreach",
    "lamb-fused-adam",
    "lamb-nvidia",
    "lamb-deepspeed",
    "lamb-paper-l2",
    "lamb-optax-single",
    "lars",
    "lars-larc",
    "lars-optax-single",
    "lars-no-momentum",
)
#: the configurations these tests run (tests/optim_registry.py): every path, presets, tensor LRs
CONFIGS = {name: NAMED[name].build for name in BEHAVIOUR}


class HostSyncDetector(TorchDispatchMode):
    """Fails on any op that copies a device value into a Python number."""

    SYNCING = frozenset(
        {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default}
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"host sync inside step: {func}")
        return func(*args, **(kwargs or {}))


def forbid_python_reads(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a tensor value was read into Python inside step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)


@pytest.mark.parametrize("dtype,master", PRECISIONS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_never_syncs_with_the_host(name, dtype, master, monkeypatch):
    if name == "lamb-fused-adam" and dtype != torch.float32:  # fp32 tensors only: refused before any step
        with pytest.raises(SettingError, match="^impl 'fused_adam' needs"):
            CONFIGS[name](problem(dtype), master_weights=master)
        return
    groups = problem(dtype)
    optimizer = CONFIGS[name](groups, master_weights=master)
    groups[1]["params"][0].grad = None  # a parameter without gradient takes the scatter path of the stats
    for seed in range(3):
        set_grads(groups[:1], seed)
        with monkeypatch.context() as patch:
            forbid_python_reads(patch)
            with HostSyncDetector():
                optimizer.step()
    assert optimizer.trust_stats.shape == (4, 3)


def test_the_sync_detectors_catch_a_sync(monkeypatch):
    value = torch.ones(2).sum()
    with pytest.raises(AssertionError, match="host sync"), HostSyncDetector():
        value.item()
    with pytest.raises(AssertionError, match="host sync"), HostSyncDetector():
        bool(value > 0)
    with monkeypatch.context() as patch:
        forbid_python_reads(patch)
        with pytest.raises(AssertionError, match="read into Python"):
            float(value)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_leaves_gradients_untouched(name):
    groups = problem()
    optimizer = CONFIGS[name](groups)
    for seed in range(3):
        set_grads(groups, seed)
        params = [p for group in groups for p in group["params"]]
        grads = [p.grad for p in params]
        copies = [g.clone() for g in grads]
        optimizer.step()
        assert all(p.grad is g for p, g in zip(params, grads, strict=True))
        assert all(torch.equal(g, c) for g, c in zip(grads, copies, strict=True))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_norms_give_ratio_one_and_no_nan(name):
    zero_param = nn.Parameter(torch.zeros(4, 3))
    zero_grad_param = nn.Parameter(torch.randn(5))
    normal = nn.Parameter(torch.randn(3, 3))
    optimizer = CONFIGS[name]([{"params": [zero_param, normal]}, {"params": [zero_grad_param], "weight_decay": 0.0}])
    zero_param.grad, zero_grad_param.grad, normal.grad = torch.randn(4, 3), torch.zeros(5), torch.randn(3, 3)
    before = zero_grad_param.detach().clone()
    optimizer.step()
    stats = optimizer.trust_stats
    assert torch.isfinite(stats).all()
    assert stats[0, 0] == 0 and stats[0, 2] == 1  # ‖p‖ = 0
    assert stats[2, 1] == 0 and stats[2, 2] == 1  # ‖u‖ = 0 (no gradient, no decay)
    assert torch.equal(zero_grad_param, before)
    assert all(torch.isfinite(p).all() for p in (zero_param, zero_grad_param, normal))


def test_a_clamp_never_touches_the_zero_norm_fallback():
    zero = nn.Parameter(torch.zeros(3))
    optimizer = Lamb([zero], lr=1e-2, trust_clamp=(0.01, 0.3))
    zero.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.trust_stats[0, 2].item() == 1.0  # as DeepSpeed's kernel: 1, not clamped to 0.3


def test_trust_stats_and_summary():
    groups = problem()
    optimizer = Lamb(groups, lr=1e-2, adapt="decayed")
    assert optimizer.trust_stats is None and optimizer.trust_summary() == {}
    set_grads(groups, 0)
    groups[0]["params"][1].grad = None
    norms_before = [p.detach().norm().item() for group in groups for p in group["params"]]
    optimizer.step()
    stats = optimizer.trust_stats
    assert stats.shape == (4, 3) and stats.dtype == torch.float32
    assert torch.isnan(stats[1]).all() and torch.isfinite(stats[[0, 2, 3]]).all()
    for row in (0, 2, 3):
        assert stats[row, 0].item() == pytest.approx(norms_before[row], rel=1e-6)
    for row in (0, 2):
        assert stats[row, 2].item() == pytest.approx((stats[row, 0] / stats[row, 1]).item(), rel=1e-6)
    assert stats[3, 2] == 1  # group without decay is not adapted under adapt="decayed"

    summary = optimizer.trust_summary()
    adapted = sorted([stats[0, 2].item(), stats[2, 2].item()])
    assert summary == pytest.approx(
        {"trust_ratio/min": adapted[0], "trust_ratio/max": adapted[1], "trust_ratio/median": sum(adapted) / 2}
    )
    detailed = optimizer.trust_summary(per_parameter=True)
    assert detailed["trust_ratio/w"] == pytest.approx(stats[0, 2].item())
    assert detailed["param_norm/k"] == pytest.approx(stats[3, 0].item())
    assert "trust_ratio/b" not in detailed  # no gradient this step
    assert optimizer.parameter_names() == ["w", "b", "s", "k"]


def test_a_loaded_state_dict_s_groups_decide_what_the_trust_summary_counts():
    """torch's ``load_state_dict`` puts new group dicts in place (accelerate's ``prepare`` calls it, before FSDP2 swaps
    in the DTensors): the optimizer follows them, here the loaded ``layer_adaptation`` of the no-decay group."""
    decayed, plain = nn.Parameter(torch.ones(3)), nn.Parameter(torch.full((2,), 2.0))
    optimizer = Lamb(
        [{"params": [decayed]}, {"params": [plain], "weight_decay": 0.0}], lr=0.1, weight_decay=0.01, adapt="decayed"
    )
    state = optimizer.state_dict()
    state["param_groups"][1]["layer_adaptation"] = True
    optimizer.load_state_dict(state)
    decayed.grad, plain.grad = torch.ones(3), torch.ones(2)
    optimizer.step()
    # first step: Adam's update is 1 per element (+ 0.01 p with decay); ratio ||p|| / ||update||
    summary = optimizer.trust_summary()
    assert summary["trust_ratio/min"] == pytest.approx(1 / 1.01, rel=1e-5)
    assert summary["trust_ratio/max"] == pytest.approx(2.0, rel=1e-5)


def test_unnamed_groups_get_positional_names():
    optimizer = Lars([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))], lr=0.1)
    assert optimizer.parameter_names() == ["group0.0", "group0.1"]


# ------------------------------------------------------------------------------------------------ groups
class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.final_norm = nn.Module()
        self.final_norm.weight = nn.Parameter(torch.ones(4))  # an RMSNorm-like weight, caught by name
        self.scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_decay_names_match_transformers_trainer():
    from transformers import BertConfig, BertForMaskedLM, Trainer

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    for model in (BertForMaskedLM(config), TinyBlock()):
        assert decay_parameter_names(model) == Trainer.get_decay_parameter_names(None, model)


def test_decay_param_groups_split_like_trainer_and_carry_names():
    model = TinyBlock()
    decay, rest = decay_param_groups(model, 0.05)
    assert decay["param_names"] == ["scale", "proj.weight"]  # named_parameters order
    assert rest["param_names"] == ["proj.bias", "norm.weight", "norm.bias", "final_norm.weight"]
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.05, 0.0)
    assert "layer_adaptation" not in rest
    named = dict(model.named_parameters())
    assert all(
        p is named[n] for group in (decay, rest) for p, n in zip(group["params"], group["param_names"], strict=True)
    )
    _, rest = decay_param_groups(model, 0.05, adapt_no_decay=False)
    optimizer = Lamb(decay_param_groups(model, 0.05, adapt_no_decay=False), lr=1e-3)
    assert rest["layer_adaptation"] is False
    assert [optimizer.is_adapted(group) for group in optimizer.param_groups] == [True, False]


# ------------------------------------------------------------------------------------------------ bad input
def params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(3, dtype=dtype))]


LAMB_ERRORS = [
    ({"lr": -1.0}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"lr": math.inf}, "lr"),
    ({"lr": torch.tensor(-0.1)}, "lr"),
    ({"lr": torch.tensor([0.1, 0.2])}, "lr"),
    ({"eps": -1e-8}, "eps"),
    ({"eps": math.nan}, "eps"),
    ({"weight_decay": -0.01}, "weight_decay"),
    ({"weight_decay": math.inf}, "weight_decay"),
    ({"betas": (1.0, 0.999)}, "betas[0]"),
    ({"betas": (0.9, -0.1)}, "betas[1]"),
    ({"betas": 0.9}, "betas"),
    ({"preset": "apex"}, "preset"),
    ({"trust_clamp": (2.0, 1.0)}, "trust_clamp"),
    ({"trust_clamp": (-1.0, 1.0)}, "trust_clamp"),
    ({"trust_clamp": 3.0}, "trust_clamp"),
    ({"bias_correction": True}, "bias_correction"),
    ({"bias_correction": "after"}, "bias_correction"),
    ({"adapt": "some"}, "adapt"),
    ({"weight_decay_mode": "adamw"}, "weight_decay_mode"),
    ({"eps_inside_sqrt": 1}, "eps_inside_sqrt"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"preset": "deepspeed", "max_grad_norm": 1.0}, "max_grad_norm"),
    ({"impl": "cuda"}, "impl"),
    ({"impl": True}, "impl"),
    ({"impl": "foreach", "foreach": True}, "impl"),
    ({"impl": "cpu", "fused": "cpu"}, "impl"),
    ({"impl": "fused_adam", "preset": "deepspeed"}, "impl"),
    ({"impl": "fused_adam", "weight_decay_mode": "l2"}, "impl"),
    ({"impl": "fused_adam", "master_weights": True, "dtype": torch.bfloat16}, "impl"),
    ({"impl": "cpu", "master_weights": True, "dtype": torch.bfloat16}, "impl"),
    ({"impl": "cpu", "dtype": torch.bfloat16}, "impl"),
    # the deprecated spellings' own contradictions
    ({"fused_adam": True, "foreach": False}, "fused_adam"),
    ({"fused": True, "foreach": False}, "fused"),
    ({"fused_adam": True, "fused": "cpu"}, "fused_adam"),
    ({"fused": 1}, "fused"),
    ({"foreach": "yes"}, "foreach"),
    ({"master_weights": None}, "master_weights"),
]

LARS_ERRORS = [
    ({"lr": -0.1}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.5}, "momentum"),
    ({"momentum": 0.0, "nesterov": True}, "nesterov"),
    ({"trust_coefficient": 0.0}, "trust_coefficient"),
    ({"trust_coefficient": math.inf}, "trust_coefficient"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"trust_denominator": "grad"}, "trust_denominator"),
    ({"local_lr_clip": "yes"}, "local_lr_clip"),
    ({"preset": "lamb"}, "preset"),
    ({"adapt": None}, "adapt"),
    ({"impl": "fused_adam"}, "impl"),
    ({"impl": "foreach", "foreach": True}, "impl"),
    ({"fused": "triton", "foreach": False}, "fused"),
]


@pytest.mark.parametrize("kwargs,field", LAMB_ERRORS, ids=lambda x: str(x))
def test_lamb_refuses_bad_settings_naming_the_argument(kwargs, field):
    kwargs = dict(kwargs)
    tensors = params(kwargs.pop("dtype", torch.float32))
    with pytest.raises(SettingError) as error:
        Lamb(tensors, **kwargs)
    assert error.value.field == field and field in str(error.value)


@pytest.mark.parametrize("kwargs,field", LARS_ERRORS, ids=lambda x: str(x))
def test_lars_refuses_bad_settings_naming_the_argument(kwargs, field):
    with pytest.raises(SettingError) as error:
        Lars(params(), **{"lr": 0.1, **kwargs})
    assert error.value.field == field and field in str(error.value)


def test_bad_group_overrides_are_refused():
    with pytest.raises(SettingError, match="lr"):
        Lamb([{"params": params(), "lr": -1.0}])
    with pytest.raises(SettingError, match="layer_adaptation"):
        Lars([{"params": params(), "layer_adaptation": "no"}], lr=0.1)
    optimizer = Lamb(params())
    with pytest.raises(SettingError, match="betas"):
        optimizer.add_param_group({"params": params(), "betas": (0.9, 1.5)})
    with pytest.raises(SettingError, match="weight_decay"):
        decay_param_groups(TinyBlock(), -0.1)


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_complex_and_sparse_are_refused(optimizer_class):
    with pytest.raises(SettingError, match="complex"):
        optimizer_class([nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=0.1)
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = optimizer_class(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(SettingError, match="sparse"):
        optimizer.step()


def test_explicit_keywords_override_the_preset():
    optimizer = Lamb(params(), preset="deepspeed", eps=1e-6, trust_clamp=None)
    group = optimizer.param_groups[0]
    assert group["eps"] == 1e-6 and group["trust_clamp"] is None and group["bias_correction"] == "step_size"
    nvidia_off = Lamb(params(), preset="nvidia", max_grad_norm=None)
    assert nvidia_off.max_grad_norm is None and nvidia_off.param_groups[0]["adapt"] == "decayed"
    lars = Lars(params(), lr=0.1, preset="larc", local_lr_clip=False, trust_coefficient=0.001)
    assert lars.param_groups[0]["local_lr_clip"] is False and lars.param_groups[0]["trust_coefficient"] == 0.001


def test_dtensor_parameters_step_like_plain_ones_and_odd_placements_are_refused():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        values, grad = torch.randn(4, 3), torch.randn(4, 3)
        for cls, kwargs in ((Lamb, {"weight_decay": 0.01}), (Lars, {"momentum": 0.9, "weight_decay": 0.01})):
            plain = nn.Parameter(values.clone())
            plain.grad = grad.clone()
            sharded = nn.Parameter(distribute_tensor(values.clone(), mesh, [Shard(0)]))
            sharded.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
            for param in (plain, sharded):
                optimizer = cls([param], lr=0.1, **kwargs)
                optimizer.step()
                optimizer.step()
            torch.testing.assert_close(sharded.full_tensor(), plain.detach(), rtol=1e-6, atol=1e-7)
        grid = init_device_mesh("cpu", (1, 1))
        twice = nn.Parameter(distribute_tensor(torch.randn(4, 3), grid, [Shard(0), Shard(1)]))
        with pytest.raises(SettingError, match="sharded over exactly one mesh dimension"):
            Lamb([twice])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_a_tensor_swapped_in_behind_the_optimizers_back_is_refused_before_any_update(cls):
    # what DeepSpeed ZeRO does: param_groups[...]["params"] replaced by a flat buffer, no add_param_group
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    optimizer = cls(model.parameters(), lr=0.1)
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    flat.grad = torch.ones_like(flat)
    optimizer.param_groups[0]["params"] = [flat]
    before = flat.detach().clone()
    with pytest.raises(SettingError, match="found an unknown tensor of shape"):
        optimizer.step()
    assert torch.equal(flat, before) and not optimizer.state


def test_optimizers_by_name_take_their_own_keywords_only():
    from legw_hf.optim.choice import check_optimizer, optimizer_class_and_keywords

    cls, kwargs = optimizer_class_and_keywords("lamb", 1e-3, preset="nvidia", max_grad_norm=0, betas=[0.9, 0.98])
    assert cls is Lamb and kwargs == {"lr": 1e-3, "preset": "nvidia", "max_grad_norm": None, "betas": (0.9, 0.98)}
    assert optimizer_class_and_keywords("sgd", 0.1)[1] == {"lr": 0.1, "momentum": 0.9}
    with pytest.raises(SettingError, match="^trust_clamp is not an option of optimizer 'lars'"):
        optimizer_class_and_keywords("lars", 0.1, trust_clamp=(0.0, 1.0))
    with pytest.raises(SettingError, match="^optimizer must be one of"):
        optimizer_class_and_keywords("adafactor", 0.1)
    with pytest.raises(SettingError) as caught:
        check_optimizer("lars", 0.1, trust_coefficient=0.0)
    assert caught.value.field == "trust_coefficient"
    assert check_optimizer("lamb", 1e-3, preset="nvidia").max_grad_norm == 1.0
