"""The settings schema (legw_hf.settings): each host's vocabulary comes from it, agrees with the code that takes the
values, and the settings it opened to Trainer and ``legw-hf plan`` run as the written-out formula says."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
from legw_oracle import legw_poly_lr
from test_cli import run_cli
from toy import Regressor, legw_training_args, logged_learning_rates, regression_dataset
from transformers import HfArgumentParser

from legw_hf import Lamb, Lars, LegwConfig, LegwTrainer, LegwTrainingArguments, SettingError, get_scheduler
from legw_hf.adascale import MODES
from legw_hf.optim import LAMB_PRESETS, LARS_PRESETS
from legw_hf.optim.choice import OPTIMIZERS
from legw_hf.ramp import AutoRamp, ramped_plan
from legw_hf.schedules import DECAY_OPTIONS
from legw_hf.settings import (
    ADASCALE_MODES,
    OPTIMIZER_NAMES,
    PRESET_NAMES,
    SETTINGS,
    markdown_table,
    names_of,
    settings_of,
)


def test_the_schema_names_what_the_code_takes():
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES
    assert tuple(MODES) == ADASCALE_MODES
    assert {"lamb": tuple(LAMB_PRESETS), "lars": tuple(LARS_PRESETS)} == PRESET_NAMES
    assert set(names_of("decay")) == DECAY_OPTIONS | {"decay"}
    assert set(names_of("config")) == {f.name for f in dataclasses.fields(LegwConfig)} - {"decay"}
    plan_parameters = set(inspect.signature(LegwConfig.plan).parameters) - {"self"}
    # the batch ramp is the one run setting LegwConfig.plan does not take: legw_hf.ramp.ramped_plan takes it beside them
    ramp_parameters = set(inspect.signature(ramped_plan).parameters) - {"config", "ramp"}
    assert set(names_of("run")) == plan_parameters | {"batch_ramp"} | ramp_parameters
    assert "ramp" in inspect.signature(ramped_plan).parameters
    # the automatic ramp's flags are AutoRamp's keywords, all of them
    automatic = {s.name for s in SETTINGS if (s.trainer_argument or "").startswith("legw_ramp_")}
    assert automatic == {f.name for f in dataclasses.fields(AutoRamp)}
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)


@pytest.mark.parametrize("optimizer", ["lamb", "lars"])
def test_every_optimizer_keyword_is_a_parameter_of_its_optimizer(optimizer):
    cls = {"lamb": Lamb, "lars": Lars}[optimizer]
    taken = set(OPTIMIZERS[optimizer][1])
    assert taken == {s.name for s in settings_of("optimizer") if optimizer in s.optimizers}
    assert taken <= set(inspect.signature(cls).parameters)


def test_legw_arguments_fields_are_the_schema_settings_trainer_takes():
    fields = [f.name for f in dataclasses.fields(LegwTrainingArguments) if f.name.startswith("legw_")]
    assert fields == [s.trainer_argument for s in SETTINGS if s.declared_by_legw]
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(LegwTrainingArguments)}
    for setting in SETTINGS:
        if setting.declared_by_legw:
            assert help_of[setting.trainer_argument].startswith(setting.help)


def test_the_documented_tables_list_every_flag():
    trainer = markdown_table("trainer", ("config", "decay", "run", "trainer"))
    optimizer = markdown_table("trainer", ("optimizer",))
    cli = markdown_table("cli", ("config", "decay", "run"))
    for setting in SETTINGS:
        if setting.declared_by_legw:
            table = optimizer if setting.kind == "optimizer" else trainer
            assert f"`--{setting.trainer_argument} " in table
        if setting.cli and setting.kind != "optimizer":
            assert f"`{setting.cli}`" in cli if setting.type is bool else f"`{setting.cli} " in cli
    assert "| `--legw_eps_inside_sqrt true\\|false` | — | lamb |" in optimizer


def test_an_error_names_the_setting_as_each_host_spells_it(tmp_path):
    with pytest.raises(SettingError) as python_error:
        LegwConfig(base_batch_size=0, base_lr=0.1, base_warmup_epochs=0.1)
    assert python_error.value.field == "base_batch_size"
    with pytest.raises(SettingError) as trainer_error:
        legw_training_args(tmp_path, legw_base_batch_size=0)
    assert trainer_error.value.field == "legw_base_batch_size"
    cli = run_cli(
        "plan",
        "--base-batch",
        "0",
        "--base-lr",
        "0.1",
        "--base-warmup-epochs",
        "0.1",
        "--epochs",
        "1",
        "--dataset-size",
        "100",
        "--batch",
        "8",
    )
    assert cli.returncode == 2 and cli.stderr.startswith("legw-hf plan: error: --base-batch must be")
    with pytest.raises(SettingError) as optimizer_error:
        legw_training_args(tmp_path, legw_optimizer="lamb", legw_betas=[0.9, 1.5])
    assert optimizer_error.value.field == "legw_betas"


def test_plan_previews_a_max_steps_run_as_trainer_runs_it():
    """``legw-hf plan --steps`` is Trainer's --max_steps: that many updates at each batch, the LR written out."""
    base = "--base-batch 4 --base-lr 0.05 --base-warmup-epochs 0.1 --dataset-size 100 --batch 16".split()
    cli = run_cli("plan", *base, "--steps", "10", "--json")
    assert cli.returncode == 0, cli.stderr
    (summary,) = json.loads(cli.stdout)
    spe = math.ceil(100 / 16)
    assert (summary["total_steps"], summary["steps_per_epoch"]) == (10, spe)
    assert summary["epochs"] == pytest.approx(10 / spe)
    assert summary["peak_lr"] == pytest.approx(0.05 * 2) and summary["warmup_epochs"] == pytest.approx(0.4)
    both = run_cli("plan", *base, "--steps", "10", "--epochs", "2")
    assert both.returncode == 2 and "--epochs: not allowed with argument --steps" in both.stderr


def test_trainer_takes_the_length_in_base_steps(tmp_path):
    """--legw_base_steps 50 at base batch 4 over 100 examples is 2 epochs (25 base steps each); at batch 16 that is
    2 x 7 = 14 updates, each at the LEGW LR of its progress."""
    args = legw_training_args(tmp_path / "out", legw_base_steps=50)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    trainer.train()
    plan = trainer.lr_scheduler.plan
    assert (plan.epochs, plan.total_steps, trainer.state.global_step) == (2.0, 14, 14)
    expected = [
        legw_poly_lr(n, base_lr=0.05, base_batch=4, batch=16, base_warmup_epochs=0.1, epochs=2.0, steps_per_epoch=7)
        for n in range(14)
    ]
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("given", "field"), [({"max_steps": 5}, "max_steps"), ({"num_train_epochs": 2}, "num_train_epochs")]
)
def test_base_steps_beside_another_length_is_refused(tmp_path, given, field):
    with pytest.raises(SettingError) as caught:
        legw_training_args(tmp_path / "out", legw_base_steps=50, **given)
    assert caught.value.field == field and "--legw_base_steps" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_lamb_and_lars_options_reach_the_optimizer_from_the_command_line(tmp_path):
    parser = HfArgumentParser(LegwTrainingArguments)
    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none", "--max_steps", "1"]
    (lamb_args,) = parser.parse_args_into_dataclasses(
        [
            *common,
            "--legw_optimizer",
            "lamb",
            "--legw_eps_inside_sqrt",
            "true",
            "--legw_weight_decay_mode",
            "l2",
            "--legw_grad_averaging",
            "false",
        ]
    )
    lamb = LegwTrainer(model=Regressor(), args=lamb_args, train_dataset=regression_dataset(16)).create_optimizer()
    group = lamb.param_groups[0]
    assert (group["eps_inside_sqrt"], group["weight_decay_mode"], group["grad_averaging"]) == (True, "l2", False)
    (lars_args,) = parser.parse_args_into_dataclasses(
        [
            *common,
            "--legw_optimizer",
            "lars",
            "--legw_trust_denominator",
            "update_norm",
            "--legw_local_lr_clip",
            "true",
            "--legw_lr_before_momentum",
            "true",
        ]
    )
    lars = LegwTrainer(model=Regressor(), args=lars_args, train_dataset=regression_dataset(16)).create_optimizer()
    group = lars.param_groups[0]
    assert (group["trust_denominator"], group["local_lr_clip"], group["lr_before_momentum"]) == (
        "update_norm",
        True,
        True,
    )
    with pytest.raises(SettingError) as caught:
        legw_training_args(tmp_path / "x", legw_optimizer="lars", legw_eps_inside_sqrt=True)
    assert caught.value.field == "legw_eps_inside_sqrt" and "'lars'" in str(caught.value)


def test_get_scheduler_takes_exactly_the_plan_settings():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    base = dict(base_batch_size=4, base_lr=0.1, base_warmup_epochs=0.1, batch_size=16, dataset_size=100, epochs=2)
    assert get_scheduler("legw", optimizer, scheduler_specific_kwargs=base).plan.total_steps == 14
    with pytest.raises(SettingError) as caught:
        get_scheduler("legw", optimizer, scheduler_specific_kwargs=base | {"momentum": 0.9})
    assert caught.value.field == "momentum" and "not a LEGW scheduler setting" in str(caught.value)


def test_run_shape_flags_serve_a_config_given_in_code_and_are_refused_without_any_plan(tmp_path):
    """--legw_dataset_size, --legw_global_batch_size and --legw_base_steps shape whichever plan the trainer has: the
    --legw_* config flags' or a LegwConfig handed over in code; with neither they would be ignored."""
    config = LegwConfig(base_batch_size=4, base_lr=0.05, base_warmup_epochs=0.1)
    shape = dict(legw_dataset_size=100, legw_global_batch_size=16, legw_base_steps=50)
    no_plan = dict(legw_base_batch_size=None, legw_base_warmup_epochs=None, learning_rate=0.05)
    args = legw_training_args(tmp_path / "out", **no_plan, **shape)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100), legw_config=config)
    trainer.train()
    plan = trainer.lr_scheduler.plan
    assert (plan.dataset_size, plan.batch_size, plan.epochs, plan.total_steps) == (100, 16, 2.0, 14)
    wrong_batch = legw_training_args(tmp_path / "wrong", **no_plan, **(shape | {"legw_global_batch_size": 32}))
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=wrong_batch, train_dataset=regression_dataset(100), legw_config=config)
    assert caught.value.field == "legw_global_batch_size"
    orphan = legw_training_args(tmp_path / "orphan", **no_plan, legw_dataset_size=100, legw_global_batch_size=16)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=orphan, train_dataset=regression_dataset(100))
    assert caught.value.field == "legw_base_batch_size"
    assert "is required by --legw_global_batch_size, --legw_dataset_size" in str(caught.value)
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "orphan").exists()


@pytest.mark.filterwarnings("ignore:the optimizer keyword fused:DeprecationWarning")  # the keyword it passes
def test_the_deprecated_fused_flag_warns_and_still_selects_the_kernel(tmp_path):
    with pytest.warns(FutureWarning, match="--legw_fused is deprecated.*--legw_optimizer_impl"):
        args = legw_training_args(tmp_path / "out", legw_optimizer="lamb", legw_fused="cpu", max_steps=1)
    assert (
        LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(16)).create_optimizer().impl == "cpu"
    )
    modern = legw_training_args(tmp_path / "new", legw_optimizer="lamb", legw_optimizer_impl="foreach", max_steps=1)
    assert LegwTrainer(
        model=Regressor(), args=modern, train_dataset=regression_dataset(16)
    ).create_optimizer().impl == ("foreach")


def test_a_setting_error_crosses_a_process_boundary_whole():
    # raised in a worker (multiprocessing pools, DataLoader workers) it comes back by pickle
    import pickle

    from legw_hf.errors import SettingError

    error = SettingError("batch_ramp", "must start at {0}", "8@1", detail="a detail", also=("epoch 0",))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is SettingError
    assert (copy.field, copy.requirement, copy.value, copy.detail, copy.also) == (
        "batch_ramp",
        "must start at {0}",
        "8@1",
        "a detail",
        ("epoch 0",),
    )
    assert str(copy) == "batch_ramp must start at epoch 0, got '8@1' (a detail)"
