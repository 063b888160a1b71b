"""A batch ramp in LegwTrainer (--legw_batch_ramp): the batch, samples and LR of every update against the ramp written
out, the stage boundary, a mid-ramp resume, fp16 skipped updates, what the ramp refuses; the automatic ramp
(--legw_batch_ramp auto): its decisions from the logged estimates, its replay as a scheduled ramp, its resume. The
two-process runs are in test_trainer.py (one shared torchrun launch), under FSDP2 in test_sharded.py, and for the
automatic ramp (under DDP and ZeRO) in test_elastic.py."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from test_ramp import written_out
from toy import (
    AUTO_RAMP,
    NOISY_DATA,
    RAMP_SHAPE,
    MicroBatchesPerUpdate,
    PoisonSteps,
    RecordingRegressor,
    Regressor,
    SaveAt,
    StopAt,
    logged_learning_rates,
    ramp_training_args,
    ramped_updates_of,
    regression_dataset,
    replayed_weights,
    sample_ids,
)
from transformers import ProgressCallback

from legw_hf import LegwConfig, LegwTrainer, SettingError
from legw_hf.ramp import AutoRamp, BatchRamp, RampController, ramp_from_decisions, read_decisions
from legw_hf.record import read_plan_record

#: per-device 4, one process (ramp_training_args): batch 8 accumulates 2 micro-batches, 16 four, 32 eight. 100 samples:
#: 13 updates of 8 reach 104 samples, past the second stage's point (epoch 1 = 100 samples), so batch 16 starts at 104.
STAGES = [(8, 0.0), (16, 1.0), (32, 2.0)]
SEED = 7  # legw_training_args' seed: the data passes are permutations seeded 7, 8, 9, ...


def expected(**overrides) -> list[tuple[int, float]]:
    """(batch, LR) of every update of ramp_training_args' ramp over 100 samples, written out."""
    settings = dict(dataset_size=100, epochs=3, base_batch=8, base_lr=0.05, base_warmup_epochs=0.2) | overrides
    return written_out(STAGES, **settings)


def stream_slices(batches: list[int], dataset_size: int = 100, seed: int = SEED) -> list[list[int]]:
    """The indices each update takes: consecutive slices of data passes, pass p a permutation seeded seed + p."""
    passes = -(-sum(batches) // dataset_size)
    permutations = [
        torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + p)) for p in range(passes)
    ]
    stream = torch.cat(permutations).tolist()
    starts = [sum(batches[:n]) for n in range(len(batches))]
    return [stream[start : start + batch] for start, batch in zip(starts, batches, strict=True)]


def check_samples_and_replay(ranks: list[dict], want: list[tuple[int, float]]) -> None:
    """The records of every rank of a multi-process run of :func:`expected`'s ramp over 100 samples, trained by AdamW
    with eps 1 and no clipping (a step nearly proportional to the gradient): the updates took the ramp's sample
    stream, and the weights are one process's replay of those updates (each micro-batch's loss was divided by the
    update's accumulation, and the optimizer stepped once per update)."""
    dataset = regression_dataset(100)
    updates = ramped_updates_of(ranks, dataset)
    batches, lrs = [batch for batch, _ in want], [lr for _, lr in want]
    assert [sorted(update) for update in updates] == [sorted(update) for update in stream_slices(batches)]
    adamw = functools.partial(torch.optim.AdamW, lr=0.0, eps=1.0, weight_decay=0.0)
    expected_weights = replayed_weights(updates, lrs, dataset, adamw)
    error = float((torch.tensor(ranks[0]["params"]) - expected_weights).norm() / expected_weights.norm())
    assert error < 1e-6


def train(args, model=None, dataset=None, callbacks=(), **train_kwargs) -> LegwTrainer:
    trainer = LegwTrainer(
        model=model or Regressor(),
        args=args,
        train_dataset=dataset or regression_dataset(100),
        callbacks=list(callbacks),
    )
    trainer.train(**train_kwargs)
    return trainer


def test_every_update_takes_its_stage_batch_samples_and_lr(tmp_path, caplog):
    model, dataset = RecordingRegressor(), regression_dataset(100)
    recorder = MicroBatchesPerUpdate(model)
    trainer = LegwTrainer(
        model=model, args=ramp_training_args(tmp_path / "out"), train_dataset=dataset, callbacks=[recorder]
    )
    with caplog.at_level(logging.INFO, logger="legw_hf"):
        trainer.train()
    want = expected()
    batches = [batch for batch, _ in want]
    plan = trainer.lr_scheduler.plan
    assert trainer.state.global_step == plan.total_steps == len(want) == 13 + 6 + 4
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx([lr for _, lr in want], rel=1e-12)
    # every update: its stage batch in micro-batches of the per-device batch, the next samples of the data passes
    assert [sum(map(len, update)) for update in recorder.updates] == batches
    assert all(len(micro) == 4 for update in recorder.updates for micro in update)
    taken = [sample_ids(dataset, [x for micro in update for x in micro]) for update in recorder.updates]
    assert taken == stream_slices(batches)
    # the boundary (sample 100) falls inside update 12: it finishes at batch 8, and batch 16 starts at sample 104
    assert batches[12:14] == [8, 16] and plan.samples_before(13) == 104
    assert trainer.state.epoch == pytest.approx(328 / 100)
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["legw_batch"] for entry in logs] == batches
    assert [entry["legw_k"] for entry in logs] == [batch / 8 for batch in batches]
    assert [entry["epoch"] for entry in logs][12:14] == pytest.approx([1.04, 1.2])
    # the plan shown before training has every stage; legw_plan.json records the ramp
    described = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LEGW batch ramp")]
    assert len(described) == 1
    for line in ("8@0,16@1,32@2", "batch 8 (k=1, accumulation 2): updates 0-12 (13)", "batch 16 (k=2, accumulation 4)"):
        assert line in described[0]
    assert "batch 32 (k=4, accumulation 8): updates 19-22 (4)" in described[0]
    [entry] = read_plan_record(tmp_path / "out")
    assert (entry["ramp"], entry["total_steps"], entry["from_update"]) == ("8@0,16@1,32@2", 23, 0)
    rows = [(stage["batch"], stage["accumulation"], stage["updates"]) for stage in entry["stages"]]
    assert rows == [(8, 2, 13), (16, 4, 6), (32, 8, 4)]
    assert entry["plan"] == plan.to_dict()


def test_a_one_stage_ramp_trains_as_trainer_s_own_accumulation(tmp_path):
    """One stage at batch 8 over 96 samples (whole updates per epoch): the same samples per update as Trainer's
    sampler with per-device 4 x accumulation 2, so the same weights."""
    dataset = regression_dataset(96)
    ramp = train(ramp_training_args(tmp_path / "ramp", legw_batch_ramp="8@0"), dataset=dataset)
    plain_args = ramp_training_args(tmp_path / "plain", legw_batch_ramp=None, gradient_accumulation_steps=2)
    plain = train(plain_args, dataset=dataset)
    assert ramp.state.global_step == plain.state.global_step == 36
    ramp_lrs, plain_lrs = (logged_learning_rates(t.state.log_history) for t in (ramp, plain))
    assert ramp_lrs == pytest.approx(plain_lrs, rel=1e-12)
    for a, b in zip(ramp.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_epoch_strategies_follow_the_data_epochs(tmp_path):
    """save_strategy="epoch": a checkpoint after each update in which a data epoch ends (Trainer sees one epoch)."""
    trainer = train(ramp_training_args(tmp_path / "out", save_strategy="epoch"))
    # epoch 1 ends inside update 13 (samples 96-104), epoch 2 with update 19 (sample 200), epoch 3 with the last
    assert sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*")) == [
        "checkpoint-13",
        "checkpoint-19",
        "checkpoint-23",
    ]
    assert trainer.state.epoch == pytest.approx(3.28)


class ItemsRegressor(Regressor):
    """A loss normalised by Trainer's ``num_items_in_batch`` (the update's label count), recording each count."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[float] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None, **kwargs) -> dict:
        self.counts.append(float(num_items_in_batch))
        return {"loss": (self.net(x).squeeze(-1) - labels).pow(2).sum() / num_items_in_batch}


def test_a_loss_normalised_by_the_update_s_items_sees_the_whole_update(tmp_path):
    dataset = regression_dataset(96).rename_column("y", "labels")
    model = ItemsRegressor()
    ramp = train(ramp_training_args(tmp_path / "ramp"), model=model, dataset=dataset)
    assert ramp.state.global_step == 12 + 6 + 3  # 96 samples: 12 updates of 8 reach epoch 1 exactly
    assert model.counts[2:] == [8.0] * 12 * 2 + [16.0] * 6 * 4 + [32.0] * 3 * 8  # after the num_items check's two
    # a one-stage ramp normalises as Trainer's own accumulation does
    one_stage = ramp_training_args(tmp_path / "one", legw_batch_ramp="8@0")
    plain = ramp_training_args(tmp_path / "plain", legw_batch_ramp=None, gradient_accumulation_steps=2)
    first, second = (train(args, model=ItemsRegressor(), dataset=dataset) for args in (one_stage, plain))
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_run_resumed_mid_ramp_ends_bit_identical(tmp_path):
    whole = train(ramp_training_args(tmp_path / "whole"))
    stopped = ramp_training_args(tmp_path / "stopped")
    train(stopped, callbacks=[StopAt(16)])  # inside the second stage (updates 13-18)
    resumed = train(
        ramp_training_args(tmp_path / "stopped"), resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-16")
    )
    assert resumed.state.global_step == whole.state.global_step == 23
    assert logged_learning_rates(resumed.state.log_history)[16:] == logged_learning_rates(whole.state.log_history)[16:]
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(read_plan_record(tmp_path / "stopped")) == 1  # the same plan: nothing added
    # another ramp is not the same updates: refused, naming the flag
    other = ramp_training_args(tmp_path / "stopped", legw_batch_ramp="8@0,16@1,32@1.5")
    with pytest.raises(SettingError) as caught:
        train(other, resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-16"))
    assert caught.value.field == "legw_batch_ramp" and "the checkpoint's: 8@0,16@1,32@2" in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "the ramp sets each update's accumulation"),
        ({"max_steps": 10}, "max_steps", "the ramp's length is --num_train_epochs"),
        ({"legw_base_steps": 20}, "legw_base_steps", "the ramp's length is --num_train_epochs"),
        ({"legw_global_batch_size": 16}, "legw_global_batch_size", "gives every update's global batch"),
        ({"legw_dataset_size": 100}, "legw_dataset_size", "whose length is the epoch"),
        ({"legw_adascale": "gain"}, "legw_adascale", "set the LR themselves"),
        ({"auto_find_batch_size": True}, "auto_find_batch_size", "must not shrink"),
        ({"dataloader_drop_last": True}, "dataloader_drop_last", "no batch is partial"),
        ({"ignore_data_skip": True}, "ignore_data_skip", "skips the updates done"),
        ({"train_sampling_strategy": "group_by_length"}, "train_sampling_strategy", "draws each update's samples"),
        ({"accelerator_config": {"split_batches": True}}, "accelerator_config", "split_batches off"),
        ({"legw_batch_ramp": "8@0,16"}, "legw_batch_ramp", "batch@epoch"),
        ({"legw_batch_ramp": "8@0.5,16@1"}, "legw_batch_ramp", "first stage at epoch 0"),
    ],
)
def test_what_the_ramp_cannot_run_beside_is_refused_when_the_arguments_are_built(tmp_path, overrides, field, words):
    with pytest.raises(SettingError) as caught:
        ramp_training_args(tmp_path / "out", **overrides)
    assert caught.value.field == field and words in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_scheduled_ramp_is_taken_beside_fsdp2_and_refused_beside_fsdp1(tmp_path, monkeypatch):
    """Trainer's FSDP2 arguments build with a scheduled ramp and give accelerate an FSDP2 plugin (the 2-process run
    under Trainer's FSDP2 path is in tests/test_sharded.py); FSDP1 is refused, and so is an automatic ramp beside
    either (below)."""
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # the arguments set it: restored after the test
    args = ramp_training_args(tmp_path / "out", fsdp=True, fsdp_config={"version": 2})
    assert args.legw_batch_ramp == "8@0,16@1,32@2" and args.fsdp_plugin_args["fsdp_version"] == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(SettingError) as caught:
        ramp_training_args(tmp_path / "out", fsdp=True, fsdp_config={"version": 1})
    assert caught.value.field == "fsdp_config" and caught.value.value == {"version": 1}
    assert 'must select FSDP2 ("version": 2' in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"gradient_accumulation_steps": 4}, 'leave "gradient_accumulation_steps" "auto" or out'),
        # per-device 4 x 1 process: the first update's micro-batch step is 4 samples, not 32
        ({"train_batch_size": 32}, 'leave "train_batch_size" "auto" or out of its config with --legw_batch_ramp'),
    ],
)
def test_a_deepspeed_config_that_fixes_the_batch_is_refused_with_the_ramp(tmp_path, entry, words):
    """The ramp sets DeepSpeed's accumulation and train batch for every update (the 2-process runs under ZeRO 1-3
    are in tests/test_sharded.py and tests/test_elastic.py)."""
    pytest.importorskip("deepspeed")
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}} | entry
    with pytest.raises(SettingError) as caught:
        ramp_training_args(tmp_path / "out", deepspeed=config)
    assert caught.value.field == "deepspeed" and words in str(caught.value)
    assert caught.value.value == entry
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "dataset", "words"),
    [
        # per-device 4 x 1 process: 18 is no multiple of 4; the error names the batches that are
        ({"legw_batch_ramp": "8@0,18@1"}, 100, "does not divide; the nearest batches that reach it: 16, 20"),
        ({"legw_batch_ramp": "8@0,16@3"}, 100, "must start every stage before the run ends (3 epochs)"),
        ({}, "iterable", "needs a train dataset with a length"),
    ],
)
def test_a_ramp_the_run_cannot_take_is_refused_when_the_trainer_is_built(tmp_path, overrides, dataset, words):
    data = regression_dataset(100)
    if dataset == "iterable":
        data = data.to_iterable_dataset()
    args = ramp_training_args(tmp_path / "out", **overrides)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=args, train_dataset=data)
    assert caught.value.field == "legw_batch_ramp" and words in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_the_ramp_needs_a_plan_and_serves_a_config_given_in_code(tmp_path):
    no_plan = dict(legw_base_batch_size=None, legw_base_warmup_epochs=None)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(
            model=Regressor(), args=ramp_training_args(tmp_path / "off", **no_plan), train_dataset=regression_dataset()
        )
    assert caught.value.field == "legw_base_batch_size" and "--legw_batch_ramp" in str(caught.value)
    assert not (tmp_path / "off").exists()
    config = LegwConfig(base_batch_size=8, base_lr=0.05, base_warmup_epochs=0.2)
    args = ramp_training_args(tmp_path / "code", **no_plan)
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100), legw_config=config)
    trainer.train()
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx([lr for _, lr in expected()], rel=1e-12)


@pytest.mark.parametrize("optimizer", [None, "sgd"], ids=["fused-adamw", "sgd"])
def test_an_fp16_skipped_update_keeps_plan_and_data_in_step(tmp_path, optimizer):
    """Updates 2, 13 (the first at batch 16) and 20 overflow: the GradScaler skips them, but they took their
    samples, so the plan moves on with the data: every update still takes its stage batch of the next samples and
    its own LR, exactly as in a run without overflows."""
    model, skipped = RecordingRegressor(), {2, 13, 20}
    recorder = MicroBatchesPerUpdate(model)
    args = ramp_training_args(tmp_path / "out", fp16=True, legw_optimizer=optimizer)
    trainer = LegwTrainer(
        model=model,
        args=args,
        train_dataset=regression_dataset(100),
        callbacks=[recorder, PoisonSteps(model, skipped)],
    )
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # none on CPU: a GPU's
    trainer.train()
    assert scaler.get_scale() == 2.0**10 / 2**3  # three skips, nothing else
    want = expected()
    assert trainer.state.global_step == trainer.lr_scheduler.updates == len(want) == 23
    # written out: samples per update (all updates, skipped ones too) and the LR of each update's own progress
    assert [sum(map(len, update)) for update in recorder.updates] == [8] * 13 + [16] * 6 + [32] * 4
    taken = [sample_ids(regression_dataset(100), [x for micro in u for x in micro]) for u in recorder.updates]
    assert taken == stream_slices([batch for batch, _ in want])
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx([lr for _, lr in want], rel=1e-12)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------- the automatic ramp (--legw_batch_ramp auto), one process
#: toy.AUTO_RAMP on one process, starting at batch 4: 2 gradient estimates per update.
AUTO = AUTO_RAMP | {"legw_ramp_start_batch": 4}


def auto_args(output_dir, **overrides):
    return ramp_training_args(output_dir, **(AUTO | overrides))


def auto_expected(text: str, *, dataset_size: int = 128) -> list[tuple[int, float]]:
    """(batch, LR) of every update of the scheduled ramp ``text`` over 2 epochs at base batch 4, written out."""
    stages = [(stage.batch_size, stage.start) for stage in BatchRamp.parse(text).stages]
    return written_out(stages, dataset_size=dataset_size, epochs=2, base_batch=4, base_lr=0.05, base_warmup_epochs=0.2)


def decisions_from_logs(log_history, *, start=4, dataset_size=128, skipped=(), max_batch=32, patience=3):
    """The decisions a RampController makes from the estimates logged after each update (logging_steps=1), shown the
    updates in ``skipped`` or not."""
    controller = RampController(
        AutoRamp(max_batch=max_batch, patience=patience), start, dataset_size=dataset_size, epochs=2
    )
    samples = 0
    for update, entry in enumerate(e for e in log_history if "learning_rate" in e):
        samples += entry["legw_batch"]
        if update not in skipped:
            trace, signal = entry.get("noise_scale/trace"), entry.get("noise_scale/signal")
            controller.observe(update=update, samples=samples, trace=trace, signal=signal)
    return controller.decisions


def recorded_run(args, *callbacks, overflows=()):
    """A ramped run of a RecordingRegressor on the noisy data (fp16 loss scaling when updates ``overflows``
    overflow): the trainer, and the samples (dataset indices) of each update."""
    model, dataset = RecordingRegressor(), regression_dataset(**NOISY_DATA)
    recorder = MicroBatchesPerUpdate(model)
    callbacks = [recorder, *callbacks, *([PoisonSteps(model, set(overflows))] if overflows else [])]
    trainer = LegwTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    if overflows:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # none on CPU: a GPU's
    trainer.train()
    return trainer, [sample_ids(dataset, [x for micro in update for x in micro]) for update in recorder.updates]


class ProgressBar(ProgressCallback):
    """Trainer's progress bar, with its total and position after each update."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[tuple[int, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.shown.append((self.training_bar.n, self.training_bar.total))


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """One automatic run (its output folder, trainer, samples per update, progress bar), shared by the checks
    below."""
    output = tmp_path_factory.mktemp("auto") / "out"
    bar = ProgressBar()
    return (output, *recorded_run(auto_args(output), bar), bar)


def test_an_automatic_ramp_decides_from_its_logged_estimates(auto_run):
    output, trainer, taken, bar = auto_run
    decisions = trainer.lr_scheduler.decisions
    assert [(d.old_batch, d.new_batch) for d in decisions] == [(4, 8), (8, 16), (16, 32)]
    # the decision log, in the output folder by default, holds the decisions; fed the logged estimates of every
    # update, the decision rule makes them again
    assert read_decisions(output / "legw_ramp_decisions.jsonl") == decisions
    assert decisions_from_logs(trainer.state.log_history) == decisions
    # every update: the batch and LR of the ramp its decisions make, written out, and the next samples of the stream
    text = ramp_from_decisions(decisions)
    want = auto_expected(text)
    batches = [batch for batch, _ in want]
    assert trainer.state.global_step == trainer.state.max_steps == len(want)
    # Trainer's length and progress bar: the most updates the run can take (256 samples at batch 4), then after each
    # change the grown plan's
    totals = [total for _, total in bar.shown]
    assert totals[0] == 64 and totals[-1] == bar.shown[-1][0] == len(want)
    changes = [n for n in range(1, len(totals)) if totals[n] != totals[n - 1]]
    assert changes == [d.update - 1 for d in decisions]
    assert [len(update) for update in taken] == batches and taken == stream_slices(batches, dataset_size=128)
    assert logged_learning_rates(trainer.state.log_history) == pytest.approx([lr for _, lr in want], rel=1e-12)
    for decision in decisions:  # from the update after the estimates, at the samples the run had taken
        assert decision.samples == sum(batches[: decision.update]) and decision.b_simple >= 3 * decision.old_batch
    # legw_plan.json: the first plan, then each grown plan from the update its new stage starts at
    entries = read_plan_record(output)
    assert (entries[0]["ramp"], entries[0]["from_update"]) == ("4@0", 0)
    assert [e["from_update"] for e in entries[1:]] == [d.update for d in decisions]
    assert entries[-1]["ramp"] == text and entries[-1]["plan"] == trainer.lr_scheduler.plan.to_dict()


def test_an_automatic_ramp_replays_as_a_scheduled_ramp(auto_run, tmp_path):
    output, auto, auto_taken, _ = auto_run
    text = ramp_from_decisions(read_decisions(output / "legw_ramp_decisions.jsonl"))
    replay, taken = recorded_run(ramp_training_args(tmp_path / "replay", **RAMP_SHAPE, legw_batch_ramp=text))
    assert taken == auto_taken
    lrs = logged_learning_rates(auto.state.log_history)
    assert logged_learning_rates(replay.state.log_history) == lrs and len(lrs) == len(auto_expected(text))
    for a, b in zip(auto.model.parameters(), replay.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_automatic_ramp_resumed_mid_ramp_ends_bit_identical(auto_run, tmp_path):
    """Saved one update before the second change, stopped one after it, resumed from the save: the run decides again
    what it decided, its log holds every change once, and it ends with the uninterrupted run's weights."""
    _, whole, _, _ = auto_run
    decisions = whole.lr_scheduler.decisions
    saved_at = decisions[1].update - 1
    output = tmp_path / "out"
    recorded_run(auto_args(output), SaveAt(saved_at), StopAt(decisions[1].update + 1))
    assert read_decisions(output / "legw_ramp_decisions.jsonl") == decisions[:2]
    trainer = LegwTrainer(model=Regressor(), args=auto_args(output), train_dataset=regression_dataset(**NOISY_DATA))
    trainer.train(resume_from_checkpoint=str(output / f"checkpoint-{saved_at}"))
    assert trainer.lr_scheduler.decisions == decisions and trainer.state.global_step == whole.state.global_step
    assert read_decisions(output / "legw_ramp_decisions.jsonl") == decisions
    # the checkpoint of another automatic ramp (here: one started at batch 8) is not this run's
    other = auto_args(output, legw_ramp_start_batch=8)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=other, train_dataset=regression_dataset(**NOISY_DATA)).train(
            resume_from_checkpoint=str(output / f"checkpoint-{saved_at}")
        )
    assert caught.value.field == "legw_batch_ramp" and "from batch 8 doubling up to" in str(caught.value)
    after = logged_learning_rates(trainer.state.log_history)[saved_at:]
    assert after == logged_learning_rates(whole.state.log_history)[saved_at:]
    for a, b in zip(trainer.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_automatic_ramp_shows_its_controller_no_overflowed_update(tmp_path):
    """Updates 1 and 7 overflow under fp16 loss scaling: the plan moves on with their samples, but the decision rule
    is not shown them (their statistics were not recorded, and they do not count toward the patience)."""
    trainer, taken = recorded_run(auto_args(tmp_path / "out"), overflows={1, 7})
    decisions = trainer.lr_scheduler.decisions
    logs = trainer.state.log_history
    assert decisions_from_logs(logs, skipped={1, 7}) == decisions
    assert decisions_from_logs(logs) != decisions
    assert decisions[0].update == 3 + 1  # 3 applied updates at batch 4: 0, 2 and 3
    want = auto_expected(ramp_from_decisions(decisions))
    batches = [batch for batch, _ in want]
    assert trainer.state.global_step == trainer.lr_scheduler.updates == len(want)
    assert [len(update) for update in taken] == batches and taken == stream_slices(batches, dataset_size=128)
    assert logged_learning_rates(logs) == pytest.approx([lr for _, lr in want], rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"legw_batch_ramp": "auto"}, "legw_ramp_max_batch", "is required by --legw_batch_ramp auto"),
        ({"legw_ramp_patience": 5}, "legw_ramp_patience", "is only taken by --legw_batch_ramp auto"),
        (AUTO | {"legw_ramp_efficiency": 0.5}, "legw_ramp_efficiency", "must be in (0.5, 1)"),
        (AUTO | {"legw_ramp_patience": 0}, "legw_ramp_patience", "must be an integer >= 1"),
        (AUTO | {"legw_adascale": "gain"}, "legw_adascale", "set the LR themselves"),
        (AUTO | {"fsdp": True}, "fsdp", "auto: each micro-batch's own gradient is reduce-scattered"),
        (AUTO | {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "sets each update's accumulation"),
    ],
)
def test_an_automatic_ramp_is_refused_what_it_cannot_take_when_the_arguments_are_built(
    tmp_path, overrides, field, words
):
    with pytest.raises(SettingError) as caught:
        ramp_training_args(tmp_path / "out", **overrides)
    assert caught.value.field == field and words in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fp16", "config"),
    [(True, {}), (False, {"fp16": {"enabled": True}})],
    ids=["--fp16", "config"],
)
def test_an_automatic_ramp_under_deepspeed_fp16_is_refused(tmp_path, fp16, config):
    """The statistics are taken inside DeepSpeed's step, where its fp16 loss scale may change (as for AdaScale);
    the ramp itself runs under ZeRO 2/3 in test_elastic.py."""
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}} | config
    with pytest.raises(SettingError) as caught:
        auto_args(tmp_path / "out", deepspeed=config, fp16=fp16)
    assert caught.value.field == "legw_batch_ramp"
    assert "auto is not supported with DeepSpeed's fp16 loss scaling" in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (
            {"legw_ramp_max_batch": 48},
            "legw_ramp_max_batch",
            "reachable by doubling the start batch (4); the nearest: 32, 64",
        ),
        ({"legw_ramp_max_batch": 2}, "legw_ramp_max_batch", "must be >= the start batch (4)"),
        # by default the start is per-device batch x processes: one gradient estimate per update on one process
        ({"legw_ramp_start_batch": None}, "legw_ramp_start_batch", "at least 2 gradient estimates per update"),
        ({"legw_ramp_start_batch": 5}, "legw_ramp_start_batch", "per-device batch x processes = 2; the nearest: 4, 6"),
    ],
)
def test_an_automatic_ramp_the_run_cannot_take_is_refused_when_the_trainer_is_built(tmp_path, overrides, field, words):
    args = auto_args(tmp_path / "out", **overrides)
    with pytest.raises(SettingError) as caught:
        LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(**NOISY_DATA))
    assert caught.value.field == field and words in str(caught.value)
    assert not (tmp_path / "out").exists()
