"""The LEGW plan against the rules written out here (ALGORITHMS.md §1 and the LEGW paper's settings)."""

from __future__ import annotations

import math

import pytest

from legw_hf import (
    Constant,
    Cosine,
    Exponential,
    LegwConfig,
    LegwPlan,
    MultiStep,
    Phase,
    PhasedPlan,
    Polynomial,
    PolynomialOfRun,
    SettingError,
    make_decay,
    plan_from_dict,
)

IMAGENET = 1281167


def imagenet_config(**overrides) -> LegwConfig:
    settings = dict(base_batch_size=1024, base_lr=2**2.5, base_warmup_epochs=0.3125, decay=Polynomial(power=2.0))
    settings.update(overrides)
    return LegwConfig(**settings)


@pytest.mark.parametrize("doublings", range(6))
def test_legw_imagenet_settings_exact_for_every_power_of_two(doublings):
    # LEGW paper: batch 1K, peak 2^2.5, warmup 0.3125 epochs; each doubling multiplies the peak by 2^0.5
    # and doubles the warmup epochs. Compared with ==, not a tolerance.
    plan = imagenet_config().plan(batch_size=1024 * 2**doublings, dataset_size=IMAGENET, epochs=90)
    assert plan.k == 2**doublings
    assert plan.peak_lr == 2 ** (2.5 + 0.5 * doublings)
    assert plan.warmup_epochs == 0.3125 * 2**doublings


@pytest.mark.parametrize(
    ("rule", "lr_factor", "warmup_factor"),
    [("legw", math.sqrt(8), 8), ("sqrt", math.sqrt(8), 1), ("linear", 8, 1), ("none", 1, 1)],
)
def test_rules(rule, lr_factor, warmup_factor):
    plan = LegwConfig(base_batch_size=256, base_lr=0.1, base_warmup_epochs=0.5, rule=rule).plan(
        batch_size=2048, dataset_size=100_000, epochs=30
    )
    assert plan.peak_lr == pytest.approx(0.1 * lr_factor, rel=1e-15)
    assert plan.warmup_epochs == pytest.approx(0.5 * warmup_factor, rel=1e-15)


def test_steps_counted_like_trainer():
    plan = LegwConfig(base_batch_size=32, base_lr=1e-3, base_warmup_epochs=0.5).plan(
        batch_size=96, dataset_size=1000, epochs=2.5
    )
    assert plan.steps_per_epoch == math.ceil(1000 / 96) == 11
    assert plan.total_steps == math.ceil(2.5 * 11)
    dropped = LegwConfig(base_batch_size=32, base_lr=1e-3, base_warmup_epochs=0.5).plan(
        batch_size=96, dataset_size=1000, epochs=2.5, drop_last=True
    )
    assert dropped.steps_per_epoch == 1000 // 96 == 10


def test_legw_warmup_steps_constant_across_batch_sizes():
    # w0·k epochs × N/(k·B0) steps per epoch = w0·N/B0 steps whatever k is (N divisible by every batch).
    config = LegwConfig(base_batch_size=128, base_lr=1e-3, base_warmup_epochs=0.25)
    warmups = {config.plan(batch_size=128 * 2**j, dataset_size=2**16, epochs=64).warmup_steps for j in range(8)}
    assert warmups == {0.25 * 2**16 / 128}
    # while a fixed-epoch warmup (sqrt rule) shrinks in steps as the batch grows
    sqrt_config = LegwConfig(base_batch_size=128, base_lr=1e-3, base_warmup_epochs=0.25, rule="sqrt")
    assert sqrt_config.plan(batch_size=1024, dataset_size=2**16, epochs=64).warmup_steps == 16


def test_base_warmup_and_length_in_base_steps():
    # 1000 examples, base batch 100: 10 steps per epoch at the base batch.
    config = LegwConfig(base_batch_size=100, base_lr=1e-3, base_warmup_steps=5)
    plan = config.plan(batch_size=400, dataset_size=1000, base_steps=60)
    assert plan.base_warmup_epochs == 0.5
    assert plan.epochs == 6.0
    assert plan.warmup_epochs == 2.0
    assert plan.steps_per_epoch == 3
    assert plan.total_steps == 18
    assert plan.warmup_steps == 6


def test_length_in_target_steps_is_kept_exactly():
    config = LegwConfig(base_batch_size=10, base_lr=1e-3, base_warmup_epochs=0.1)
    plan = config.plan(batch_size=30, dataset_size=100, steps=10)
    assert plan.total_steps == 10
    assert plan.epochs == 10 / 4


def test_first_update_has_positive_lr_and_warmup_reaches_peak():
    plan = LegwConfig(base_batch_size=10, base_lr=0.4, base_warmup_epochs=0.5).plan(
        batch_size=20, dataset_size=200, epochs=4
    )
    # 10 steps per epoch, warmup 1 epoch = 10 steps: update n uses progress (n+1)/10 epochs
    assert plan.lr_for_update(0) == pytest.approx(plan.peak_lr * 0.1)
    assert plan.lr_for_update(0) > 0
    assert plan.lr_for_update(plan.warmup_steps - 1) == pytest.approx(plan.peak_lr)


def _plan(decay, **run):
    config = LegwConfig(base_batch_size=64, base_lr=0.2, base_warmup_epochs=0.5, decay=decay)
    return config.plan(**({"batch_size": 256, "dataset_size": 6400, "epochs": 10} | run))


@pytest.mark.parametrize(
    ("decay", "after_warmup"),
    [
        # written out: t epochs, w = 2 warmup epochs, E = 10 epochs, peak p
        (Polynomial(power=2.0, end_lr=0.01), lambda p, t: 0.01 + (p - 0.01) * (1 - (t - 2) / 8) ** 2),
        (Polynomial(power=0.5), lambda p, t: p * (1 - (t - 2) / 8) ** 0.5),
        (PolynomialOfRun(power=0.5), lambda p, t: p * (1 - t / 10) ** 0.5),
        (Cosine(end_lr=0.0), lambda p, t: p * 0.5 * (1 + math.cos(math.pi * (t - 2) / 8))),
        (MultiStep(milestones=(4, 7), gamma=0.1), lambda p, t: p * (1 if t < 4 else 0.1 if t < 7 else 0.01)),
        (Exponential(gamma=0.5, period=2.0), lambda p, t: p * 0.5 ** ((t - 2) / 2)),
        (Exponential(gamma=0.5, period=2.0, staircase=True), lambda p, t: p * 0.5 ** math.floor((t - 2) / 2)),
        (Constant(), lambda p, t: p),
    ],
    ids=["poly2", "poly0.5", "poly_run", "cosine", "multistep", "exp", "exp-staircase", "constant"],
)
def test_every_update_lr_matches_written_out_schedule(decay, after_warmup):
    plan = _plan(decay)
    peak = 0.2 * 2.0  # sqrt(256/64)
    assert plan.peak_lr == peak and plan.warmup_epochs == 2.0 and plan.steps_per_epoch == 25
    for n in range(plan.total_steps):
        t = (n + 1) / 25
        expected = peak * t / 2.0 if t < 2.0 else after_warmup(peak, t)
        assert plan.lr_for_update(n) == pytest.approx(expected, rel=1e-12, abs=1e-15), n


def nvidia_poly_warmup(step: int, total_steps: int, warmup: float, base_lr: float, degree: float) -> float:
    """DeepLearningExamples' BERT ``PolyWarmUpScheduler.get_lr``, written out: after ``step`` calls of ``step()``."""
    progress = step / total_steps
    if progress < warmup:
        return base_lr * progress / warmup
    return base_lr * (1.0 - progress) ** degree


@pytest.mark.parametrize(("total", "warmup", "base_lr"), [(7038, 0.2843, 6e-3), (1563, 0.128, 4e-3)])
def test_poly_run_at_the_base_batch_is_nvidias_bert_schedule(total, warmup, base_lr):
    # NVIDIA's run_pretraining calls scheduler.step() before each optimizer step: update n uses step n + 1
    config = LegwConfig(
        base_batch_size=65536, base_lr=base_lr, base_warmup_steps=warmup * total, decay=PolynomialOfRun(power=0.5)
    )
    plan = config.plan(batch_size=65536, dataset_size=65536 * total, base_steps=total)
    assert plan.total_steps == total
    for n in range(total):
        assert plan.lr_for_update(n) == pytest.approx(nvidia_poly_warmup(n + 1, total, warmup, base_lr, 0.5), rel=1e-9)
    # the drop at the end of warmup, which the post-warmup polynomial does not have
    first_decayed = math.ceil(warmup * total) - 1
    assert plan.lr_for_update(first_decayed) < 0.95 * plan.lr_for_update(first_decayed - 1)  # x sqrt(1 - w)


def test_multistep_milestones_are_the_same_epochs_at_every_batch():
    decay = MultiStep(milestones=(30, 60, 80), gamma=0.1)
    config = LegwConfig(base_batch_size=1024, base_lr=1.0, base_warmup_epochs=0.3125, decay=decay)
    for batch in (1024, 8192, 32768):
        plan = config.plan(batch_size=batch, dataset_size=IMAGENET, epochs=90)
        epochs_at_first_drop = min(
            (n + 1) / plan.steps_per_epoch
            for n in range(plan.total_steps)
            if plan.lr_for_update(n) < plan.peak_lr * 0.5 and (n + 1) / plan.steps_per_epoch > plan.warmup_epochs
        )
        assert 30 <= epochs_at_first_drop < 30 + 1 / plan.steps_per_epoch + 1e-12


def test_round_trip_through_dict_is_primitives_only():
    plan = _plan(MultiStep(milestones=(4, 7)))
    data = plan.to_dict()

    def primitive(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and primitive(v) for k, v in value.items())
        if isinstance(value, list):
            return all(primitive(v) for v in value)
        return isinstance(value, (int, float, str, bool)) or value is None

    assert primitive(data)
    assert plan_from_dict(data) == plan


def test_phased_plan_rewarms_from_zero_in_phase_two():
    # The NVIDIA BERT-large recipe as data: phase 1 at 65536 (seq 128), phase 2 at 32768 (seq 512).
    phase1 = LegwConfig(base_batch_size=65536, base_lr=6e-3, base_warmup_steps=2000, decay=Polynomial(power=0.5))
    phase2 = LegwConfig(base_batch_size=32768, base_lr=4e-3, base_warmup_steps=200, decay=Polynomial(power=0.5))
    plan = PhasedPlan(
        (
            Phase("seq128", phase1.plan(batch_size=65536, dataset_size=65536 * 7038, base_steps=7038)),
            Phase("seq512", phase2.plan(batch_size=32768, dataset_size=32768 * 1563, base_steps=1563)),
        )
    )
    assert plan.total_steps == 7038 + 1563
    assert plan.phase_starts == (0, 7038)
    assert plan.lr_for_update(1999) == pytest.approx(6e-3)
    assert plan.lr_for_update(7037) == pytest.approx(0.0, abs=1e-12)
    assert plan.lr_for_update(7038) == pytest.approx(4e-3 / 200)  # phase 2 restarts its warmup from 0
    assert plan.lr_for_update(7038 + 199) == pytest.approx(4e-3)
    assert plan.locate(7040) == (1, 2)
    assert plan_from_dict(plan.to_dict()) == plan


# --- bad input: each names the field and the valid range ---------------------------------------------------

BASE = dict(base_batch_size=256, base_lr=0.1, base_warmup_epochs=1.0)
RUN = dict(batch_size=1024, dataset_size=10_000, epochs=10)


@pytest.mark.parametrize(
    ("config", "run", "field", "words"),
    [
        ({"base_batch_size": 0}, {}, "base_batch_size", ">= 1"),
        ({"base_batch_size": -8}, {}, "base_batch_size", ">= 1"),
        ({"base_lr": 0.0}, {}, "base_lr", "> 0"),
        ({"base_lr": -1e-3}, {}, "base_lr", "> 0"),
        ({"base_lr": float("nan")}, {}, "base_lr", "> 0"),
        ({}, {"batch_size": 0}, "batch_size", ">= 1"),
        ({}, {"dataset_size": 0}, "dataset_size", ">= 1"),
        ({}, {"epochs": 0}, "epochs", "> 0"),
        ({}, {"epochs": -3}, "epochs", "> 0"),
        ({"base_warmup_epochs": -0.1}, {}, "base_warmup_epochs", ">= 0"),
        # 1 epoch × k=4 under LEGW is 4 epochs: not shorter than a 4-epoch run
        ({}, {"epochs": 4}, "base_warmup_epochs", "shorter than training"),
        ({"base_warmup_epochs": None, "base_warmup_steps": 400}, {"epochs": 10}, "base_warmup_steps", "shorter"),
        ({"rule": "cubic"}, {}, "rule", "'legw', 'sqrt', 'linear', 'none'"),
        ({"decay": MultiStep(milestones=(5, 12))}, {}, "milestones", "inside training, in (4, 10)"),
        ({"decay": MultiStep(milestones=(3, 6))}, {}, "milestones", "after the warmup"),
        ({"decay": Polynomial(end_lr=0.5)}, {}, "end_lr", "peak LR (0.2)"),
        ({"decay": Cosine(end_lr=0.3)}, {}, "end_lr", "peak LR"),
        ({}, {"batch_size": 20_000, "drop_last": True}, "batch_size", "0 steps per epoch"),
    ],
)
def test_bad_settings_name_the_field_and_range(config, run, field, words):
    with pytest.raises(SettingError) as caught:
        LegwConfig(**(BASE | config)).plan(**(RUN | run))
    assert caught.value.field == field
    assert str(caught.value).startswith(field)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("decay", "options", "field", "words"),
    [
        (MultiStep, {"milestones": (6, 5)}, "milestones", "strictly increasing"),
        (MultiStep, {"milestones": ()}, "milestones", "at least one"),
        (MultiStep, {"milestones": "30 60"}, "milestones", "list of epochs"),
        (MultiStep, {"milestones": (3,), "gamma": 0.0}, "gamma", "(0, 1]"),
        (Polynomial, {"power": 0.0}, "power", "> 0"),
        (Polynomial, {"power": -1.0}, "power", "> 0"),
        (Polynomial, {"end_lr": -1e-5}, "end_lr", ">= 0"),
        (Cosine, {"end_lr": float("inf")}, "end_lr", ">= 0"),
        (Exponential, {"gamma": 1.5}, "gamma", "(0, 1]"),
        (Exponential, {"period": 0}, "period", "> 0"),
    ],
)
def test_bad_decay_options_fail_when_the_shape_is_built(decay, options, field, words):
    with pytest.raises(SettingError) as caught:
        decay(**options)
    assert caught.value.field == field and words in str(caught.value)


def test_unknown_decay_name_lists_the_valid_ones():
    with pytest.raises(SettingError) as caught:
        make_decay("step", gamma=0.5)
    assert caught.value.field == "decay"
    assert "'poly', 'poly_run', 'multistep', 'exp', 'cosine', 'constant'" in str(caught.value)


def test_warmup_must_be_given_exactly_once():
    with pytest.raises(SettingError, match="exactly one"):
        LegwConfig(base_batch_size=8, base_lr=1.0)
    with pytest.raises(SettingError, match="exactly one"):
        LegwConfig(base_batch_size=8, base_lr=1.0, base_warmup_epochs=1, base_warmup_steps=3)


def test_length_must_be_given_exactly_once():
    config = LegwConfig(**BASE)
    with pytest.raises(SettingError, match="exactly one"):
        config.plan(batch_size=1024, dataset_size=10_000)
    with pytest.raises(SettingError, match="exactly one"):
        config.plan(batch_size=1024, dataset_size=10_000, epochs=3, steps=10)


def test_plan_is_checked_when_built_directly():
    with pytest.raises(SettingError, match="steps_per_epoch"):
        LegwPlan(
            base_batch_size=8,
            base_lr=1.0,
            base_warmup_epochs=0.0,
            rule="legw",
            decay=Constant(),
            batch_size=8,
            dataset_size=8,
            epochs=1.0,
            steps_per_epoch=0,
            total_steps=1,
        )
