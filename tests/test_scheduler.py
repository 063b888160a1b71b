"""LegwScheduler and get_scheduler: the LR a torch optimizer sees, checkpoints, and delegation to transformers."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import transformers
from transformers.trainer_utils import SchedulerType

import legw_hf
from legw_hf import LegwConfig, LegwScheduler, MultiStep, Polynomial, SettingError, get_scheduler


def make_optimizer(groups: int = 1, lr: float | torch.Tensor = 123.0, **group_keys) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], **group_keys} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def linear_decay_plan(batch_size: int = 40, **config) -> legw_hf.LegwPlan:
    settings = dict(base_batch_size=10, base_lr=0.1, base_warmup_epochs=0.5, decay=Polynomial(power=1.0)) | config
    return LegwConfig(**settings).plan(batch_size=batch_size, dataset_size=400, epochs=5)


def expected_lr(n: int) -> float:
    # linear_decay_plan() written out: k = 4, peak 0.2, warmup 2 epochs, 10 steps/epoch, 50 steps in all.
    t = (n + 1) / 10
    return 0.2 * t / 2 if t < 2 else 0.2 * (1 - (t - 2) / 3)


def lr_trajectory(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_of_every_update_is_the_plan():
    optimizer = make_optimizer()
    scheduler = LegwScheduler(optimizer, linear_decay_plan())
    lrs = lr_trajectory(scheduler, optimizer, 50)
    assert lrs == pytest.approx([expected_lr(n) for n in range(50)], rel=1e-12, abs=1e-15)
    assert lrs[0] > 0
    assert scheduler.updates == 50


def test_group_lr_scale_and_ignores_initial_lr():
    optimizer = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2))]},
            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr_scale": 0.1},
        ],
        lr=5.0,
    )
    LegwScheduler(optimizer, linear_decay_plan())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr(0))
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * expected_lr(0))


def test_tensor_lr_is_updated_in_place():
    lr = torch.tensor(1.0)
    optimizer = make_optimizer(lr=lr)
    scheduler = LegwScheduler(optimizer, linear_decay_plan())
    assert optimizer.param_groups[0]["lr"] is lr
    lrs = lr_trajectory(scheduler, optimizer, 5)
    assert lrs == pytest.approx([expected_lr(n) for n in range(5)])
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)


def _save_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_loads_with_weights_only_and_resumes_exactly():
    uninterrupted_opt = make_optimizer()
    uninterrupted = LegwScheduler(uninterrupted_opt, linear_decay_plan())
    full = lr_trajectory(uninterrupted, uninterrupted_opt, 50)

    optimizer = make_optimizer()
    scheduler = LegwScheduler(optimizer, linear_decay_plan())
    first = lr_trajectory(scheduler, optimizer, 23)
    saved = _save_load(scheduler.state_dict())

    resumed_opt = make_optimizer(lr=999.0)
    resumed = LegwScheduler(resumed_opt, linear_decay_plan())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(saved)
    assert resumed.updates == 23
    assert resumed.get_last_lr() == [resumed_opt.param_groups[0]["lr"]]
    assert first + lr_trajectory(resumed, resumed_opt, 27) == full


def test_resume_recomputes_from_the_current_plan_not_the_saved_one():
    optimizer = make_optimizer()
    scheduler = LegwScheduler(optimizer, linear_decay_plan(batch_size=40))
    lr_trajectory(scheduler, optimizer, 30)  # 3 epochs at 10 steps per epoch
    saved = _save_load(scheduler.state_dict())

    bigger = linear_decay_plan(batch_size=80)  # 5 steps per epoch, peak 0.2·√2
    resumed_opt = make_optimizer()
    resumed = LegwScheduler(resumed_opt, bigger)
    with pytest.warns(
        UserWarning,
        match=r"batch_size.*differ.*epoch 3: update 30 of the checkpoint.s plan is update 15 of the current plan",
    ):
        resumed.load_state_dict(saved)
    assert resumed.updates == 15
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(bigger.lr_at_epoch(16 / 5))


def test_progress_from_a_non_legw_scheduler_state():
    optimizer = make_optimizer()
    lambda_state = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(4):
        optimizer.step()
        lambda_state.step()
    legw = LegwScheduler(make_optimizer(), linear_decay_plan())
    with pytest.warns(UserWarning, match="non-LEGW"):
        legw.load_state_dict({"last_epoch": lambda_state.last_epoch, "base_lrs": [1.0]})
    assert legw.updates == 4
    with pytest.raises(ValueError, match="not a scheduler state"):
        legw.load_state_dict({"something": 1})


# --- get_scheduler ---------------------------------------------------------------------------------------

HF_KWARGS = {
    SchedulerType.COSINE_WITH_MIN_LR: {"min_lr": 1e-3},
    SchedulerType.COSINE_WARMUP_WITH_MIN_LR: {"min_lr_rate": 0.1},
    SchedulerType.WARMUP_STABLE_DECAY: {"num_decay_steps": 5},
    SchedulerType.POLYNOMIAL: {"power": 2.0, "lr_end": 1e-4},
}


@pytest.mark.parametrize("name", [member.value for member in SchedulerType])
def test_every_transformers_name_behaves_exactly_as_there(name):
    trajectories = []
    for factory in (transformers.get_scheduler, get_scheduler):
        torch.manual_seed(0)
        optimizer = make_optimizer(lr=0.1)
        scheduler = factory(
            name,
            optimizer,
            num_warmup_steps=3,
            num_training_steps=20,
            scheduler_specific_kwargs=HF_KWARGS.get(SchedulerType(name)),
        )
        lrs = []
        for _ in range(20):
            optimizer.step()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) or name == "greedy":
                scheduler.step(1.0)
            else:
                scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        trajectories.append((type(scheduler), lrs))
    assert trajectories[0] == trajectories[1]


def test_legw_name_with_a_plan_or_with_settings():
    plan = linear_decay_plan()
    by_plan = get_scheduler("legw", make_optimizer(), num_training_steps=50, scheduler_specific_kwargs={"plan": plan})
    assert isinstance(by_plan, LegwScheduler) and by_plan.plan is plan

    settings = dict(base_batch_size=10, base_lr=0.1, base_warmup_epochs=0.5, batch_size=40, dataset_size=400, power=1.0)
    by_settings = get_scheduler(
        "legw_poly", make_optimizer(), num_training_steps=50, scheduler_specific_kwargs=settings
    )
    assert by_settings.plan == plan  # num_training_steps stands for the length
    assert by_settings.plan.total_steps == 50

    cosine = get_scheduler(
        "legw_cosine", make_optimizer(), scheduler_specific_kwargs=settings | {"epochs": 5, "power": None}
    )
    assert cosine.plan.decay.name == "cosine"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_training_steps": 49}, "num_training_steps"),
        ({"num_warmup_steps": 3}, "num_warmup_steps"),
        ({"scheduler_specific_kwargs": {"plan": linear_decay_plan(), "batch_size": 8}}, "scheduler_specific_kwargs"),
    ],
)
def test_legw_name_refuses_contradictions(kwargs, field):
    arguments = {"scheduler_specific_kwargs": {"plan": linear_decay_plan()}} | kwargs
    with pytest.raises(SettingError) as caught:
        get_scheduler("legw", make_optimizer(), **arguments)
    assert caught.value.field == field


def test_legw_name_errors_name_the_setting():
    settings = dict(base_batch_size=10, base_lr=0.1, base_warmup_epochs=0.5, batch_size=40, dataset_size=400)
    with pytest.raises(SettingError, match="^momentum is not a LEGW scheduler setting"):
        get_scheduler("legw", make_optimizer(), 0, 50, settings | {"momentum": 0.9})
    with pytest.raises(SettingError, match="^dataset_size is required"):
        get_scheduler("legw", make_optimizer(), None, 50, {k: v for k, v in settings.items() if k != "dataset_size"})
    with pytest.raises(SettingError, match="^milestones is not an option of the 'poly' decay"):
        get_scheduler("legw", make_optimizer(), None, 50, settings | {"milestones": [3]})
    with pytest.raises(SettingError, match="^plan must have a 'cosine' decay"):
        get_scheduler("legw_cosine", make_optimizer(), scheduler_specific_kwargs={"plan": linear_decay_plan()})
    with pytest.raises(SettingError, match="^decay must be 'cosine'"):
        get_scheduler("legw_cosine", make_optimizer(), None, 50, settings | {"decay": "poly"})
    with pytest.raises(SettingError, match="^milestones must lie after the warmup"):
        get_scheduler("legw_multistep", make_optimizer(), None, 50, settings | {"milestones": [1.0]})


def test_multistep_scheduler_lr_drops_at_milestone_epochs():
    plan = LegwConfig(
        base_batch_size=10, base_lr=0.1, base_warmup_epochs=0.25, decay=MultiStep(milestones=(2, 4), gamma=0.5)
    ).plan(batch_size=20, dataset_size=200, epochs=5)
    optimizer = make_optimizer()
    lrs = lr_trajectory(LegwScheduler(optimizer, plan), optimizer, plan.total_steps)
    peak = 0.1 * 2**0.5
    # 10 steps per epoch: update n completes epoch (n+1)/10; the drop applies from epoch 2 (update 19)
    assert lrs[18] == pytest.approx(peak) and lrs[19] == pytest.approx(peak / 2)
    assert lrs[38] == pytest.approx(peak / 2) and lrs[39] == pytest.approx(peak / 4)


def test_phased_plan_drives_the_scheduler_across_the_phase_boundary():
    phase1 = LegwConfig(base_batch_size=10, base_lr=0.1, base_warmup_epochs=0.5).plan(
        batch_size=40, dataset_size=400, epochs=5
    )
    phase2 = LegwConfig(base_batch_size=20, base_lr=0.05, base_warmup_steps=4, decay=Polynomial(power=0.5)).plan(
        batch_size=20, dataset_size=100, epochs=2
    )
    plan = legw_hf.PhasedPlan((legw_hf.Phase("seq128", phase1), legw_hf.Phase("seq512", phase2)))
    optimizer = make_optimizer()
    scheduler = LegwScheduler(optimizer, plan)
    lrs = lr_trajectory(scheduler, optimizer, 60)
    assert lrs[:50] == pytest.approx([expected_lr(n) for n in range(50)])
    # phase 2: 5 steps per epoch, warmup 4 steps from 0 to 0.05, then (1 - f)^0.5 over the remaining 6 steps
    assert lrs[50:54] == pytest.approx([0.05 * (n + 1) / 4 for n in range(4)])
    assert lrs[54:] == pytest.approx([0.05 * (1 - (n + 1) / 6) ** 0.5 for n in range(6)])

    resumed_opt = make_optimizer()
    resumed = LegwScheduler(resumed_opt, legw_hf.plan_from_dict(_save_load(scheduler.state_dict())["plan"]))
    resumed.load_state_dict(_save_load(scheduler.state_dict()))
    assert resumed.updates == 60 and resumed.plan == plan
