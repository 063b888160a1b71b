"""LAMB and LARS through Trainer's arguments: flags, clipping, trust-ratio logs, mixed precision, resume."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_trainer import PoisonSteps, expected_lrs, legw_args
from toy import Regressor, StopAt, logged_learning_rates, regression_dataset
from transformers import HfArgumentParser

from legw_hf import Lamb, Lars, LegwTrainer, LegwTrainingArguments, SettingError


def inner(trainer):
    return trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours


def test_lamb_from_cli_flags(tmp_path):
    parser = HfArgumentParser(LegwTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path / "out"),
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--weight_decay",
            "0.01",
            "--legw_base_batch_size",
            "4",
            "--legw_base_warmup_epochs",
            "0.1",
            "--legw_optimizer",
            "lamb",
            "--legw_optimizer_preset",
            "deepspeed",
            "--legw_trust_clamp",
            "0.01",
            "0.3",
            "--legw_betas",
            "0.9",
            "0.98",
            "--legw_eps",
            "1e-7",
        ]
    )
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(40))
    trainer.train()
    optimizer = inner(trainer)
    assert isinstance(optimizer, Lamb) and optimizer.preset == "deepspeed"
    decayed, rest = optimizer.param_groups
    assert decayed["trust_clamp"] == (0.01, 0.3) and decayed["betas"] == (0.9, 0.98) and decayed["eps"] == 1e-7
    assert decayed["bias_correction"] == "step_size"  # from the preset
    assert (decayed["weight_decay"], rest["weight_decay"]) == (0.01, 0.0)
    assert decayed["param_names"] == ["net.0.weight", "net.3.weight"]
    assert trainer.args.max_grad_norm == 1.0  # the deepspeed preset does not pre-normalise


def test_nvidia_preset_turns_trainer_clipping_off_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="legw_hf"):
        args = legw_args(tmp_path, legw_optimizer="lamb", legw_optimizer_preset="nvidia", max_grad_norm=1.0)
    assert args.max_grad_norm == 0.0
    # Trainer's default clipping: said at INFO (a chosen --max_grad_norm is a warning, test_trainer_guards)
    assert any("clipped twice" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(40))
    assert inner_after_setup(trainer).max_grad_norm == 1.0

    kept = legw_args(tmp_path, legw_optimizer="lamb", legw_optimizer_preset="nvidia", legw_lamb_max_grad_norm=0)
    assert kept.max_grad_norm == 1.0
    assert (
        inner_after_setup(LegwTrainer(model=Regressor(), args=kept, train_dataset=regression_dataset(40))).max_grad_norm
        is None
    )


def inner_after_setup(trainer):
    trainer.create_optimizer()
    return trainer.optimizer


@pytest.mark.parametrize("trust_log", ["summary", "per_layer", "off"])
def test_trust_ratios_in_every_log(tmp_path, trust_log):
    args = legw_args(
        tmp_path,
        legw_optimizer="lamb",
        legw_optimizer_preset="paper",
        weight_decay=0.01,
        legw_trust_log=trust_log,
        max_steps=4,
    )
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(logs) == 4
    for entry in logs:
        keys = {key for key in entry if key.startswith("trust_ratio/")}
        if trust_log == "off":
            assert not keys
            continue
        assert entry["trust_ratio/min"] <= entry["trust_ratio/median"] <= entry["trust_ratio/max"]
        assert entry["trust_ratio/min"] > 0
        if trust_log == "per_layer":
            # every parameter is named; only decayed ones are adapted under the paper preset
            assert {"trust_ratio/net.0.weight", "trust_ratio/net.0.bias", "trust_ratio/net.1.weight"} <= keys
            assert entry["trust_ratio/net.0.bias"] == 1.0
            assert entry["trust_ratio/net.0.weight"] == pytest.approx(
                entry["param_norm/net.0.weight"] / entry["update_norm/net.0.weight"], rel=1e-5
            )
    last = trainer.optimizer.optimizer.trust_stats
    assert last.shape == (6, 3)


@pytest.mark.parametrize(("precision", "optimizer"), [("bf16", "lamb"), ("fp16", "lamb"), ("bf16", "lars")])
def test_layerwise_optimizers_with_accumulation_and_mixed_precision(tmp_path, precision, optimizer):
    model = Regressor()
    poisoned = {3, 7} if precision == "fp16" else set()
    args = legw_args(
        tmp_path,
        legw_optimizer=optimizer,
        weight_decay=0.01,
        **{precision: True},
        **({"legw_trust_coefficient": 0.02} if optimizer == "lars" else {}),
    )
    trainer = LegwTrainer(
        model=model, args=args, train_dataset=regression_dataset(100), callbacks=[PoisonSteps(model, poisoned)]
    )
    if precision == "fp16":
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer.train()
    assert isinstance(inner(trainer), Lamb if optimizer == "lamb" else Lars)
    assert trainer.lr_scheduler.updates == 21 - len(poisoned)
    applied, wanted = 0, []
    for step in range(21):
        wanted.append(expected_lrs(args, 100, range(applied, applied + 1))[0])
        applied += step not in poisoned
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx(wanted)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["loss"] > 0]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    if optimizer == "lamb":
        steps = {state["step"].item() for state in inner(trainer).state.values()}
        assert steps == {21.0 - len(poisoned)}  # skipped steps do not count


def test_lamb_run_resumes_bit_identically(tmp_path):
    settings = dict(legw_optimizer="lamb", legw_optimizer_preset="nvidia", weight_decay=0.01)
    data = regression_dataset(100)
    full = LegwTrainer(model=Regressor(), args=legw_args(tmp_path / "full", **settings), train_dataset=data)
    full.train()
    args = legw_args(tmp_path / "resumed", save_strategy="steps", save_steps=1000, **settings)
    LegwTrainer(model=Regressor(), args=args, train_dataset=data, callbacks=[StopAt(11)]).train()
    resumed = LegwTrainer(model=Regressor(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-11"))
    assert logged_learning_rates(resumed.state.log_history) == logged_learning_rates(full.state.log_history)
    for expected, actual in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (
            {"legw_optimizer": "sgd", "legw_trust_clamp": [0.0, 1.0]},
            "legw_trust_clamp",
            "not an option of optimizer 'sgd'",
        ),
        ({"legw_optimizer": "adamw", "legw_momentum": 0.9}, "legw_momentum", "not an option"),
        ({"legw_optimizer": "lamb", "legw_optimizer_preset": "timm"}, "legw_optimizer_preset", "'nvidia'"),
        ({"legw_optimizer": "lars", "legw_optimizer_preset": "nvidia"}, "legw_optimizer_preset", "'larc'"),
        ({"legw_optimizer": "lamb", "legw_betas": [0.9, 1.0]}, "legw_betas", "[0, 1)"),
        ({"legw_optimizer": "lamb", "legw_trust_clamp": [10.0, 0.01]}, "legw_trust_clamp", "min <= max"),
        ({"legw_optimizer": "lamb", "legw_eps": -1e-6}, "legw_eps", ">= 0"),
        ({"legw_optimizer": "lamb", "learning_rate": float("inf")}, "learning_rate", "finite"),
        ({"legw_optimizer": "lars", "legw_trust_coefficient": 0.0}, "legw_trust_coefficient", "> 0"),
        (
            {"legw_optimizer": "lamb", "legw_optimizer_preset": "deepspeed", "legw_lamb_max_grad_norm": 1.0},
            "legw_lamb_max_grad_norm",
            "preset='deepspeed'",
        ),
        ({"legw_optimizer": "sgd", "legw_momentum": 1.0}, "legw_momentum", "[0, 1)"),
    ],
)
def test_bad_optimizer_flags_name_the_flag(tmp_path, overrides, field, words):
    with pytest.raises(SettingError) as caught:
        legw_args(tmp_path, **overrides)
    assert caught.value.field == field and words in str(caught.value)
    assert not (tmp_path / "out").exists()
