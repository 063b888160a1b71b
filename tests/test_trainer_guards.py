"""Settings a Trainer user could get silently ignored are refused, and the plan a run used is recorded."""

from __future__ import annotations

import json
import logging

import pytest
from test_trainer import expected_lrs
from toy import Regressor, StopAt, legw_training_args, logged_learning_rates, regression_dataset
from transformers import HfArgumentParser

from legw_hf import LegwTrainer, LegwTrainingArguments, SettingError, plan_from_dict


def parse(tmp_path, *flags: str) -> LegwTrainingArguments:
    (args,) = HfArgumentParser(LegwTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *flags]
    )
    return args


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--legw_base_warmup_epochs", "0.1"], "--legw_base_warmup_epochs"),
        (["--legw_decay", "cosine", "--legw_rule", "sqrt"], "--legw_rule, --legw_decay"),
    ],
)
def test_legw_flags_without_the_base_batch_are_refused(tmp_path, flags, named):
    with pytest.raises(SettingError) as caught:
        parse(tmp_path, *flags)
    assert caught.value.field == "legw_base_batch_size"
    assert f"is required by {named}" in str(caught.value) and "Trainer's own schedule would run" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_an_error_naming_two_settings_names_both_as_the_flags_the_user_types(tmp_path):
    with pytest.raises(SettingError) as caught:
        parse(tmp_path, "--legw_base_batch_size", "64")  # neither warmup form given
    assert str(caught.value).startswith(
        "legw_base_warmup_epochs or legw_base_warmup_steps must be given, exactly one of them"
    )
    assert not (tmp_path / "out").exists()


def test_optimizer_flags_alone_keep_trainers_schedule(tmp_path):
    args = parse(tmp_path, "--legw_optimizer", "lamb", "--lr_scheduler_type", "cosine", "--warmup_steps", "5")
    assert not args.legw_enabled and args.legw_optimizer == "lamb"


LEGW = ["--legw_base_batch_size", "64", "--legw_base_warmup_epochs", "0.1"]


@pytest.mark.parametrize(
    ("flags", "field", "instead"),
    [
        (["--lr_scheduler_type", "cosine"], "lr_scheduler_type", "use --legw_decay"),
        (["--warmup_steps", "100"], "warmup_steps", "use --legw_base_warmup_epochs or --legw_base_warmup_steps"),
        (["--warmup_steps", "0.1"], "warmup_steps", "--legw_base_warmup_epochs"),
        (["--lr_scheduler_kwargs", '{"power": 2}'], "lr_scheduler_kwargs", "--legw_power"),
    ],
)
def test_trainers_schedule_flags_with_legw_are_refused(tmp_path, flags, field, instead):
    with pytest.raises(SettingError) as caught:
        parse(tmp_path, *LEGW, *flags)
    assert caught.value.field == field
    assert "the LEGW plan replaces Trainer's schedule" in str(caught.value) and instead in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_trainers_schedule_flags_at_their_defaults_are_accepted(tmp_path):
    args = parse(tmp_path, *LEGW, "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--lr_scheduler_kwargs", "{}")
    assert args.legw_enabled


def deepspeed_args(tmp_path, preset="nvidia", **config) -> LegwTrainingArguments:
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", **config}
    return LegwTrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        legw_optimizer="lamb",
        legw_optimizer_preset=preset,
        deepspeed={"zero_optimization": {"stage": 2}, **ds},
    )


def test_deepspeed_clipping_beside_lamb_pre_normalisation_is_explained(tmp_path):
    # Trainer would fail at train time on "ds gradient_clipping=1.0 vs hf max_grad_norm=0.0", a value the user
    # never set; the error comes now, and says what happened and what to do.
    with pytest.raises(SettingError) as caught:
        deepspeed_args(tmp_path, gradient_clipping=1.0)
    message = str(caught.value)
    assert caught.value.field == "gradient_clipping" and "would clip a second time" in message
    assert "pre-normalises gradients by their global norm (max norm 1)" in message
    assert "turned Trainer's max_grad_norm (1) off" in message
    assert '"auto" or 0' in message and "--legw_lamb_max_grad_norm 0" in message


def test_deepspeed_clipping_auto_or_absent_is_turned_off_once(tmp_path, caplog):
    auto = deepspeed_args(tmp_path, gradient_clipping="auto")
    assert auto.hf_deepspeed_config.config["gradient_clipping"] == 0.0 and not auto.hf_deepspeed_config.mismatches
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        absent = deepspeed_args(tmp_path)
    # DeepSpeed would clip at its default 1.0 with no entry: the config handed to DeepSpeed says 0
    assert absent.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert any("DeepSpeed's own clipping (default 1.0) is turned off" in r.getMessage() for r in caplog.records)


def test_an_offloaded_optimizer_keeps_legw_optimizer_instead_of_deepspeeds_cpu_adam(tmp_path, caplog):
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        args = deepspeed_args(tmp_path, zero_optimization=offload)
    assert args.deepspeed_plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] is False
    assert any("otherwise accelerate would replace it by DeepSpeedCPUAdam" in r.getMessage() for r in caplog.records)
    with pytest.raises(SettingError) as caught:
        deepspeed_args(tmp_path, zero_optimization=offload, zero_force_ds_cpu_optimizer=True)
    assert caught.value.field == "zero_force_ds_cpu_optimizer" and "replace it by DeepSpeedCPUAdam" in str(caught.value)


def test_deepspeed_clipping_stays_with_a_lamb_that_does_not_pre_normalise(tmp_path):
    args = deepspeed_args(tmp_path, preset="deepspeed", gradient_clipping=1.0)
    assert args.max_grad_norm == 1.0 and args.hf_deepspeed_config.config["gradient_clipping"] == 1.0


def test_the_plan_is_recorded_and_a_resume_with_another_plan_records_both(tmp_path, caplog):
    data = regression_dataset(100)
    first = legw_training_args(tmp_path / "run", save_strategy="steps", save_steps=1000)
    LegwTrainer(model=Regressor(), args=first, train_dataset=data, callbacks=[StopAt(6)]).train()
    record = tmp_path / "run" / "legw_plan.json"
    (entry,) = json.loads(record.read_text())
    assert entry["batch"] == 16 and entry["steps_per_epoch"] == 7 and entry["from_update"] == 0

    # the same plan resumed: nothing new
    same = LegwTrainer(model=Regressor(), args=first, train_dataset=data, callbacks=[StopAt(7)])
    same.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert json.loads(record.read_text()) == [entry]

    # resumed at twice the batch: 6 of 7 updates per epoch become 3 of 4, and both plans are on record
    bigger = legw_training_args(tmp_path / "run", per_device_train_batch_size=16, save_strategy="no")
    resumed = LegwTrainer(model=Regressor(), args=bigger, train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    # Trainer swallows warnings raised while it loads a scheduler; the change is logged instead
    (note,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("The LEGW plan changed")]
    assert "Continuing at epoch 0.857143: update 6 of the checkpoint's plan is update 3 of the current plan" in note
    assert "checkpoint: LEGW plan (legw): batch 16" in note and "now:        LEGW plan (legw): batch 32" in note
    # Trainer's own step count is converted the same way: 3 epochs of 4 updates end at 12, not 6 + 12
    assert resumed.state.global_step == resumed.lr_scheduler.updates == resumed.lr_scheduler.plan.total_steps == 12
    # the 9 updates after the resume use the new plan's LRs of updates 3..11 (written-out formula)
    lrs = logged_learning_rates(resumed.state.log_history)[-9:]
    assert lrs == pytest.approx(expected_lrs(bigger, 100, range(3, 12)), rel=1e-12)
    old, new = json.loads(record.read_text())
    assert old == entry
    assert (new["batch"], new["k"], new["steps_per_epoch"], new["from_update"]) == (32, 8.0, 4, 3)
    assert plan_from_dict(new["plan"]) == resumed.lr_scheduler.plan


def test_a_resume_into_a_new_output_dir_records_the_checkpoints_plan_first(tmp_path):
    data = regression_dataset(100)
    first = legw_training_args(tmp_path / "run", save_strategy="steps", save_steps=1000)
    LegwTrainer(model=Regressor(), args=first, train_dataset=data, callbacks=[StopAt(6)]).train()
    (saved,) = json.loads((tmp_path / "run" / "legw_plan.json").read_text())
    moved = legw_training_args(tmp_path / "elsewhere", per_device_train_batch_size=16)
    LegwTrainer(model=Regressor(), args=moved, train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6")
    )
    old, new = json.loads((tmp_path / "elsewhere" / "legw_plan.json").read_text())
    assert old == {**saved, "from_update": None} and new["batch"] == 32


def deepspeed_block_args(tmp_path, legw_optimizer=None, **blocks) -> LegwTrainingArguments:
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}, **blocks}
    return LegwTrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        legw_base_batch_size=64,
        legw_base_warmup_epochs=0.1,
        legw_optimizer=legw_optimizer,
        deepspeed=config,
    )


def test_deepspeed_scheduler_block_beside_legw_is_refused(tmp_path):
    with pytest.raises(SettingError) as caught:
        deepspeed_block_args(tmp_path, scheduler={"type": "WarmupLR", "params": {}})
    assert caught.value.field == "deepspeed" and "second schedule" in str(caught.value)
    assert "Delete the block" in str(caught.value)


@pytest.mark.parametrize(
    ("legw_optimizer", "block", "words"),
    [
        ("lamb", {"type": "AdamW", "params": {}}, "--legw_optimizer lamb chooses one too"),
        (None, {"type": "Lamb", "params": {}}, "takes its trust ratios over ZeRO's flat partitions"),
    ],
)
def test_deepspeed_optimizer_blocks_that_would_mislead_are_refused(tmp_path, legw_optimizer, block, words):
    with pytest.raises(SettingError) as caught:
        deepspeed_block_args(tmp_path, legw_optimizer=legw_optimizer, optimizer=block)
    assert caught.value.field == "deepspeed" and words in str(caught.value)


def test_deepspeed_adam_block_is_driven_by_legw_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        args = deepspeed_block_args(tmp_path, optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    assert args.legw_enabled
    (note,) = [r.getMessage() for r in caplog.records if 'optimizer" block' in r.getMessage()]
    assert "single param group" in note and "the LEGW plan drives its LR" in note


@pytest.mark.parametrize(
    ("flags", "warned"),
    [
        (["--legw_optimizer_preset", "nvidia"], True),  # Trainer's default --weight_decay 0: no tensor adapted
        (["--legw_optimizer_preset", "paper"], True),
        (["--legw_optimizer_preset", "nvidia", "--weight_decay", "0.01"], False),
        (["--legw_optimizer_preset", "nvidia", "--legw_adapt", "all"], False),
        (["--legw_optimizer_preset", "optax"], False),  # adapts every tensor whatever the decay
        ([], False),  # legw_hf's own default adapts every tensor too
    ],
)
def test_lamb_without_decay_says_once_that_no_tensor_gets_a_trust_ratio(tmp_path, caplog, flags, warned):
    with caplog.at_level(logging.INFO, logger="legw_hf"):
        parse(tmp_path, "--legw_optimizer", "lamb", *flags)
    notes = [r for r in caplog.records if "no tensor gets one" in r.getMessage()]
    assert len(notes) == int(warned)
    if warned:
        assert notes[0].levelno == logging.WARNING and "--weight_decay 0.01" in notes[0].getMessage()
    # Trainer's default clipping turned off for LAMB's own pre-normalisation is expected: a note, not a warning.
    clipping = [r for r in caplog.records if "is turned off so gradients are not clipped twice" in r.getMessage()]
    assert all(r.levelno == logging.INFO for r in clipping)


def test_a_chosen_max_grad_norm_turned_off_for_lamb_is_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="legw_hf"):
        parse(tmp_path, "--legw_optimizer", "lamb", "--legw_optimizer_preset", "nvidia", "--max_grad_norm", "0.5")
    (note,) = [r for r in caplog.records if "is turned off so gradients are not clipped twice" in r.getMessage()]
    assert note.levelno == logging.WARNING and "max_grad_norm=0.5" in note.getMessage()
