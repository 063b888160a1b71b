"""A batch ramp in LegwTrainer (--legw_batch_ramp): the batch, samples and LR of every update against the ramp written
out, the stage boundary, a mid-ramp resume, two processes, and what the ramp refuses."""

from __future__ import annotations

import logging

import pytest
import torch
from test_ramp import written_out
from toy import (
    MicroBatchesPerUpdate,
    RecordingRegressor,
    Regressor,
    StopAt,
    logged_learning_rates,
    ramp_training_args,
    regression_dataset,
    sample_ids,
)

from legw_hf import LegwConfig, LegwTrainer, SettingError
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
        ({"fsdp": "full_shard"}, "fsdp", "not supported with --legw_batch_ramp yet"),
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


def test_deepspeed_is_refused_with_the_ramp(tmp_path):
    pytest.importorskip("deepspeed")
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0}}
    with pytest.raises(SettingError) as caught:
        ramp_training_args(tmp_path / "out", deepspeed=config)
    assert caught.value.field == "deepspeed" and "not supported with --legw_batch_ramp yet" in str(caught.value)
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
