"""The batch ramp (legw_hf.ramp): which batch each update takes, its accumulation and its LR, against the ramp and the
LEGW formula written out here; bad ramps refused with the nearest valid batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from legw_oracle import legw_lr

from legw_hf import LegwConfig, LegwScheduler, SettingError, plan_from_dict
from legw_hf.ramp import AutoRamp, BatchRamp, RampController, ramp_from_decisions, ramped_plan

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


def scheduler_of(plan) -> LegwScheduler:
    return LegwScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), plan)


def test_a_ramp_resumes_at_another_micro_batch_step_at_the_same_update_and_refuses_another_ramp(recwarn, caplog):
    """Saved after 20 updates with micro-batch steps of 16 samples (2 processes x 8, say), loaded at 8 (1 process):
    update 20 is the same samples and LR, only each stage's accumulation doubles, so nothing is converted and no
    'plan changed' warning is raised. A checkpoint of another ramp, or of the same ramp over other data, is refused."""
    saved = scheduler_of(ramped_plan(CONFIG, RAMP, dataset_size=1000, epochs=3, micro_step_samples=16))
    for _ in range(20):
        saved.step()
    state = saved.state_dict()
    plan = ramped_plan(CONFIG, RAMP, dataset_size=1000, epochs=3, micro_step_samples=8)
    resumed = scheduler_of(plan)
    with caplog.at_level("INFO", logger="legw_hf.scheduler"):
        resumed.load_state_dict(state)
    expected = written_out([(32, 0.0), (64, 0.5), (128, 1.5)], dataset_size=1000, epochs=3)
    assert resumed.updates == 20 and resumed.get_last_lr() == pytest.approx([expected[20][1]], rel=1e-12)
    assert plan.accumulation_for_update(20) == 2 * saved.plan.accumulation_for_update(20) == expected[20][0] // 8
    assert not [w for w in recwarn if "plan changed" in str(w.message)]
    assert "with micro-batch steps of 8 samples (the checkpoint's: 16)" in caplog.text
    for other, data in (("32@0,64@1", 1000), (RAMP, 999)):
        elsewhere = scheduler_of(ramped_plan(CONFIG, other, dataset_size=data, epochs=3, micro_step_samples=8))
        with pytest.raises(ValueError) as refused:
            elsewhere.load_state_dict(state)
        assert f"the checkpoint's batch ramp {RAMP} over 3 epochs of 1000 samples is not this run's {other}" in str(
            refused.value
        )


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


# The automatic ramp: the rule written out, e = (B + B_simple) / (2B + B_simple) >= threshold doubles B.


def doubles(batch: float, noise_scale: float, threshold: float) -> bool:
    return math.isfinite(noise_scale) and (batch + noise_scale) / (2 * batch + noise_scale) >= threshold


def controller(max_batch=1 << 20, start=16, patience=1, efficiency=0.8, dataset_size=10**9, epochs=1.0):
    settings = AutoRamp(max_batch=max_batch, patience=patience, efficiency=efficiency)
    return RampController(settings, start, dataset_size=dataset_size, epochs=epochs)


@pytest.mark.parametrize("threshold", [0.6, 0.8, 0.9])
@pytest.mark.parametrize("ratio", [0.5, 0.99, 1.0, 1.01, 2.0, 100.0])
def test_the_batch_doubles_when_doubling_is_efficient_enough(threshold, ratio):
    # at the threshold, B_simple = B (2t - 1) / (1 - t): 3B for 0.8, 0.5B for 0.6, 8B for 0.9
    batch = 16
    noise_scale = ratio * batch * (2 * threshold - 1) / (1 - threshold)
    for signal in (1.0, 0.25):
        ramp = controller(efficiency=threshold)
        decision = ramp.observe(update=0, samples=batch, trace=noise_scale * signal, signal=signal)
        if ratio in (0.99, 1.01):  # clear of rounding at the boundary
            assert (decision is not None) == (ratio > 1) == doubles(batch, noise_scale, threshold)
        else:
            assert (decision is not None) == doubles(batch, noise_scale, threshold)
        if decision is not None:
            assert decision.efficiency == pytest.approx((batch + noise_scale) / (2 * batch + noise_scale), rel=1e-12)
            assert (decision.old_batch, decision.new_batch, ramp.batch) == (16, 32, 32)
            assert decision.b_simple == pytest.approx(noise_scale, rel=1e-12)


def test_the_default_threshold_doubles_up_to_a_third_of_the_noise_scale():
    assert AutoRamp(max_batch=64).batch_ratio == pytest.approx(1 / 3)
    for noise_scale, expected in [(47.0, False), (48.0, True), (49.0, True), (math.inf, False), (math.nan, False)]:
        trace, signal = (1.0, 0.0) if noise_scale == math.inf else (noise_scale, 1.0)
        decision = controller().observe(update=0, samples=16, trace=trace, signal=signal)
        assert (decision is not None) == expected == doubles(16, noise_scale, 0.8), noise_scale
    assert controller().observe(update=0, samples=16, trace=None, signal=None) is None


def test_patience_and_the_cap_and_the_end_of_the_run():
    ramp = controller(max_batch=32, start=4, patience=3, dataset_size=1000, epochs=1.0)
    decisions, samples = [], 0
    for update in range(20):
        samples += ramp.batch
        decision = ramp.observe(update=update, samples=samples, trace=1e6, signal=1.0)
        decisions.append(decision and (decision.update, decision.samples, decision.old_batch, decision.new_batch))
    # 3 updates at each batch (from the start, after each change), then no doubling past the cap of 32
    assert [d for d in decisions if d] == [(3, 12, 4, 8), (6, 36, 8, 16), (9, 84, 16, 32)]
    assert [n for n, d in enumerate(decisions) if d] == [2, 5, 8]
    ended = controller(start=4, dataset_size=40, epochs=1.0)
    assert ended.observe(update=9, samples=40, trace=1e6, signal=1.0) is None  # no update left at epoch 1


def test_decisions_come_back_from_the_same_estimates_and_the_saved_state():
    rng = torch.Generator().manual_seed(0)
    estimates = [
        (float(t), float(s))
        for t, s in zip(torch.rand(60, generator=rng) * 400, torch.rand(60, generator=rng), strict=True)
    ]
    runs = []
    for _ in range(2):
        ramp, samples, decided = controller(max_batch=256, start=4, patience=4, dataset_size=10_000), 0, []
        for update, (trace, signal) in enumerate(estimates):
            samples += ramp.batch
            decided.append(ramp.observe(update=update, samples=samples, trace=trace, signal=signal))
        runs.append((decided, ramp))
    assert runs[0][0] == runs[1][0] and any(runs[0][0])
    restored = controller(max_batch=256, start=4, patience=4, dataset_size=10_000)
    restored.load_state_dict(json.loads(json.dumps(runs[0][1].state_dict())))
    assert restored.decisions == runs[0][1].decisions and restored.batch == runs[0][1].batch


@pytest.mark.parametrize(
    ("settings", "start", "field", "words"),
    [
        ({"max_batch": 8}, 16, "max_batch", "must be >= the start batch (16)"),
        ({"max_batch": 48}, 8, "max_batch", "reachable by doubling the start batch (8); the nearest: 32, 64"),
        ({"max_batch": 64}, 4, "start_batch", "at least 2 gradient estimates per update"),
    ],
)
def test_an_automatic_ramp_it_cannot_run_is_refused(settings, start, field, words):
    with pytest.raises(SettingError) as caught:
        AutoRamp(**settings).check(start, micro_batch=4, micro_step_samples=4)
    assert caught.value.field == field and words in str(caught.value)


@pytest.mark.parametrize("efficiency", [0.5, 1.0, 0.3, 1.2, True])
def test_a_threshold_outside_half_to_one_is_refused(efficiency):
    with pytest.raises(SettingError) as caught:
        AutoRamp(max_batch=64, efficiency=efficiency)
    assert caught.value.field == "efficiency" and "(0.5, 1)" in str(caught.value)


def test_the_decisions_replay_as_a_scheduled_ramp_with_exact_stage_starts():
    dataset_size, micro = 997, 4
    start = ramped_plan(CONFIG, "8@0", dataset_size=dataset_size, epochs=3, micro_step_samples=micro)
    ramp, grown, samples = controller(max_batch=64, start=8, patience=7, dataset_size=dataset_size, epochs=3), start, 0
    for update in range(10_000):
        if update >= grown.total_steps:
            break
        samples += grown.batch_for_update(update)
        decision = ramp.observe(update=update, samples=samples, trace=1e6, signal=1.0)
        if decision:
            new = CONFIG.plan(batch_size=decision.new_batch, dataset_size=dataset_size, epochs=3)
            grown = grown.with_stage(new, decision.epoch)
    text = ramp_from_decisions([d.to_dict() for d in ramp.decisions])
    assert text == "8@0,16@" + repr(56 / 997) + ",32@" + repr(168 / 997) + ",64@" + repr(392 / 997)
    replayed = ramped_plan(CONFIG, text, dataset_size=dataset_size, epochs=3, micro_step_samples=micro)
    assert replayed == grown
    assert [replayed.batch_for_update(n) for n in range(replayed.total_steps)] == [8] * 7 + [16] * 7 + [32] * 7 + [
        64
    ] * replayed.stages[-1].updates
    assert ramp_from_decisions([], start_batch=8) == "8@0"
    assert BatchRamp.parse("32@0,64@0.5").to_text() == "32@0,64@0.5"  # short where short is exact


def test_legw_hf_plan_previews_a_ramp_as_a_run_takes_it():
    from test_cli import run_cli

    base = "--base-batch 32 --base-lr 0.1 --base-warmup-epochs 0.05 --epochs 3 --dataset-size 1000".split()
    result = run_cli("plan", *base, "--batch-ramp", RAMP, "--micro-step", "16", "--json")
    assert result.returncode == 0, result.stderr
    plan = plan_from_dict(json.loads(result.stdout))
    expected = written_out([(32, 0.0), (64, 0.5), (128, 1.5)], dataset_size=1000, epochs=3.0)
    assert [plan.batch_for_update(n) for n in range(plan.total_steps)] == [batch for batch, _ in expected]
    assert [plan.lr_for_update(n) for n in range(plan.total_steps)] == pytest.approx([lr for _, lr in expected])
    assert [stage.accumulation for stage in plan.stages] == [2, 4, 8]
    text = run_cli("plan", *base, "--batch-ramp", RAMP).stdout
    assert "batch 128 (k=4, accumulation 4)" in text  # micro step: the stage batches' greatest common divisor, 32
    refused = run_cli(
        "ds-config",
        "--global-batch",
        "64",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--micro-batch",
        "4",
        "--batch-ramp",
        RAMP,
    )
    assert refused.returncode == 2 and "--batch-ramp is not offered by ds-config" in refused.stderr
