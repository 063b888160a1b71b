"""``legw-hf pretrain`` under the launchers, 2 CPU processes over gloo: torchrun (DDP) and DeepSpeed's launcher
with ZeRO-3. The global batch is split over the processes (the accumulation halves), the LR of every update is
NVIDIA's formula for it, and the ZeRO-3 run (phase 2 from phase 1's partitioned moments through DeepSpeed's own
checkpoint; its checkpoints hold no model files, so the evaluation and the averaging read them through DeepSpeed's
consolidation) ends where the DDP run does, in both phases and after averaging."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from legw_oracle import nvidia_lr
from pretraining_run import PHASES, launch, run_program, small_args
from safetensors.torch import load_file

from legw_hf.averaging import checkpoint_weights

pytestmark = pytest.mark.multiprocess

ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3},
}
# Half of the per-device batch of the one-process tests: the same global batch over 2 processes.
SPLIT = {"phase1_per_device_batch_size": "8", "phase2_per_device_batch_size": "4", "use_cpu": "true"}
# The runs evaluate during training at update 11 only (phase 1: 11 and 22 of 22 updates, phase 2: 11 of 11), not
# every eighth of a phase: each evaluation costs more than the updates between them at this size, and the checks
# read the plan, the weights and the final evaluation. Both phases still evaluate under DDP and under ZeRO-3.
FEW_EVALUATIONS = {"eval_steps": "11"}


@pytest.fixture(scope="module")
def ddp(corpus, tmp_path_factory) -> tuple[Path, str]:
    output_dir = tmp_path_factory.mktemp("ddp") / "out"
    output = run_program(small_args(corpus, output_dir, **SPLIT, **FEW_EVALUATIONS), "torchrun")
    return output_dir, output


@pytest.fixture(scope="module")
def zero3(corpus, tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("zero3")
    config = folder / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    output_dir = folder / "out"
    args = small_args(corpus, output_dir, **SPLIT, **FEW_EVALUATIONS, deepspeed=str(config))
    return output_dir, run_program(args, "deepspeed")


def last_checkpoint(phase_dir: Path) -> Path:
    return phase_dir / json.loads((phase_dir / "phase_complete.json").read_text())["checkpoint"]


def relative_difference(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    squares = sum(float((reference[k].double() - other[k].double()).norm() ** 2) for k in reference)
    return math.sqrt(squares / sum(float(reference[k].double().norm() ** 2) for k in reference))


def test_under_torchrun_the_global_batch_is_split_over_the_processes_on_the_plan(ddp):
    output_dir, output = ddp
    assert "global batch 32 = 8 per device x 2 accumulation x 2 processes" in output
    assert "global batch 32 = 4 per device x 4 accumulation x 2 processes" in output
    assert output.count("***** Pretraining report *****") == 1  # the main process reports
    plan = json.loads((output_dir / "pretraining_plan.json").read_text())
    for phase in plan["phases"]:
        name, p = phase["name"], phase["plan"]
        _, _, batch, _, base_batch, base_lr, base_warmup, epochs = PHASES[name]
        total = math.ceil(epochs * math.ceil(p["dataset_size"] / batch))
        warmup_fraction = base_warmup / math.ceil(p["dataset_size"] / base_batch) * (batch / base_batch) / epochs
        state = json.loads((last_checkpoint(output_dir / name) / "trainer_state.json").read_text())
        logged = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
        assert sorted(logged) == list(range(1, total + 1))
        peak = base_lr * math.sqrt(batch / base_batch)
        for step, lr in logged.items():
            assert lr == pytest.approx(nvidia_lr(step, peak=peak, total=total, warmup_fraction=warmup_fraction))


def test_zero3_carries_phase_1s_moments_into_phase_2_and_ends_where_ddp_does(ddp, zero3):
    ddp_dir, _ = ddp
    zero3_dir, output = zero3
    assert "Optimizer moments carried over from" in output
    for name in ("phase1", "phase2"):
        checkpoint = last_checkpoint(zero3_dir / name)
        assert not list(checkpoint.glob("model*.safetensors"))  # ZeRO-3 saved only its partitions
        reference = load_file(last_checkpoint(ddp_dir / name) / "model.safetensors")
        assert relative_difference(reference, checkpoint_weights(checkpoint)) < 1e-5, name
    reference = load_file(ddp_dir / "averaged" / "model.safetensors")
    assert relative_difference(reference, load_file(zero3_dir / "averaged" / "model.safetensors")) < 1e-5
    ddp_report = json.loads((ddp_dir / "report.json").read_text())["validation"]
    zero3_report = json.loads((zero3_dir / "report.json").read_text())["validation"]
    for model, results in ddp_report.items():
        for validation, metrics in results.items():
            assert zero3_report[model][validation]["mlm_loss"] == pytest.approx(metrics["mlm_loss"], rel=1e-4)


def test_a_global_batch_the_processes_cannot_form_is_refused_before_anything_is_written(corpus, tmp_path):
    output_dir = tmp_path / "out"
    args = small_args(corpus, output_dir, **{**SPLIT, "phase1_global_batch_size": "24"})
    proc = launch(args, "torchrun")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "--phase1_global_batch_size must be a multiple of per-device batch × processes = 8 × 2 = 16" in output
    assert not output_dir.exists()
