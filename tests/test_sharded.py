"""Lamb and Lars under DeepSpeed ZeRO 0-3 and FSDP2, 2 CPU processes over gloo, against one process.

One launch per engine family (DeepSpeed, FSDP2) trains every optimizer configuration sharded on ZeRO 1-3 and FSDP2,
the two whose norms reduce differently on each engine variant (ZeRO-0, bf16, offload, the Triton kernels...), and
those two with the sharding awareness switched off (not on ZeRO-0, which keeps whole tensors); the aware runs must
match the single-process run with the same global batch to 1e-5 (relative parameter error), the naive ones must be far
off (so the comparison can fail), and the norms of a ``step()`` call must take one
all-reduce (two with the nvidia preset's pre-normalisation under FSDP2, where the global gradient norm is a
reduction of its own; under ZeRO it comes from DeepSpeed).

LegwTrainer's DeepSpeed launch also runs a batch ramp in accelerate loops under ZeRO-1 and ZeRO-3 (the Trainer's
ramp under ZeRO-2 is in tests/test_elastic.py, whose launches resume it at another world size); the FSDP2 launch runs
one in an accelerate loop and one in LegwTrainer, each with a mid-ramp resume.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from launch import launch
from legw_oracle import legw_poly_lr
from optim_registry import SHARDED, SHARDED_EVERY_CONFIG, SHARDED_FEW, makes_naive_run
from procs import REPO
from test_ramp import written_out
from test_trainer_ramp import check_samples_and_replay, expected as ramp_expected
from toy import (
    Regressor,
    legw_training_args,
    logged_learning_rates,
    ramped_updates_of,
    regression_dataset,
    replayed_weights,
)

from legw_hf import LegwTrainer

pytestmark = pytest.mark.multiprocess
SCRIPTS = REPO / "tests" / "scripts"


def check_parity(result: dict, engines: list[str]) -> None:
    for engine in engines:
        assert sorted(result[engine]) == sorted(SHARDED if engine in SHARDED_EVERY_CONFIG else SHARDED_FEW), engine
        for name, numbers in result[engine].items():
            assert numbers["step_calls"] > 0
            naive = numbers["naive"]
            # the unaware run, where one was made, shows that the comparison can fail
            assert (naive is not None) == makes_naive_run(engine, name), (engine, name)
            if engine.endswith("bf16"):
                # against DeepSpeed's unsharded bf16 run: bf16 rounding differs with the reduction order
                assert numbers["aware"] < 2.5e-2, (engine, name, numbers)
                far_off = naive is None or not math.isfinite(naive) or naive > max(2e-2, 10 * numbers["aware"])
                assert engine == "zero0-bf16" or far_off, (engine, name, numbers)
            else:
                assert numbers["aware"] < 1e-5, (engine, name, numbers)
                assert numbers["trust_ratios"] < 1e-4, (engine, name, numbers)
                if engine != "zero0" and naive is not None:  # ZeRO-0 keeps whole tensors: awareness changes nothing
                    # Non-finite counts as far off: ZeRO-3 pads the last rank's partition of a tensor that does not
                    # split evenly with memory it never initialises (partition_parameters.py, torch.empty), and the
                    # unaware run takes that padding into its norms, so it ends NaN when the garbage does.
                    assert not math.isfinite(naive) or naive > 1e-3, (engine, name, numbers)
            # pre-normalisation needs a global norm of its own where all groups are stepped in one call
            own_norm = (engine.startswith("fsdp2") or engine == "zero1-bf16") and name == "lamb-nvidia"
            expected = 0 if engine.startswith("zero0") else 2 if own_norm else 1
            assert numbers["reduces_per_step_call"] == expected, (engine, name, numbers)


@pytest.fixture(scope="module")
def deepspeed_parity(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("deepspeed") / "result.json"
    launch("deepspeed", SCRIPTS / "sharded_parity.py", "deepspeed", output)
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def fsdp2_parity(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("fsdp2") / "result.json"
    launch("torchrun", SCRIPTS / "sharded_parity.py", "fsdp2", output)
    return json.loads(output.read_text())


def test_deepspeed_zero_0_to_3_match_one_process(deepspeed_parity):
    result = deepspeed_parity
    engines = ["zero0", "zero1", "zero2", "zero3", "zero3-persistent", "zero0-bf16", "zero2-bf16", "zero3-bf16"]
    engines.append("zero1-bf16")  # DeepSpeed's BF16_Optimizer (fp32 gradient accumulation)
    engines += ["zero2-offload", "zero3-offload"]  # optimizer offloaded to the host, legw_hf's optimizer kept
    check_parity(result, engines)
    # ZeRO-2 in bf16 is DeepSpeed's unsharded bf16 run bit for bit, whose fp16/bf16 wrapper calls step() once on
    # zero gradients at start-up to create state (a LAMB step there would move the weights)
    assert result["zero2-bf16"]["lamb-nvidia"]["aware"] == 0.0 == result["zero2-bf16"]["lars"]["aware"]

    checks = result["checks"]
    # a LegwScheduler handed to deepspeed.initialize drives the LR of every update (8 examples a step, 5 a epoch)
    planned = [
        legw_poly_lr(n, base_lr=0.02, base_batch=4, batch=8, base_warmup_epochs=0.25, epochs=2, steps_per_epoch=5)
        for n in range(10)
    ]
    assert checks["scheduled_lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)
    # DeepSpeed's clipping (default 1.0) and LAMB's pre-normalisation would both run: refused at the first step
    assert checks["double_clipping"].startswith("gradient_clipping must be 0 in the DeepSpeed config")


def test_fsdp2_matches_one_process(fsdp2_parity):
    result = fsdp2_parity
    # fsdp2-accelerate: the optimizer built on the plain model, its parameters swapped by accelerate's FSDP2 code
    check_parity(result, ["fsdp2", "fsdp2-accelerate"])
    # half the steps, a torch.distributed.checkpoint of model and optimizer, a fresh start from it, the rest
    assert result["fsdp2-resume"] == dict.fromkeys(SHARDED, 0.0)
    # torch's GradScaler: only the overflowed third step leaves weights and step counters as they were
    assert result["fsdp2-gradscaler"] == {"unchanged": [False, False, True, False], "scale": 2.0**9}


#: tests/scripts/fsdp2_ramp.py's ramp: 32 samples, 2 epochs, 2 processes of 2 samples per micro-batch.
FSDP2_RAMP = {"stages": [(4, 0.0), (8, 0.25), (16, 1.0)], "dataset_size": 32, "epochs": 2}


def test_a_batch_ramp_under_fsdp2_takes_each_stage_batch_at_its_lr_with_the_mean_gradient(fsdp2_parity):
    """accelerate's FSDP2 (its prepare, no_sync, save_state): every update of the ramp takes its stage's batch, as
    consecutive samples dealt over the 2 processes, at LEGW's LR for that batch; its gradient is the mean over all
    its samples, reduce-scattered once, after the last micro-batch; LAMB over the shards ends where one process does."""
    ramp = fsdp2_parity["fsdp2-ramp"]
    expected = written_out(
        FSDP2_RAMP["stages"],
        dataset_size=FSDP2_RAMP["dataset_size"],
        epochs=FSDP2_RAMP["epochs"],
        base_batch=4,
        base_lr=0.02,
        base_warmup_epochs=0.25,
    )
    updates = ramp["updates"]
    assert [u["update"] for u in updates] == list(range(7))
    assert [u["batch"] for u in updates] == [batch for batch, _ in expected] == [4, 4, 8, 8, 8, 16, 16]
    assert [u["accumulation"] for u in updates] == [1, 1, 2, 2, 2, 4, 4]  # batch / (2 per device x 2 processes)
    assert [u["lr"] for u in updates] == pytest.approx([lr for _, lr in expected], rel=1e-12, abs=1e-15)
    start = 0
    for update in updates:
        batch = update["batch"]
        assert [len(ids) for ids in update["ids"]] == [batch // 2, batch // 2]
        assert sorted(update["ids"][0] + update["ids"][1]) == [(start + i) % 32 for i in range(batch)]
        start += batch
    # no_sync under FSDP2: the micro-batches before the last left no (sharded) gradient, they were not reduced
    assert [u["grads_before_last"] for u in updates] == [False] * 7
    # each update's gradient, gathered whole, is one process's gradient of the mean loss over the update's batch
    assert all(u["gradient_error"] < 1e-5 for u in updates), [u["gradient_error"] for u in updates]
    assert ramp["parameters_error"] < 1e-5
    assert ramp["trust_ratio_error"] < 1e-4  # LAMB's trust ratios of the whole tensors, from their shards


def test_a_batch_ramp_under_fsdp2_resumed_mid_ramp_ends_bit_identical(fsdp2_parity):
    """Stopped after 3 of 7 updates (inside the batch-8 stage) with accelerate's ``save_state`` (the sharded model
    and optimizer through torch.distributed.checkpoint, the scheduler's progress), a new run's ``load_state``: the
    updates left, at the same LRs with the same gradients, end with the uninterrupted run's weights bit for bit."""
    ramp = fsdp2_parity["fsdp2-ramp"]
    assert ramp["resumed_updates"] == [3, 4, 5, 6]
    assert ramp["resumed_lrs_equal"] and ramp["resumed_gradients_equal"]
    assert ramp["resumed_bit_identical"] and ramp["resumed_error"] == 0.0


def test_an_automatic_ramp_under_fsdp2_is_refused(fsdp2_parity):
    refusal = fsdp2_parity["fsdp2-ramp"]["auto_ramp_refusal"]
    assert refusal is not None and refusal.startswith("batch_ramp takes no AutoRamp under FSDP: each micro-batch's")
    assert "reduce-scattered into shards" in refusal and "got 'FSDP'" in refusal


#: tests/scripts/trainer_fsdp2_ramp.py: the checkpoint after update 16, inside the second stage (updates 13-18)
TRAINER_RAMP_SAVED_AT = 16


def test_a_trainer_ramp_under_fsdp2_takes_each_update_s_batch_samples_and_lr_with_one_reduction(fsdp2_parity):
    """LegwTrainer's --legw_batch_ramp 8@0,16@1,32@2 over 100 samples, per-device 2 on 2 processes, under Trainer's
    own FSDP2 path (tests/scripts/trainer_fsdp2_ramp.py: accelerate's state forced to FSDP2 on CPU, then Trainer's
    and accelerate's code): every update accumulates B / 4 micro-batch steps of the ramp's sample stream at LEGW's LR
    for B, with no gradient before its last micro-batch's backward, and the weights are one process's replay."""
    runs = fsdp2_parity["trainer-fsdp2-ramp"]
    want = ramp_expected()
    batches, lrs = [batch for batch, _ in want], [lr for _, lr in want]
    ranks = runs["full"]
    for record in ranks:
        assert (record["world_size"], record["global_step"]) == (2, len(want))
        # sharded by accelerate's FSDP2 prepare, not the DDP that Trainer's --fsdp alone gives on CPU
        assert record["distributed_type"] == "FSDP" and record["dtensor_parameters"]
        assert record["lrs"] == pytest.approx(lrs, rel=1e-12)
        assert [len(update) for update in record["micro_batches"]] == [batch // 4 for batch in batches]
        assert all(len(micro) == 2 for update in record["micro_batches"] for micro in update)
        # set_requires_gradient_sync(False) on all but the last: nothing was reduce-scattered into the sharded
        # gradients before the update's last backward
        assert record["grads_before_micro_batches"] == [[False] * (batch // 4) for batch in batches]
    assert ranks[0]["params"] == ranks[1]["params"]
    check_samples_and_replay(ranks, want)  # the optimizer stepped once per update on the summed shards


def test_a_trainer_ramp_under_fsdp2_resumed_mid_ramp_ends_bit_identical(fsdp2_parity):
    """The checkpoint Trainer saved after update 16 through its FSDP path (save_fsdp_model / save_fsdp_optimizer),
    resumed by a new Trainer (load_fsdp_model / load_fsdp_optimizer): the updates left take the uninterrupted run's
    LRs and micro-batches and end at its weights bit for bit."""
    runs = fsdp2_parity["trainer-fsdp2-ramp"]
    lrs = [lr for _, lr in ramp_expected()]
    files = set(runs["full"][0]["checkpoint_files"])
    # Trainer's FSDP checkpoint (FULL_STATE_DICT): the model as pytorch_model_fsdp.bin, the optimizer as
    # optimizer.bin (the DDP path writes optimizer.pt)
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt"} <= files and "optimizer.pt" not in files
    for whole, resumed in zip(runs["full"], runs["resumed"], strict=True):
        assert resumed["distributed_type"] == "FSDP" and resumed["global_step"] == len(lrs)
        assert resumed["lrs"] == pytest.approx(lrs[TRAINER_RAMP_SAVED_AT:], rel=1e-12)
        assert resumed["micro_batches"] == whole["micro_batches"][TRAINER_RAMP_SAVED_AT:]
        assert resumed["params"] == whole["params"]


def test_triton_kernels_under_fsdp2_and_zero_match_one_process(fsdp2_parity, deepspeed_parity):
    """impl="triton" (interpreted on CPU): the kernels' partial squares of FSDP2 shards and of ZeRO-2 flat
    partitions (pieces at any offset, so unaligned addresses too) pass the one all-reduce and match one process."""
    check_parity(fsdp2_parity, ["fsdp2-triton"])
    check_parity(deepspeed_parity, ["zero2-triton"])


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory) -> tuple[Path, str]:
    """Every scenario of tests/scripts/trainer_deepspeed.py, in one launch: its output folder and its log."""
    output = tmp_path_factory.mktemp("trainer_deepspeed")
    result = launch("deepspeed", SCRIPTS / "trainer_deepspeed.py", output)
    return output, result.stdout + result.stderr


def ranks_of(trainer_runs: tuple[Path, str], scenario: str) -> list[dict]:
    return [json.loads((trainer_runs[0] / scenario / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory) -> torch.Tensor:
    """The parameters of the same Trainer run in one process with per-device 8 (the global batch of 16)."""
    reference_args = legw_training_args(
        tmp_path_factory.mktemp("single"),
        num_train_epochs=2,
        legw_optimizer="lamb",
        legw_optimizer_preset="nvidia",
        weight_decay=0.01,
    )
    reference = LegwTrainer(model=Regressor(), args=reference_args, train_dataset=regression_dataset(96))
    reference.train()
    planned = [
        legw_poly_lr(n, base_lr=0.05, base_batch=4, batch=16, base_warmup_epochs=0.1, epochs=2, steps_per_epoch=6)
        for n in range(12)
    ]
    assert logged_learning_rates(reference.state.log_history) == pytest.approx(planned, rel=1e-12)
    return torch.cat([p.detach().reshape(-1) for p in reference.model.parameters()])


@pytest.mark.parametrize("scenario", ["zero2", "zero3", "zero2-offload"])
def test_trainer_with_deepspeed_and_lamb_follows_the_plan_and_matches_one_process(
    trainer_runs, one_process_reference, scenario
):
    resume = "resume"
    ranks = ranks_of(trainer_runs, scenario)
    # per-device 4 x accumulation 2 x 2 processes = 16, as in the one-process run with per-device 8; 96 examples
    # make whole batches, so both runs see the same samples in each update
    expected = one_process_reference
    planned = [
        legw_poly_lr(n, base_lr=0.05, base_batch=4, batch=16, base_warmup_epochs=0.1, epochs=2, steps_per_epoch=6)
        for n in range(12)
    ]
    for record in ranks:
        assert record["world_size"] == 2 and record["plan"]["batch"] == 16
        assert record["lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)
        assert record["applied_lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)
        # the LAMB pre-normalises, so DeepSpeed's clipping was turned off: gradients are clipped once
        assert record["gradient_clipping"] == 0.0
        assert record["trust_keys"] == ["trust_ratio/max", "trust_ratio/median", "trust_ratio/min"]
        # with the optimizer offloaded too: accelerate would have swapped in DeepSpeedCPUAdam
        assert record["optimizer_class"] == "Lamb"
        actual = torch.tensor(record["params"])
        error = float((actual - expected).norm() / expected.norm())
        assert error < 1e-5 and math.isfinite(error)
        if resume == "resume":
            # stopped after 5 updates with a DeepSpeed checkpoint, resumed by a new Trainer: the same weights
            assert record["resumed"]["params"] == record["params"]
            assert record["resumed"]["lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)  # log_history resumes too


def test_trainer_with_a_deepspeed_adamw_block_is_driven_by_the_plan(trainer_runs):
    # DeepSpeed builds the optimizer from the config's "optimizer" block and steps Trainer's LegwScheduler itself
    ranks = ranks_of(trainer_runs, "adamw-block")
    assert all(record["optimizer_class"] == "AdamW" for record in ranks)
    assert 'DeepSpeed builds the optimizer from the config\'s "optimizer" block (AdamW)' in trainer_runs[1]
    planned = [
        legw_poly_lr(n, base_lr=0.05, base_batch=4, batch=16, base_warmup_epochs=0.1, epochs=2, steps_per_epoch=6)
        for n in range(12)
    ]
    for record in ranks:
        assert record["applied_lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("stage", [1, 3])
def test_an_accelerate_ramp_under_zero_1_and_3_takes_each_update_s_batch_samples_and_lr(trainer_runs, stage):
    """tests/scripts/ramp_deepspeed.py's loop (same launch): ``ramped_updates`` with a DeepSpeed plugin, ramp
    8@0,16@1,32@2 over 3 epochs of 64 samples, per-device 2 on 2 processes, SGD with momentum."""
    folder = trainer_runs[0] / "ramp" / f"loop-zero{stage}"
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    want = written_out(
        [(8, 0.0), (16, 1.0), (32, 2.0)], dataset_size=64, epochs=3, base_batch=8, base_lr=0.05, base_warmup_epochs=0.25
    )
    batches, lrs = [batch for batch, _ in want], [lr for _, lr in want]
    assert batches == [8] * 8 + [16] * 4 + [32] * 2
    for record in ranks:
        assert record["lrs"] == pytest.approx(lrs, rel=1e-12, abs=1e-15)
        # batch B: B / (2 x 2 processes) micro-batches of 2 on each rank
        assert [len(update) for update in record["micro_batches"]] == [batch // 4 for batch in batches]
        assert all(len(micro) == 2 for update in record["micro_batches"] for micro in update)
        # DeepSpeed's own count after each update: its accumulation and batch, the samples and updates so far
        assert [(row["accumulation"], row["batch"]) for row in record["engine"]] == [(b // 4, b) for b in batches]
        assert [row["global_samples"] for row in record["engine"]] == list(itertools.accumulate(batches))
        assert [row["global_steps"] for row in record["engine"]] == list(range(1, len(batches) + 1))
        # the engine's micro-batch must be the loader's
        micro_batch = record["refusals"]["micro_batch"]
        assert micro_batch["field"] == "train_micro_batch_size_per_gpu"
        assert "must be the dataloader's per-device batch (4)" in micro_batch["message"]
    dataset = regression_dataset(64)
    updates = ramped_updates_of(ranks, dataset)
    stream = [sample for update in updates for sample in update]
    # every data pass (updates 0-7, 8-11, 12-13) takes each sample once
    assert [sorted(stream[start : start + 64]) for start in (0, 64, 128)] == [list(range(64))] * 3
    # one process stepping once per update on all of its samples ends at the same weights: the engine divided each
    # micro-batch's loss by the update's accumulation and stepped once per update
    expected = replayed_weights(updates, lrs, dataset, functools.partial(torch.optim.SGD, lr=0.0, momentum=0.9))
    error = float((torch.tensor(ranks[0]["params"]) - expected).norm() / expected.norm())
    assert error < 1e-6


@pytest.mark.parametrize("stage", [1, 3])
def test_an_automatic_ramp_under_zero_1_and_3_measures_and_decides_as_under_ddp(trainer_runs, stage):
    """tests/scripts/ramp_deepspeed.py's automatic-ramp loops (same launch): under a DeepSpeed plugin the statistics
    are taken inside the engine's step, on the update-by-update accumulation the ramp sets; the same AutoRamp under
    plain DDP (whose statistics are checked against one process elsewhere) is the reference."""
    from legw_hf.ramp import AutoRamp, RampController

    runs = {
        name: [json.loads((trainer_runs[0] / "ramp" / f"auto-{name}" / f"rank{r}.json").read_text()) for r in (0, 1)]
        for name in ("ddp", f"zero{stage}")
    }
    reference = runs["ddp"][0]
    assert reference["decisions"], "the noisy data must make the ramp double at least once"
    for record in runs[f"zero{stage}"] + runs["ddp"][1:]:
        assert len(record["decisions"]) == len(reference["decisions"])
        for decision, wanted in zip(record["decisions"], reference["decisions"], strict=True):
            assert decision == pytest.approx(wanted, rel=1e-5)
        assert [row["batch"] for row in record["rows"]] == [row["batch"] for row in reference["rows"]]
        for key in ("lr", "trace", "signal"):
            assert [row[key] for row in record["rows"]] == pytest.approx(
                [row[key] for row in reference["rows"]], rel=1e-5
            ), key
    # the decisions follow from the logged estimates by the rule, and every update takes LEGW's LR for its batch
    settings = {"max_batch": 32, "patience": 2, "start_batch": 8, "efficiency": 0.6}
    controller = RampController(AutoRamp(**settings), 8, dataset_size=64, epochs=3)
    samples = 0
    for update, row in enumerate(reference["rows"]):
        samples += row["batch"]
        controller.observe(update=update, samples=samples, trace=row["trace"], signal=row["signal"])
    assert [d.to_dict() for d in controller.decisions] == reference["decisions"]
    stages = [(8, 0.0)] + [(d["new_batch"], d["epoch"]) for d in reference["decisions"]]
    want = written_out(stages, dataset_size=64, epochs=3, base_batch=8, base_lr=0.05, base_warmup_epochs=0.25)
    assert [row["batch"] for row in reference["rows"]] == [batch for batch, _ in want]
    assert [row["lr"] for row in reference["rows"]] == pytest.approx([lr for _, lr in want], rel=1e-12)


def test_what_a_deepspeed_plugin_s_config_must_not_hold_beside_the_scheduler_is_refused(trainer_runs):
    """tests/scripts/ramp_deepspeed.py's plugin_refusals (same launch), before any model is prepared: an AutoRamp
    under DeepSpeed's fp16 loss scaling (its scale may change inside the step that is measured), and a "scheduler"
    block (DeepSpeed would run a second schedule beside the plan), with a scheduled ramp or without one."""
    scheduler_block = 'config must not have a "scheduler" block with LEGW on'
    wanted = {
        "auto-fp16": ("batch_ramp", "AutoRamp is not supported with DeepSpeed's fp16 loss scaling"),
        "scheduler-block": ("deepspeed", scheduler_block),
        "ramp-scheduler-block": ("deepspeed", scheduler_block),
    }
    for rank in (0, 1):
        refused = json.loads((trainer_runs[0] / "ramp" / "refusals" / f"rank{rank}.json").read_text())
        assert refused.keys() == wanted.keys()
        for name, (field, words) in wanted.items():
            assert refused[name]["field"] == field and words in refused[name]["message"], name
