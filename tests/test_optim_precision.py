"""Mixed precision (GradScaler fp16, bf16 with and without fp32 masters) and state_dict round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from optim_registry import NAMED, PRECISIONS
from torch import nn

from legw_hf import Lamb

SEED = 0


def small_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 1)).to(dtype)


def batch(dtype: torch.dtype = torch.float32, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(64, 8, generator=generator)
    y = x[:, :1] * 0.7 - x[:, 1:2] * 0.4 + 0.1 * torch.randn(64, 1, generator=generator)
    return x.to(dtype), y.to(dtype)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    x, y = batch(dtype, step)
    return ((model(x).float() - y.float()) ** 2).mean()


#: the configurations these tests run (tests/optim_registry.py)
OPTIMIZERS = {name: NAMED[name].build for name in ("lamb", "lamb-nvidia", "lamb-deepspeed-single")}
OPTIMIZERS |= {name: NAMED[name].build for name in ("lars-larc-decay", "lars-optax-nesterov")}


# ------------------------------------------------------------------------------------------------ fp16 scaler
@pytest.mark.parametrize("name", ["lamb-nvidia", "lars-larc-decay"])
def test_grad_scaler_skips_overflow_without_advancing_and_sees_unscaled_grads(name):
    """fp32 weights, GradScaler("cpu"); scaling by a power of two is exact in fp32, so the scaled run must equal a
    plain run that simply skips the overflowing step."""
    overflow_step, steps = 3, 7
    plain_model, scaled_model = small_model(), small_model()
    plain, scaled = OPTIMIZERS[name](plain_model.parameters()), OPTIMIZERS[name](scaled_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    seen_grads = []
    step = scaled.step

    def recording_step(*args, **kwargs):
        seen_grads.append([p.grad.clone() for p in scaled_model.parameters()])
        return step(*args, **kwargs)

    scaled.step = recording_step
    for t in range(steps):
        plain.zero_grad()
        loss_of(plain_model, t).backward()
        reference_grads = [p.grad.clone() for p in plain_model.parameters()]
        if t != overflow_step:
            plain.step()

        scaled.zero_grad()
        scaler.scale(loss_of(scaled_model, t)).backward()
        if t == overflow_step:
            before = [p.detach().clone() for p in scaled_model.parameters()]
            next(scaled_model.parameters()).grad[0, 0] = float("inf")
        scaler.step(scaled)
        scaler.update()
        if t == overflow_step:
            assert scaler.get_scale() == 2.0**15
            assert all(torch.equal(b, p) for b, p in zip(before, scaled_model.parameters(), strict=True))
        else:
            for seen, reference in zip(seen_grads[-1], reference_grads, strict=True):
                assert torch.equal(seen, reference)  # unscaled before step, exactly

    assert len(seen_grads) == steps - 1
    for p_plain, p_scaled in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.isfinite(p_scaled).all()
        assert torch.equal(p_plain, p_scaled)
    if "lamb" in name:
        assert all(state["step"].item() == steps - 1 for state in scaled.state.values())
    assert all(torch.isfinite(t).all() for state in scaled.state.values() for t in state.values())


def test_grad_scaler_with_fp16_autocast_trains():
    model = small_model()
    optimizer = Lamb(model.parameters(), lr=1e-2, preset="nvidia")
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for t in range(30):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, t % 4)
        scaler.scale(loss).backward()
        if t == 5:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.state[next(model.parameters())]["step"].item() == 29
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("master_weights", [True, False])
@pytest.mark.parametrize("name", ["lamb", "lars-optax-nesterov"])
def test_bf16_model_trains_with_fp32_state(name, master_weights):
    model = small_model(torch.bfloat16)
    optimizer = OPTIMIZERS[name](model.parameters())
    optimizer.master_weights = master_weights
    losses = []
    for t in range(60):
        optimizer.zero_grad()
        loss = loss_of(model, t % 4)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        state = optimizer.state[p]
        for key, value in state.items():
            assert value.dtype == torch.float32, key
        assert ("master" in state) == master_weights
        if master_weights:
            assert torch.equal(state["master"].to(torch.bfloat16), p)


def test_master_weights_keep_updates_that_bf16_would_round_away():
    def final_values(master_weights):
        weight = torch.nn.Parameter(torch.full((4, 4), 256.0, dtype=torch.bfloat16))
        optimizer = Lamb([weight], lr=1e-3, weight_decay=0.0, master_weights=master_weights)
        for _ in range(10):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        return weight, optimizer.state[weight].get("master")

    # u = 1 everywhere, so each step is p ← p·(1 - lr): 0.256 at 256, below bf16's spacing of 2 there
    weight, master = final_values(True)
    assert master[0, 0].item() == pytest.approx(256.0 * 0.999**10, rel=1e-6)
    assert weight[0, 0].item() == 253.0  # the master rounded to bf16
    weight, master = final_values(False)
    assert master is None and weight[0, 0].item() == 256.0


# ------------------------------------------------------------------------------------------------ state_dict
def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        optimizer.zero_grad()
        loss_of(model, t).backward()
        optimizer.step()


def saved(obj) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # only tensors and primitives load this way


@pytest.mark.parametrize("dtype,master", PRECISIONS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_equals_never_stopping(name, dtype, master):
    straight_model = small_model(dtype)
    straight = OPTIMIZERS[name](straight_model.parameters())
    straight.master_weights = master
    train(straight_model, straight, range(10))

    first_model = small_model(dtype)
    first = OPTIMIZERS[name](first_model.parameters())
    first.master_weights = master
    train(first_model, first, range(5))
    model_state, optimizer_state = saved(first_model.state_dict()), saved(first.state_dict())

    resumed_model = small_model(dtype)
    resumed_model.load_state_dict(model_state)
    resumed = OPTIMIZERS[name](resumed_model.parameters())
    resumed.master_weights = master
    resumed.load_state_dict(optimizer_state)
    train(resumed_model, resumed, range(5, 10))

    for a, b in zip(straight_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.state.values(), resumed.state.values(), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype for key in a)


def test_fp32_state_loads_into_bf16_params_with_masters_without_rounding():
    model = small_model()
    source = Lamb(model.parameters(), lr=1e-2)
    train(model, source, range(5))
    state = saved(source.state_dict())

    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    target = Lamb(bf16_model.parameters(), lr=1e-2, master_weights=True)
    target.load_state_dict(state)
    for p_source, p_target in zip(model.parameters(), bf16_model.parameters(), strict=True):
        loaded, original = target.state[p_target], source.state[p_source]
        assert loaded["exp_avg"].dtype == torch.float32
        assert torch.equal(loaded["exp_avg"], original["exp_avg"])
        assert torch.equal(loaded["exp_avg_sq"], original["exp_avg_sq"])
        assert loaded["step"].item() == 5
    train(bf16_model, target, range(5, 8))
    for p in bf16_model.parameters():
        assert target.state[p]["master"].dtype == torch.float32 and target.state[p]["step"].item() == 8


def test_loaded_state_does_not_alias_the_checkpoint():
    model = small_model()
    optimizer = Lamb(model.parameters(), lr=1e-2)
    train(model, optimizer, range(2))
    checkpoint = optimizer.state_dict()
    other = Lamb(small_model().parameters(), lr=1e-2)
    other.load_state_dict(checkpoint)
    first = next(iter(other.state.values()))
    assert first["exp_avg"].data_ptr() != next(iter(optimizer.state.values()))["exp_avg"].data_ptr()
