"""The batch ramp (legw_hf.ramp): which batch each update takes, its accumulation and its LR, against the ramp and the
LEGW formula written out here; bad ramps refused with the nearest valid batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from legw_oracle import legw_lr

from legw_hf import LegwConfig, LegwScheduler, SettingError, plan_from_dict
from legw_hf.ramp import BatchRamp, ramped_plan

CONFIG = LegwConfig(base_batch_size=32, base_lr=0.1, base_warmup_epochs=0.05)
RAMP = "32@0,64@0.5,128@1.5"


def written_out(
    ramp: list[tuple[int, float]], *, dataset_size: int, epochs: float, base_batch: int = 32, **schedule
) -> list[tuple[int, float]]:
    """(batch, LR) of every update: an update takes the batch of the stage its progress starts in and LEGW's LR for
    that batch (k = B / base batch) at the progress it completes; the run ends once ``epochs`` of samples are taken.
    ``schedule``: :func:`legw_lr`'s settings (default: this module's config)."""
    schedule = {"base_lr": 0.1, "base_warmup_epochs": 0.05} | schedule
    updates, samples = [], 0
    while samples < epochs * dataset_size:
        start = samples / dataset_size
        batch = [b for b, at in ramp if at <= start][-1]
        samples += batch
        lr = legw_lr(samples / dataset_size, k=batch / base_batch, epochs=epochs, **schedule)
        updates.append((batch, lr))
    return updates


@pytest.mark.parametrize(("dataset_size", "epochs"), [(1000, 3.0), (1000, 2.5), (997, 2.0)])
def test_every_update_takes_its_stage_batch_and_legw_lr_for_it(dataset_size, epochs):
    plan = ramped_plan(CONFIG, RAMP, dataset_size=dataset_size, epochs=epochs, micro_step_samples=16)
    expected = written_out([(32, 0.0), (64, 0.5), (128, 1.5)], dataset_size=dataset_size, epochs=epochs)
    assert plan.total_steps == len(expected)
    got = [(plan.batch_for_update(n), plan.lr_for_update(n)) for n in range(plan.total_steps)]
    assert [b for b, _ in got] == [b for b, _ in expected]
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in expected], rel=1e-12, abs=1e-15)
    assert [plan.accumulation_for_update(n) for n in range(plan.total_steps)] == [b // 16 for b, _ in expected]


def test_a_stage_boundary_never_splits_an_update():
    plan = ramped_plan(CONFIG, "32@0,96@0.51", dataset_size=1000, epochs=2, micro_step_samples=32)
    boundary = 0.51 * 1000
    for n in range(plan.total_steps):
        start = plan.samples_before(n)
        assert plan.batch_for_update(n) == (32 if start < boundary else 96)
    # 16 updates of 32 reach 512 samples, past 510: the 17th update is the first at 96
    assert [stage.updates for stage in plan.stages] == [16, 16]
    assert plan.samples_before(16) == 512


def test_the_lr_jumps_to_the_new_batch_s_legw_lr_at_a_stage_start():
    plan = ramped_plan(CONFIG, "32@0,128@1", dataset_size=640, epochs=3, micro_step_samples=32)
    before, after = plan.lr_for_update(19), plan.lr_for_update(20)  # 20 updates of 32 = epoch 1
    assert before == pytest.approx(legw_lr(1.0, base_lr=0.1, k=1, base_warmup_epochs=0.05, epochs=3))
    assert after == pytest.approx(legw_lr(1.2, base_lr=0.1, k=4, base_warmup_epochs=0.05, epochs=3))
    # √4 the peak, each decayed linearly over its own run after its warmup (0.05 epochs at k=1, 0.2 at k=4)
    assert after / before == pytest.approx(2 * (1 - 1.0 / 2.8) / (1 - 0.95 / 2.95), rel=1e-9)


def test_the_plan_shows_every_stage_and_round_trips_through_json_and_the_scheduler():
    plan = ramped_plan(CONFIG, RAMP, dataset_size=1000, epochs=3, micro_step_samples=16)
    text = plan.describe()
    assert text.count("accumulation") == 3 and "batch 128 (k=4, accumulation 8)" in text
    rebuilt = plan_from_dict(json.loads(json.dumps(plan.to_dict())))
    assert rebuilt == plan
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LegwScheduler(optimizer, plan)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [plan.lr_for_update(n) for n in range(plan.total_steps)]
    resumed = LegwScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), rebuilt)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.updates == plan.total_steps


@pytest.mark.parametrize(
    ("ramp", "micro", "words"),
    [
        ("32@0,64@0.5,64@0.5", 16, "strictly increasing progress points"),
        ("32@0,64@1,48@0.5", 16, "strictly increasing progress points"),
        ("64@0.1", 16, "first stage at epoch 0"),
        ("32@0,64", 16, "batch@epoch"),
        ("32@0,sixty@1", 16, "batch@epoch"),
        ("32@0,0@1", 16, ">= 1"),
        ("64@0,96@1", 64, "micro-batch x processes = 64 does not divide; the nearest batches that reach it: 64, 128"),
        ("32@0,64@3", 16, "before the run ends (3 epochs)"),
    ],
)
def test_bad_ramps_are_refused_naming_the_setting(ramp, micro, words):
    with pytest.raises(SettingError) as caught:
        ramped_plan(CONFIG, ramp, dataset_size=1000, epochs=3, micro_step_samples=micro)
    assert caught.value.field == "batch_ramp" and words in str(caught.value)


def test_a_ramp_reads_as_it_is_written():
    ramp = BatchRamp.parse("256@0, 1024@0.5, 4096@2")
    assert ramp.to_text() == "256@0,1024@0.5,4096@2"
    assert [ramp.batch_at(e) for e in (0, 0.49, 0.5, 1.99, 2, 5)] == [256, 256, 1024, 1024, 4096, 4096]
    assert math.isclose(ramp.stages[1].start, 0.5)
