"""Elastic resume: a run checkpointed at world size 2 resumed at 1, and 1 → 2, for plain DDP (Trainer), DeepSpeed
ZeRO-2 (Trainer; re-sharded through DeepSpeed's universal checkpoint) and FSDP2 (a loop; torch.distributed.checkpoint),
all three in one DeepSpeed launch per world size.

With the same per-device batch the global batch changes: the LEGW plan is re-derived for it, progress carries over in
epochs, and the change is logged with both plans. With the global batch kept by changing the accumulation, the plan is
unchanged and the resumed run ends where the uninterrupted one does. Scripts: ``tests/scripts/elastic*.py``.

The same launches run a batch ramp under ZeRO-2 (``tests/scripts/ramp_deepspeed.py``): whole at 2 processes, and
resumed mid-ramp at 2 and at 1, where every stage's accumulation is derived again, in Trainer and in an accelerate
loop (``legw_hf.integrations.accelerate.load_state``); and an automatic ramp (``--legw_batch_ramp auto``) at 2
processes under ZeRO-2 against the same run under DDP.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from launch import launch
from legw_oracle import legw_poly_lr
from procs import REPO, python_env
from test_ramp import written_out
from test_trainer_ramp import (
    auto_expected,
    check_samples_and_replay,
    decisions_from_logs,
    expected as ramp_expected,
    stream_slices,
)
from toy import NOISY_DATA, logged_learning_rates, ramped_updates_of, regression_dataset

from legw_hf import SettingError
from legw_hf.ramp import RampDecision, ramp_from_decisions, read_decisions

pytestmark = pytest.mark.multiprocess

SCRIPTS = REPO / "tests" / "scripts"
# engine: (dataset size, base batch, base LR, base warmup epochs) of its runs in tests/scripts/elastic_*.py
ENGINES = {
    "ddp": (96, 4, 0.05, 0.1),
    "zero2": (96, 4, 0.05, 0.1),
    "fsdp2": (64, 4, 0.02, 0.25),
}
EPOCHS = 2


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """Every engine's runs (tests/scripts/elastic.py): DeepSpeed's launcher with 1, 2, then 1 processes."""
    output = tmp_path_factory.mktemp("elastic")
    env = {"PYTHONPATH": f"{SCRIPTS}:{REPO / 'tests'}:{python_env()['PYTHONPATH']}"}
    for world, phase in ((1, "first"), (2, "second"), (1, "third")):
        launch("deepspeed", SCRIPTS / "elastic.py", phase, output, processes=world, env=env, cwd=REPO)
    return output


@pytest.fixture(params=list(ENGINES))
def runs(request, output):
    engine = request.param
    folder = output / engine / engine

    def load(name: str, rank: int = 0) -> dict:
        return json.loads((folder / f"{name}.rank{rank}.json").read_text())

    return engine, load


def legw_lrs(engine: str, batch: int, updates: range) -> list[float]:
    """LEGW for the toy runs (tests/legw_oracle.py): poly power 1 decay to 0 at EPOCHS epochs."""
    dataset, base_batch, base_lr, base_warmup = ENGINES[engine]
    schedule = dict(base_lr=base_lr, base_warmup_epochs=base_warmup, epochs=EPOCHS)
    spe = math.ceil(dataset / batch)
    return [legw_poly_lr(u, base_batch=base_batch, batch=batch, steps_per_epoch=spe, **schedule) for u in updates]


def relative(actual: list[float], expected: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(actual, expected, strict=True)) / max(abs(b) for b in expected)


@pytest.mark.parametrize(
    ("name", "old_batch", "new_batch", "saved_update", "first_update"),
    [
        # 1 → 2 processes, 4 per device: batch 4 → 8; 6 updates at 4 are 3 at 8 (the same epochs)
        ("r2-changing", 4, 8, 6, 3),
        # 2 → 1: batch 8 → 4; 5 updates at 8 are 10 at 4
        ("r1-changing", 8, 4, 5, 10),
    ],
)
def test_a_new_world_size_re_derives_the_plan_and_carries_progress_in_epochs(
    runs, name, old_batch, new_batch, saved_update, first_update
):
    engine, load = runs
    run = load(name)
    dataset = ENGINES[engine][0]
    total = EPOCHS * math.ceil(dataset / new_batch)
    assert run["plan"]["batch"] == new_batch and run["plan"]["k"] == new_batch / ENGINES[engine][1]
    assert run["updates"] == total and run.get("global_step", total) == total
    assert run["applied_lrs"] == pytest.approx(legw_lrs(engine, new_batch, range(first_update, total)), rel=1e-9)
    (note,) = [w for w in run["warnings"] if "The LEGW plan changed since the checkpoint" in w]
    assert f"update {saved_update} of the checkpoint's plan is update {first_update} of the current plan" in note
    assert (
        f"checkpoint: LEGW plan (legw): batch {old_batch} " in note
        and f"now:        LEGW plan (legw): batch {new_batch} " in note
    )
    if engine != "fsdp2":  # Trainer's own step count follows
        (step_note,) = [w for w in run["warnings"] if w.startswith("Resuming at another global batch")]
        assert f"({new_batch}, was {old_batch})" in step_note and f"becomes step {first_update} of" in step_note
    if engine == "zero2":  # DeepSpeed refuses a checkpoint of another world size; its universal form re-shards
        assert any("resuming from its universal form" in w for w in run["warnings"])
    if engine == "fsdp2":  # LAMB's moments, gathered whole, are the ones saved
        assert run["moment_error"] == 0.0
    if run["world_size"] == 2:
        other = load(name, rank=1)
        assert other["params"] == run["params"] and other["applied_lrs"] == run["applied_lrs"]


@pytest.mark.parametrize(
    ("name", "uninterrupted", "resumed_at"),
    [
        ("r2-fixed", "u1-fixed", 6),  # 1 process x accumulation 2 -> 2 processes x 1: batch 8 kept
        ("r1-fixed", "u2", 5),  # 2 processes x 1 -> 1 process x accumulation 2
    ],
)
def test_the_same_global_batch_by_accumulation_continues_the_schedule_exactly(runs, name, uninterrupted, resumed_at):
    _, load = runs
    run, reference = load(name), load(uninterrupted)
    assert run["plan"] == reference["plan"] and run["plan"]["batch"] == 8
    assert not [w for w in run["warnings"] if "plan changed" in w or "another global batch" in w]
    assert run["applied_lrs"] == reference["applied_lrs"][resumed_at:]
    # the optimizer state was re-sharded, not restarted: the resumed run ends where the uninterrupted one does
    assert relative(run["params"], reference["params"]) < 1e-5


# ----------------------------------------------------- a batch ramp under ZeRO-2 (tests/scripts/ramp_deepspeed.py)
RAMP_SAVED_AT = 16  # the checkpoint after update 16, inside the second stage (updates 13-18)


@pytest.fixture
def ramp_runs(output):
    def load(name: str, rank: int = 0) -> dict:
        return json.loads((output / "zero2-ramp" / name / f"rank{rank}.json").read_text())

    return load


def check_engine_after_updates(record: dict, batches: list[int], first: int, micro_step: int) -> None:
    """DeepSpeed's own count after each update from ``first`` on: its accumulation and batch, the samples and updates
    so far (restored from the checkpoint on resume)."""
    rows = record["engine"]
    assert [(row["accumulation"], row["batch"]) for row in rows] == [(b // micro_step, b) for b in batches[first:]]
    assert [row["global_samples"] for row in rows] == list(itertools.accumulate(batches))[first:]
    assert [row["global_steps"] for row in rows] == list(range(first + 1, len(batches) + 1))


def test_a_ramp_under_zero2_takes_each_update_s_batch_samples_and_lr(ramp_runs):
    """8@0,16@1,32@2 over 100 samples, per-device 2 on 2 processes: every update accumulates B / 4 micro-batch steps
    of the ramp's sample stream, at LEGW's LR for B, and DeepSpeed counts its batch."""
    want = ramp_expected()
    batches, lrs = [batch for batch, _ in want], [lr for _, lr in want]
    ranks = [ramp_runs("full", rank) for rank in (0, 1)]
    for record in ranks:
        assert (record["world_size"], record["global_step"]) == (2, len(want))
        assert record["lrs"] == pytest.approx(lrs, rel=1e-12)
        assert [len(update) for update in record["micro_batches"]] == [batch // 4 for batch in batches]
        assert all(len(micro) == 2 for update in record["micro_batches"] for micro in update)
        check_engine_after_updates(record, batches, first=0, micro_step=4)
    assert ranks[0]["params"] == ranks[1]["params"]
    check_samples_and_replay(ranks, want)  # the engine stepped once per update


def test_a_ramp_under_zero2_resumed_mid_ramp_ends_bit_identical(ramp_runs):
    want = ramp_expected()
    batches = [batch for batch, _ in want]
    whole = ramp_runs("full")
    for rank in (0, 1):
        resumed = ramp_runs("resumed", rank)
        assert resumed["global_step"] == len(want)
        assert resumed["lrs"] == pytest.approx([lr for _, lr in want][RAMP_SAVED_AT:], rel=1e-12)
        check_engine_after_updates(resumed, batches, first=RAMP_SAVED_AT, micro_step=4)
        assert resumed["params"] == whole["params"]


def test_a_ramp_under_zero2_resumed_at_one_process_derives_each_stage_s_accumulation_again(ramp_runs):
    """The 2-process checkpoint, re-sharded through DeepSpeed's universal form: one process of per-device 2
    accumulates B / 2 micro-batches, on the same samples, and ends where the 2-process run ended."""
    want = ramp_expected()
    batches = [batch for batch, _ in want]
    resumed, whole = ramp_runs("r1"), ramp_runs("full")
    assert (resumed["world_size"], resumed["global_step"]) == (1, len(want))
    assert resumed["lrs"] == pytest.approx([lr for _, lr in want][RAMP_SAVED_AT:], rel=1e-12)
    assert [len(update) for update in resumed["micro_batches"]] == [batch // 2 for batch in batches[RAMP_SAVED_AT:]]
    check_engine_after_updates(resumed, batches, first=RAMP_SAVED_AT, micro_step=2)
    updates = ramped_updates_of([resumed], regression_dataset(100))
    assert updates == stream_slices(batches)[RAMP_SAVED_AT:]
    assert relative(resumed["params"], whole["params"]) < 1e-5


def test_two_processes_decide_an_automatic_ramp_alike(ramp_runs, output):
    """--legw_batch_ramp auto in Trainer under DDP on 2 processes of 2 samples per micro-batch (the reference of the
    ZeRO runs below): both ranks measure the same estimates, make the same decisions (the main process logs them
    once), and take every update at the batch and LR of the scheduled ramp those decisions write, each rank half of
    the update's samples."""
    ranks = [ramp_runs("auto-ddp", rank) for rank in (0, 1)]
    decisions = read_decisions(output / "zero2-ramp" / "auto-ddp" / "out" / "legw_ramp_decisions.jsonl")
    assert len(decisions) >= 2 and decisions[0].old_batch == 4
    assert [[RampDecision.from_dict(d) for d in record["decisions"]] for record in ranks] == [decisions, decisions]
    estimates = [[(e.get("noise_scale/trace"), e.get("noise_scale/signal")) for e in r["logs"]] for r in ranks]
    assert estimates[0] == estimates[1]
    assert decisions_from_logs(ranks[0]["logs"]) == decisions
    want = auto_expected(ramp_from_decisions(decisions))
    batches = [batch for batch, _ in want]
    for record in ranks:
        assert record["global_step"] == record["max_steps"] == len(want)
        assert logged_learning_rates(record["logs"]) == pytest.approx([lr for _, lr in want], rel=1e-12)
        assert [len(update) for update in record["micro_batches"]] == [batch // 4 for batch in batches]
    updates = ramped_updates_of(ranks, regression_dataset(**NOISY_DATA))
    assert [sorted(u) for u in updates] == [sorted(u) for u in stream_slices(batches, dataset_size=128)]
    assert ranks[0]["params"] == ranks[1]["params"]


def test_an_automatic_ramp_under_zero2_measures_and_decides_as_under_ddp(ramp_runs):
    """--legw_batch_ramp auto in Trainer on 2 processes: under ZeRO-2 the statistics are taken inside the engine's
    step, on the accumulation the ramp sets update by update. The same run under plain DDP, in the same launch, is
    the reference (above); the decisions follow from the logged estimates by the rule, every update takes its batch's
    samples and LEGW's LR, and DeepSpeed counts the batch. (The accelerate loops' AutoRamp runs under ZeRO-1 and
    ZeRO-3 in test_sharded.py: the same measurement.)"""
    stage = 2
    runs = {name: [ramp_runs(name, rank) for rank in (0, 1)] for name in ("auto-ddp", f"auto-zero{stage}")}
    reference = runs["auto-ddp"][0]
    decisions = [RampDecision.from_dict(d) for d in reference["decisions"]]
    assert len(decisions) >= 2 and decisions[0].old_batch == 4
    assert decisions_from_logs(reference["logs"]) == decisions
    want = auto_expected(ramp_from_decisions(decisions))
    batches = [batch for batch, _ in want]
    for record in runs[f"auto-zero{stage}"] + runs["auto-ddp"][1:]:
        assert len(record["decisions"]) == len(decisions)
        for decision, wanted in zip(record["decisions"], reference["decisions"], strict=True):
            assert decision == pytest.approx(wanted, rel=1e-5)
        assert record["global_step"] == record["max_steps"] == len(want)
        assert [entry["legw_batch"] for entry in record["logs"]] == batches
        for key in ("learning_rate", "noise_scale/trace", "noise_scale/signal"):
            assert [e[key] for e in record["logs"]] == pytest.approx([e[key] for e in reference["logs"]], rel=1e-5)
        assert logged_learning_rates(record["logs"]) == pytest.approx([lr for _, lr in want], rel=1e-12)
        assert [len(update) for update in record["micro_batches"]] == [batch // 4 for batch in batches]
        assert relative(record["params"], reference["params"]) < 1e-5
    zero = runs[f"auto-zero{stage}"]
    for record in zero:
        check_engine_after_updates(record, batches, first=0, micro_step=4)
    assert zero[0]["params"] == zero[1]["params"]
    dataset = regression_dataset(**NOISY_DATA)
    updates = ramped_updates_of(zero, dataset)
    assert [sorted(u) for u in updates] == [sorted(u) for u in stream_slices(batches, dataset_size=128)]


# ----------------------------------------------------- the accelerate loop's ramp under ZeRO-2, resumed
LOOP_SAVED_AT = 10  # ramp_deepspeed.LOOP_SAVE_AT: inside the second stage (updates 8-11)


def loop_expected() -> list[tuple[int, float]]:
    """(batch, LR) of every update of the loop's ramp 8@0,16@1,32@2 over 3 epochs of 64 samples, written out."""
    stages = [(8, 0.0), (16, 1.0), (32, 2.0)]
    return written_out(stages, dataset_size=64, epochs=3, base_batch=8, base_lr=0.05, base_warmup_epochs=0.25)


def test_an_accelerate_ramp_under_zero2_resumed_from_its_state_ends_bit_identical(ramp_runs):
    """save_state after update 10, load_state (legw_hf.integrations.accelerate.load_state) at the same 2 processes:
    the same later updates, LRs and engine counts, and the uninterrupted run's weights bit for bit."""
    want = loop_expected()
    batches = [batch for batch, _ in want]
    whole = [ramp_runs("loop-full", rank) for rank in (0, 1)]
    for rank in (0, 1):
        resumed = ramp_runs("loop-resumed", rank)
        assert whole[rank]["lrs"] == pytest.approx([lr for _, lr in want], rel=1e-12)
        assert resumed["lrs"] == whole[rank]["lrs"][LOOP_SAVED_AT:]
        assert resumed["micro_batches"] == whole[rank]["micro_batches"][LOOP_SAVED_AT:]
        check_engine_after_updates(resumed, batches, first=LOOP_SAVED_AT, micro_step=4)
    assert ramp_runs("loop-resumed")["params"] == whole[0]["params"]


def test_an_accelerate_ramp_under_zero2_resumed_at_one_process_through_the_universal_checkpoint(ramp_runs, output):
    """The 2-process state loaded by one process through load_state: DeepSpeed refuses its own checkpoint at another
    world size, so the model's checkpoint is converted to its universal form and loaded from a view of the folder.
    Every later update takes the same samples at its LR, accumulating B / 2 micro-batches, and the run ends where
    the 2-process run ended (up to the order of the sums)."""
    want = loop_expected()
    batches = [batch for batch, _ in want]
    resumed, whole = ramp_runs("loop-r1"), [ramp_runs("loop-full", rank) for rank in (0, 1)]
    assert resumed["world_size"] == 1
    assert resumed["lrs"] == pytest.approx([lr for _, lr in want][LOOP_SAVED_AT:], rel=1e-12)
    assert [len(update) for update in resumed["micro_batches"]] == [b // 2 for b in batches[LOOP_SAVED_AT:]]
    check_engine_after_updates(resumed, batches, first=LOOP_SAVED_AT, micro_step=2)
    dataset = regression_dataset(64)
    later = [sorted(u) for u in ramped_updates_of(whole, dataset)[LOOP_SAVED_AT:]]
    assert [sorted(u) for u in ramped_updates_of([resumed], dataset)] == later
    assert relative(resumed["params"], whole[0]["params"]) < 1e-6
    # the saved state is as it was: the universal form and the view were written beside it
    state = output / "zero2-ramp" / "loop-state"
    assert (state / "universal_view" / "pytorch_model").resolve() == (state / "pytorch_model_universal").resolve()
    assert (state / "latest").read_text().strip() == "pytorch_model"


def test_a_zero3_state_of_another_world_size_is_refused_naming_the_checkpoint(output):
    """legw_hf re-shards ZeRO-1/2 checkpoints only: the same 2-rank checkpoints, read as ZeRO-3 ones by a run of one
    process, are refused (the accelerate state and the Trainer checkpoint), naming the setting that holds them."""
    from legw_hf.integrations.deepspeed import reshard_checkpoint, universal_state_view

    root = output / "zero2-ramp"
    trainer_checkpoint = root / "full" / "out" / f"checkpoint-{RAMP_SAVED_AT}"
    calls = {
        "input_dir": lambda: universal_state_view(root / "loop-state", stage=3, world_size=3, main_process=True),
        "resume_from_checkpoint": lambda: reshard_checkpoint(
            str(trainer_checkpoint), {"zero_optimization": {"stage": 3}}, world_size=3, main_process=True
        ),
    }
    for field, call in calls.items():
        with pytest.raises(SettingError) as refused:
            call()
        assert refused.value.field == field
        assert "was saved by 2 DeepSpeed ranks and this run has 3: legw_hf re-shards ZeRO-1/2" in str(refused.value)
