"""LegwTrainer runs under ``deepspeed --num_gpus 2`` (CPU), one launch for every scenario of :data:`SCENARIOS`: for
each, every rank writes its plan, the LR of every update, the trust-ratio log keys and the final parameters as JSON
to ``OUTPUT/SCENARIO/rank{r}.json``. Then, in the same launch, the batch-ramp loops of ``ramp_deepspeed.py`` (an
accelerate loop with a DeepSpeed plugin, ZeRO-1 and ZeRO-3) into ``OUTPUT/ramp``.

    deepspeed --num_gpus 2 tests/scripts/trainer_deepspeed.py OUTPUT [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from test_trainer import StopAt
from toy import Regressor, legw_training_args, logged_learning_rates, regression_dataset
from transformers import TrainerCallback

from legw_hf import LegwTrainer
from legw_hf.shutdown import exit_process


class AppliedLearningRates(TrainerCallback):
    """The LR in the innermost optimizer's first group as each update's micro-batches begin: the LR that update
    applies. (Under DeepSpeed the update and the scheduler step happen inside the last backward, so the LR Trainer
    logs after it, and the one ``on_pre_optimizer_step`` sees, are already the next update's.)"""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(float(_innermost(optimizer).param_groups[0]["lr"]))


def fresh_accelerator_state() -> None:
    """Each Trainer here brings its own DeepSpeed plugin; accelerate keeps one per process unless told to forget."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def legw_scheduler(scheduler):
    while not hasattr(scheduler, "plan"):  # accelerate wraps the scheduler DeepSpeed built
        scheduler = scheduler.scheduler
    return scheduler


def _innermost(optimizer):
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def flat_parameters(trainer: LegwTrainer) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).tolist()


#: scenario: (ZeRO stage, LAMB preset or "adamw-block", whether to stop after 5 updates and resume). ZeRO-3 runs
#: last: its model construction under zero.Init is process-wide state the others should not see.
SCENARIOS = {
    "zero2": ("2", "nvidia", "resume"),
    "zero2-offload": ("2-offload", "nvidia", "resume"),
    "adamw-block": ("2", "adamw-block", "no"),
    "zero3": ("3", "nvidia", "resume"),
}


def main(output: str, *scenarios: str) -> None:
    for name in scenarios or SCENARIOS:
        fresh_accelerator_state()
        run(str(Path(output) / name), *SCENARIOS[name])
    if not scenarios:
        from ramp_deepspeed import loops  # it imports this module's helpers

        loops(str(Path(output) / "ramp"))


def run(output: str, stage: str, preset: str, resume: str = "no") -> None:
    """``preset`` "adamw-block": no --legw_optimizer; the DeepSpeed config's "optimizer" block builds torch AdamW."""
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": int(stage.split("-")[0]) if stage != "ddp" else 0},
    }
    if stage.endswith("-offload"):  # legw_hf sets zero_force_ds_cpu_optimizer false so the LAMB is kept
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    optimizer_flags = {"legw_optimizer": "lamb", "legw_optimizer_preset": preset}
    if preset == "adamw-block":
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}
        optimizer_flags = {}
    settings = dict(
        per_device_train_batch_size=4,
        num_train_epochs=2,
        **optimizer_flags,
        weight_decay=0.01,
        deepspeed=ds_config if stage != "ddp" else None,
    )
    args = legw_training_args(Path(output) / "out", **settings)
    applied = AppliedLearningRates()
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(96), callbacks=[applied])
    trainer.train()
    resumed = None
    if resume == "resume":  # stop after 5 of 12 updates with a checkpoint, then a new Trainer resumes from it
        fresh_accelerator_state()
        interrupted_args = legw_training_args(
            Path(output) / "interrupted", save_strategy="steps", save_steps=1000, **settings
        )
        first = LegwTrainer(
            model=Regressor(), args=interrupted_args, train_dataset=regression_dataset(96), callbacks=[StopAt(5)]
        )
        first.train()
        fresh_accelerator_state()
        second = LegwTrainer(model=Regressor(), args=interrupted_args, train_dataset=regression_dataset(96))
        second.train(resume_from_checkpoint=str(Path(output) / "interrupted" / "checkpoint-5"))
        resumed = {"params": flat_parameters(second), "lrs": logged_learning_rates(second.state.log_history)}
    record = {
        "world_size": args.world_size,
        "plan": legw_scheduler(trainer.lr_scheduler).plan.summary(),
        "lrs": logged_learning_rates(trainer.state.log_history),
        "applied_lrs": applied.lrs,
        "optimizer_class": type(_innermost(trainer.optimizer)).__name__,
        "trust_keys": sorted({k for e in trainer.state.log_history for k in e if k.startswith("trust_ratio/")}),
        "params": flat_parameters(trainer),
        "resumed": resumed,
        "gradient_clipping": getattr(getattr(args, "hf_deepspeed_config", None), "config", {}).get("gradient_clipping"),
    }
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_process()
