"""Real Trainer runs with LEGW: the LR every update uses, Trainer's arithmetic, resume, skips, bad arguments."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from launch import launch
from legw_oracle import legw_poly_lr, nvidia_lr
from procs import REPO
from test_trainer_ramp import (
    expected as ramp_expected,
    stream_slices,
    train as ramp_train,
)
from toy import (
    PoisonSteps,
    Regressor,
    StopAt,
    legw_training_args,
    logged_learning_rates,
    ramp_training_args,
    regression_dataset,
    sample_ids,
)
from transformers import HfArgumentParser, Trainer, TrainingArguments

from legw_hf import LegwCallback, LegwScheduler, LegwTrainer, LegwTrainingArguments, SettingError
from legw_hf.plan import LegwConfig
from legw_hf.record import read_plan_record
from legw_hf.schedules import PolynomialOfRun


def legw_args(tmp_path, **overrides) -> LegwTrainingArguments:
    return legw_training_args(tmp_path / "out", **overrides)


def expected_lrs(args: LegwTrainingArguments, dataset_size: int, updates: range, **decay) -> list[float]:
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    micro_batches = math.ceil(dataset_size / args.per_device_train_batch_size)
    spe = math.ceil(micro_batches / args.gradient_accumulation_steps)
    epochs = args.max_steps / spe if args.max_steps > 0 else args.num_train_epochs
    return [
        legw_poly_lr(
            n,
            base_lr=args.learning_rate,
            base_batch=args.legw_base_batch_size,
            batch=batch,
            base_warmup_epochs=args.legw_base_warmup_epochs,
            epochs=epochs,
            steps_per_epoch=spe,
            **decay,
        )
        for n in updates
    ]


def test_every_update_uses_the_planned_lr_with_gradient_accumulation(tmp_path, caplog):
    args = legw_args(tmp_path)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    with caplog.at_level(logging.INFO, logger="legw_hf"):
        trainer.train()
    plan = trainer.lr_scheduler.plan
    # 100 examples, 13 micro-batches of 8 -> 7 updates per epoch at global batch 16 (k = 4)
    assert (plan.batch_size, plan.k, plan.steps_per_epoch, plan.total_steps) == (16, 4.0, 7, 21)
    assert trainer.state.global_step == 21
    lrs = logged_learning_rates(trainer.state.log_history)
    assert lrs == pytest.approx(expected_lrs(args, 100, range(21)), rel=1e-12, abs=1e-15)
    assert lrs[0] > 0
    assert plan.peak_lr == pytest.approx(0.05 * 2)  # √4 × base LR
    # warmup ends at 0.4 epochs = 2.8 updates: between updates, so no update sits exactly on the peak
    assert lrs[1] < lrs[2] < plan.peak_lr
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert all(entry["legw_k"] == 4.0 for entry in logs)
    assert [entry["legw_lr_scale"] for entry in logs] == pytest.approx([lr / 0.05 for lr in lrs])
    plan_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LEGW plan (")]
    assert len(plan_lines) == 1 and "batch 16 (k=4" in plan_lines[0] and "21 steps" in plan_lines[0]


def test_max_steps_and_cosine(tmp_path):
    args = legw_args(tmp_path, max_steps=10, legw_decay="constant")
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    trainer.train()
    plan = trainer.lr_scheduler.plan
    assert plan.total_steps == 10 and plan.epochs == 10 / 7
    lrs = logged_learning_rates(trainer.state.log_history)
    warmup = 0.1 * 4
    assert lrs == pytest.approx([0.1 * min(1.0, (n + 1) / 7 / warmup) for n in range(10)])


def args_without_plan(tmp_path, **overrides) -> LegwTrainingArguments:
    """The toy run's arguments with no LEGW plan fields: the run's shape only (per-device 8 × accumulation 2)."""
    plan_fields = {"legw_base_batch_size": None, "legw_base_warmup_epochs": None, "learning_rate": 5e-5}
    return legw_args(tmp_path, **(plan_fields | overrides))


#: NVIDIA's polynomial decay of the run, as the pretraining recipes give it, with a warmup in base-batch steps.
CODE_CONFIG = LegwConfig(base_batch_size=4, base_lr=0.03, base_warmup_steps=3, decay=PolynomialOfRun(power=0.5))


def test_a_config_given_in_code_is_the_plan_the_trainer_trains_with(tmp_path, caplog):
    args = args_without_plan(tmp_path)
    assert not args.legw_enabled
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100), legw_config=CODE_CONFIG)
    assert trainer.legw_enabled and trainer.legw_config is CODE_CONFIG
    with caplog.at_level(logging.INFO, logger="legw_hf"):
        trainer.train()
    # 100 examples at global batch 16 = 8 × 2 (k = 4): 7 updates per epoch, 21 in 3 epochs. The base warmup of 3
    # steps at batch 4 (25 steps per epoch) is 0.12 epochs, 0.48 at k = 4: 16% of the run. Peak √4 × 0.03.
    lrs = logged_learning_rates(trainer.state.log_history)
    expected = [nvidia_lr(n, peak=0.06, total=21, warmup_fraction=0.48 / 3) for n in range(1, 22)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    built_here = CODE_CONFIG.plan(batch_size=16, dataset_size=100, epochs=3, steps_per_epoch=7)
    assert trainer.lr_scheduler.plan.to_dict() == built_here.to_dict()
    # What the trainer does with any plan: the plan line, legw_plan.json, the LEGW keys in the logs.
    assert [entry["plan"] for entry in read_plan_record(args.output_dir)] == [built_here.to_dict()]
    assert sum(r.getMessage().startswith("LEGW plan (") for r in caplog.records) == 1
    assert all(entry["legw_k"] == 4.0 for entry in trainer.state.log_history if "learning_rate" in entry)


@pytest.mark.parametrize(
    ("overrides", "field", "named"),
    [
        (
            {"legw_base_batch_size": 4, "legw_base_warmup_epochs": 0.1},
            "legw_base_batch_size",
            "legw_base_warmup_epochs",
        ),
        (
            {"legw_base_batch_size": 4, "legw_base_warmup_epochs": 0.1, "legw_decay": "cosine"},
            "legw_base_batch_size",
            "legw_decay",
        ),
        ({"learning_rate": 0.1}, "learning_rate", "learning_rate"),
        ({"warmup_steps": 2}, "warmup_steps", "warmup_steps"),
        ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type", "lr_scheduler_type"),
    ],
)
def test_arguments_that_describe_another_plan_are_refused_beside_a_config(tmp_path, overrides, field, named):
    args = args_without_plan(tmp_path, **overrides)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100), legw_config=CODE_CONFIG)
    assert caught.value.field == field and "legw_config" in str(caught.value) and named in caught.value.detail
    assert not (tmp_path / "out").exists()
    # The config's own base LR is no conflict.
    LegwTrainer(
        model=Regressor(),
        args=args_without_plan(tmp_path, learning_rate=CODE_CONFIG.base_lr),
        train_dataset=regression_dataset(100),
        legw_config=CODE_CONFIG,
    )


def test_a_config_needs_arguments_with_the_legw_fields(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    with pytest.raises(SettingError, match="LegwTrainingArguments") as caught:
        LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100), legw_config=CODE_CONFIG)
    assert caught.value.field == "legw_config"


def test_sgd_and_adamw_choices(tmp_path):
    sgd = LegwTrainer(
        model=Regressor(),
        args=legw_args(
            tmp_path, legw_optimizer="sgd", legw_momentum=0.8, legw_nesterov=True, weight_decay=0.01, max_steps=2
        ),
        train_dataset=regression_dataset(40),
    )
    sgd.train()
    assert isinstance(sgd.optimizer.optimizer, torch.optim.SGD)
    groups = sgd.optimizer.param_groups
    assert {g["momentum"] for g in groups} == {0.8} and all(g["nesterov"] for g in groups)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]  # Trainer's decay / no-decay groups
    adamw = LegwTrainer(
        model=Regressor(),
        args=legw_args(tmp_path, legw_optimizer="adamw", adam_beta2=0.98, max_steps=2),
        train_dataset=regression_dataset(40),
    )
    adamw.train()
    assert isinstance(adamw.optimizer.optimizer, torch.optim.AdamW)
    assert adamw.optimizer.param_groups[0]["betas"] == (0.9, 0.98)


def test_bf16_run_follows_the_plan(tmp_path):
    args = legw_args(tmp_path, bf16=True, num_train_epochs=2)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    trainer.train()
    lrs = logged_learning_rates(trainer.state.log_history)
    assert lrs == pytest.approx(expected_lrs(args, 100, range(14)))
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


@pytest.mark.parametrize("optimizer", [None, "sgd"], ids=["fused-adamw", "sgd"])
def test_fp16_skipped_steps_do_not_advance_the_schedule(tmp_path, optimizer):
    # Trainer's default optimizer (fused AdamW) takes the GradScaler's inf check inside step(), which
    # accelerate's optimizer_step_was_skipped misses; SGD is skipped by the scaler itself.
    model = Regressor()
    args = legw_args(tmp_path, fp16=True, max_grad_norm=1.0, legw_optimizer=optimizer)
    trainer = LegwTrainer(
        model=model, args=args, train_dataset=regression_dataset(100), callbacks=[PoisonSteps(model, {2, 3, 9})]
    )
    # accelerate makes no GradScaler on CPU; install the real one a GPU fp16 run uses.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    assert trainer.state.global_step == 21
    assert trainer.lr_scheduler.updates == 21 - 3
    applied, expected = 0, []
    for step in range(21):
        expected.append(expected_lrs(args, 100, range(applied, applied + 1))[0])
        applied += step not in {2, 3, 9}
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx(expected)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_find_batch_size_replans_for_the_batch_that_fits(tmp_path):
    args = legw_args(tmp_path, per_device_train_batch_size=32, auto_find_batch_size=True, legw_global_batch_size=64)
    trainer = LegwTrainer(model=Regressor(max_batch=8), args=args, train_dataset=regression_dataset(100))
    trainer.train()
    plan = trainer.lr_scheduler.plan
    assert trainer._train_batch_size == 8
    assert plan.batch_size == 16 and plan.peak_lr == pytest.approx(0.05 * 2)
    fitted = legw_args(tmp_path, per_device_train_batch_size=8)
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx(expected_lrs(fitted, 100, range(21)))


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    data = regression_dataset(100)
    full_args = legw_args(tmp_path / "full", legw_optimizer="adamw", weight_decay=0.01)
    full = LegwTrainer(model=Regressor(), args=full_args, train_dataset=data)
    full.train()

    interrupted_args = legw_args(
        tmp_path / "resumed", legw_optimizer="adamw", weight_decay=0.01, save_strategy="steps", save_steps=1000
    )
    interrupted = LegwTrainer(model=Regressor(), args=interrupted_args, train_dataset=data, callbacks=[StopAt(9)])
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-9"
    assert interrupted.state.global_step == 9 and checkpoint.is_dir()

    resumed = LegwTrainer(model=Regressor(), args=interrupted_args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.lr_scheduler.updates == 21
    assert logged_learning_rates(resumed.state.log_history) == logged_learning_rates(full.state.log_history)
    for expected, actual in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_cli_flags_through_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(LegwTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
            "--legw_base_batch_size",
            "256",
            "--legw_rule",
            "sqrt",
            "--legw_base_warmup_steps",
            "100",
            "--legw_decay",
            "multistep",
            "--legw_milestones",
            "3",
            "6",
            "--legw_gamma",
            "0.5",
            "--legw_optimizer",
            "sgd",
            "--legw_momentum",
            "0.95",
        ]
    )
    assert (args.legw_base_batch_size, args.legw_rule, args.legw_base_warmup_steps) == (256, "sqrt", 100.0)
    assert (args.legw_decay, args.legw_milestones, args.legw_gamma) == ("multistep", [3.0, 6.0], 0.5)
    assert (args.legw_optimizer, args.legw_momentum) == ("sgd", 0.95)
    config = args.legw_config()
    assert config.decay.milestones == (3.0, 6.0) and config.base_lr == args.learning_rate
    help_text = parser.format_help()
    for flag in (
        "--legw_base_batch_size",
        "--legw_rule",
        "--legw_base_warmup_epochs",
        "--legw_decay",
        "--legw_power",
        "--legw_end_lr",
        "--legw_milestones",
        "--legw_global_batch_size",
        "--legw_optimizer",
    ):
        assert flag in help_text
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--legw_rule", "cubic"])


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"legw_base_batch_size": 0}, "legw_base_batch_size", ">= 1"),
        ({"learning_rate": 0.0}, "learning_rate", "> 0"),
        ({"legw_base_warmup_epochs": None}, "legw_base_warmup_epochs", "exactly one"),
        ({"legw_global_batch_size": 32}, "legw_global_batch_size", "= 16"),
        ({"legw_decay": "poly", "legw_power": 0.0}, "legw_power", "> 0"),
        ({"legw_decay": "poly", "legw_gamma": 0.5}, "legw_gamma", "not an option of the 'poly' decay"),
        ({"legw_decay": "multistep", "legw_milestones": [2.0, 1.0]}, "legw_milestones", "strictly increasing"),
        ({"legw_optimizer": "sgd", "legw_momentum": 1.5}, "legw_momentum", "[0, 1)"),
    ],
)
def test_bad_arguments_fail_when_the_arguments_are_built(tmp_path, overrides, field, words):
    with pytest.raises(SettingError) as caught:
        legw_args(tmp_path, **overrides)
    assert caught.value.field == field and words in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        # warmup 0.1 epochs × k = 4 is 0.4 epochs; k = 32 makes it 3.2 epochs, not shorter than 3
        ({"per_device_train_batch_size": 64}, "legw_base_warmup_epochs", "shorter than training (3 epochs)"),
        ({"legw_decay": "multistep", "legw_milestones": [1.0, 4.0]}, "legw_milestones", "(0.4, 3)"),
        ({"legw_decay": "poly", "legw_end_lr": 1.0}, "legw_end_lr", "peak LR (0.1)"),
        (
            {"per_device_train_batch_size": 128, "dataloader_drop_last": True},
            "per_device_train_batch_size",
            "0 steps per epoch",
        ),
    ],
)
def test_bad_plan_fails_before_trainer_writes_anything(tmp_path, overrides, field, words):
    args = legw_args(tmp_path, **overrides)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    assert caught.value.field == field and words in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_plain_trainer_with_legw_arguments_is_refused_before_the_first_step(tmp_path):
    model = Regressor()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        model=model, args=legw_args(tmp_path), train_dataset=regression_dataset(40), callbacks=[LegwCallback()]
    )
    with pytest.raises(ValueError, match="use legw_hf.LegwTrainer"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_legw_off_leaves_trainer_unchanged(tmp_path):
    args = legw_args(tmp_path, legw_base_batch_size=None, legw_base_warmup_epochs=None, warmup_steps=2)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(40))
    trainer.train()
    assert not isinstance(trainer.lr_scheduler, LegwScheduler)
    assert "legw_k" not in trainer.state.log_history[0]


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """tests/scripts/trainer_ddp.py under torchrun, 2 processes: all of its runs (the batch ramp's too) in one
    launch."""
    output = tmp_path_factory.mktemp("torchrun")
    launch("torchrun", REPO / "tests" / "scripts" / "trainer_ddp.py", output)
    return output


@pytest.mark.multiprocess
@pytest.mark.parametrize(("split", "batch", "spe"), [("nosplit", 32, 4), ("split", 16, 7)])
def test_torchrun_two_processes_plan_from_trainer_arithmetic(torchrun_runs, split, batch, spe):
    # per-device 8 × accumulation 2 × 2 processes; with split_batches the per-device size is the global one.
    # 100 examples: without split each rank sees 50 (7 micro-batches -> 4 updates); with split, 13 batches -> 7.
    tmp_path = torchrun_runs / split
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    for record in ranks:
        assert record["world_size"] == 2
        assert (record["plan"]["batch"], record["plan"]["steps_per_epoch"]) == (batch, spe)
        wanted = [
            legw_poly_lr(
                n, base_lr=0.05, base_batch=8, batch=batch, base_warmup_epochs=0.2, epochs=2, steps_per_epoch=spe
            )
            for n in range(2 * spe)
        ]
        assert record["lrs"] == pytest.approx(wanted, rel=1e-12, abs=1e-15)
        assert record["updates"] == 2 * spe


# ----------------------------------------------------- the batch ramp's runs of the same launch
@pytest.fixture(scope="module")
def torchrun_ramp(torchrun_runs):
    """The batch-ramp runs of the shared torchrun launch (tests/scripts/trainer_ramp_ddp.py: a whole run and one
    stopped inside its second stage): the output folder, and what each rank recorded of the whole run."""
    output = torchrun_runs / "ramp"
    return output, [json.loads((output / "full" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.multiprocess
def test_a_two_process_checkpoint_resumes_in_one_process(torchrun_ramp):
    """The ramp's update n is the same samples at any world size: resumed by one process (accumulating twice the
    micro-batches), the run ends where the two-process run ended, up to the order of the sums."""
    output, _ = torchrun_ramp
    stopped = output / "stopped" / "out"
    args = ramp_training_args(stopped, per_device_train_batch_size=2)
    resumed = ramp_train(args, resume_from_checkpoint=str(stopped / "checkpoint-16"))
    assert resumed.state.global_step == 23
    wanted = [lr for _, lr in ramp_expected()][16:]
    assert logged_learning_rates(resumed.state.log_history)[16:] == pytest.approx(wanted)
    whole = torch.load(output / "full" / "weights0.pt")
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, whole[name], rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_two_processes_share_every_update_and_take_its_lr(torchrun_ramp):
    output, ranks = torchrun_ramp
    want = ramp_expected()
    batches = [batch for batch, _ in want]
    dataset = regression_dataset(100)
    for record in ranks:
        assert (record["world_size"], record["global_step"]) == (2, len(want))
        assert record["lrs"] == pytest.approx([lr for _, lr in want], rel=1e-12)
        # half of every update on each rank, in micro-batches of the per-device batch (2)
        assert [sum(map(len, update)) for update in record["updates"]] == [batch // 2 for batch in batches]
        assert all(len(micro) == 2 for update in record["updates"] for micro in update)
    both = [
        sorted(sample_ids(dataset, [x for record in ranks for micro in record["updates"][n] for x in micro]))
        for n in range(len(batches))
    ]
    assert both == [sorted(update) for update in stream_slices(batches)]
    weights = [torch.load(output / "full" / f"weights{r}.pt") for r in (0, 1)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
