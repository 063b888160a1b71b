"""Lamb and Lars under DeepSpeed ZeRO 0-3 and FSDP2, 2 CPU processes over gloo, against one process.

Each launch trains every optimizer configuration sharded and with the sharding awareness switched off; the
aware runs must match the single-process run with the same global batch to 1e-5 (relative parameter error), the
naive ones must be far off (so the comparison can fail), and the norms of a ``step()`` call must take one
all-reduce (two with the nvidia preset's pre-normalisation under FSDP2, where the global gradient norm is a
reduction of its own; under ZeRO it comes from DeepSpeed).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from launch import launch
from legw_oracle import legw_poly_lr
from procs import REPO
from toy import Regressor, legw_training_args, logged_learning_rates, regression_dataset

from legw_hf import LegwTrainer

pytestmark = pytest.mark.multiprocess
SCRIPTS = REPO / "tests" / "scripts"
CONFIGS = ("lamb-nvidia", "lamb-deepspeed", "lamb-optax", "lamb-optax-torch-ops", "lars")


def check_parity(result: dict, engines: list[str], configs: tuple[str, ...] = CONFIGS) -> None:
    for engine in engines:
        assert sorted(result[engine]) == sorted(configs)
        for name, numbers in result[engine].items():
            assert numbers["step_calls"] > 0
            if engine.endswith("bf16"):
                # against DeepSpeed's unsharded bf16 run: bf16 rounding differs with the reduction order
                assert numbers["aware"] < 2.5e-2, (engine, name, numbers)
                naive = numbers["naive"]
                assert engine == "zero0-bf16" or not math.isfinite(naive) or naive > max(2e-2, 10 * numbers["aware"])
            else:
                assert numbers["aware"] < 1e-5, (engine, name, numbers)
                assert numbers["trust_ratios"] < 1e-4, (engine, name, numbers)
                if engine != "zero0":  # ZeRO-0 keeps whole tensors: awareness changes nothing there
                    assert numbers["naive"] > 1e-3, (engine, name, numbers)
            # pre-normalisation needs a global norm of its own where all groups are stepped in one call
            own_norm = (engine.startswith("fsdp2") or engine == "zero1-bf16") and name == "lamb-nvidia"
            expected = 0 if engine.startswith("zero0") else 2 if own_norm else 1
            assert numbers["reduces_per_step_call"] == expected, (engine, name, numbers)


def test_deepspeed_zero_0_to_3_match_one_process(tmp_path):
    output = tmp_path / "result.json"
    launch("deepspeed", SCRIPTS / "sharded_parity.py", "deepspeed", output)
    result = json.loads(output.read_text())
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
        legw_poly_lr(n, base_lr=0.02, base_batch=4, batch=8, base_warmup_epochs=0.25, epochs=4, steps_per_epoch=5)
        for n in range(20)
    ]
    assert checks["scheduled_lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)
    # DeepSpeed's clipping (default 1.0) and LAMB's pre-normalisation would both run: refused at the first step
    assert checks["double_clipping"].startswith("gradient_clipping must be 0 in the DeepSpeed config")


def test_fsdp2_matches_one_process(tmp_path):
    output = tmp_path / "result.json"
    launch("torchrun", SCRIPTS / "sharded_parity.py", "fsdp2", output)
    result = json.loads(output.read_text())
    # fsdp2-accelerate: the optimizer built on the plain model, its parameters swapped by accelerate's FSDP2 code
    check_parity(result, ["fsdp2", "fsdp2-accelerate"])
    # half the steps, a torch.distributed.checkpoint of model and optimizer, a fresh start from it, the rest
    assert result["fsdp2-resume"] == dict.fromkeys(CONFIGS, 0.0)
    # torch's GradScaler: only the overflowed third step leaves weights and step counters as they were
    assert result["fsdp2-gradscaler"] == {"unchanged": [False, False, True, False], "scale": 2.0**9}


def test_triton_kernels_under_fsdp2_and_zero_match_one_process(tmp_path):
    """fused="triton" (interpreted on CPU): the kernels' partial squares of FSDP2 shards and of ZeRO-2 flat
    partitions (pieces at any offset, so unaligned addresses too) pass the one all-reduce and match one process."""
    fsdp2, zero = tmp_path / "fsdp2.json", tmp_path / "zero.json"
    launch("torchrun", SCRIPTS / "sharded_parity.py", "fsdp2-triton", fsdp2)
    launch("deepspeed", SCRIPTS / "sharded_parity.py", "deepspeed-triton", zero)
    configs = ("lamb-nvidia", "lars")
    check_parity(json.loads(fsdp2.read_text()), ["fsdp2-triton"], configs)
    check_parity(json.loads(zero.read_text()), ["zero2-triton"], configs)


@pytest.mark.parametrize("stage", ["2", "3", "2-offload"])
def test_trainer_with_deepspeed_and_lamb_follows_the_plan_and_matches_one_process(tmp_path, stage):
    resume = "resume"
    launch("deepspeed", SCRIPTS / "trainer_deepspeed.py", tmp_path, stage, "nvidia", resume)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # per-device 4 x accumulation 2 x 2 processes = 16, as in the one-process run with per-device 8; 96 examples
    # make whole batches, so both runs see the same samples in each update
    reference_args = legw_training_args(
        tmp_path / "single",
        num_train_epochs=2,
        legw_optimizer="lamb",
        legw_optimizer_preset="nvidia",
        weight_decay=0.01,
    )
    reference = LegwTrainer(model=Regressor(), args=reference_args, train_dataset=regression_dataset(96))
    reference.train()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.model.parameters()])
    planned = [
        legw_poly_lr(n, base_lr=0.05, base_batch=4, batch=16, base_warmup_epochs=0.1, epochs=2, steps_per_epoch=6)
        for n in range(12)
    ]
    assert logged_learning_rates(reference.state.log_history) == pytest.approx(planned, rel=1e-12)
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


def test_trainer_with_a_deepspeed_adamw_block_is_driven_by_the_plan(tmp_path):
    # DeepSpeed builds the optimizer from the config's "optimizer" block and steps Trainer's LegwScheduler itself
    result = launch("deepspeed", SCRIPTS / "trainer_deepspeed.py", tmp_path, "2", "adamw-block")
    assert (
        'DeepSpeed builds the optimizer from the config\'s "optimizer" block (AdamW)' in result.stdout + result.stderr
    )
    planned = [
        legw_poly_lr(n, base_lr=0.05, base_batch=4, batch=16, base_warmup_epochs=0.1, epochs=2, steps_per_epoch=6)
        for n in range(12)
    ]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["applied_lrs"] == pytest.approx(planned, rel=1e-12, abs=1e-15)
