"""Elastic resume through LegwTrainer: checkpoints saved at one world size and resumed at another, plain DDP or
DeepSpeed ZeRO-2, LAMB (nvidia preset). Run once per phase at that phase's world size:

* ``first`` (1 process): checkpoints at update 6 of a run at global batch 4 (``i1-changing``) and of one at global
  batch 8 by accumulation 2 (``i1-fixed``); the uninterrupted global-batch-8 run (``u1-fixed``).
* ``second`` (2 processes): ``i1-changing`` resumed with the same per-device batch (global batch 4 → 8, the plan is
  re-derived), ``i1-fixed`` resumed with accumulation 1 (global batch 8 kept: the plan is unchanged); checkpoint at
  update 5 of a global-batch-8 run (``i2``) and that run uninterrupted (``u2``).
* ``third`` (1 process): ``i2`` resumed with the same per-device batch (8 → 4) and with accumulation 2 (8 kept).

Each run writes ``<output>/<phase>/<run>.rank<N>.json``: the plan, the LR each update applied, Trainer's and the
scheduler's step counts, legw_hf's warnings and the final parameters. ``elastic.py`` runs both engines and the FSDP2
loop in one launch per phase.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_trainer import StopAt
from toy import Regressor, legw_training_args, regression_dataset
from trainer_deepspeed import AppliedLearningRates, flat_parameters, fresh_accelerator_state

from legw_hf import LegwTrainer
from legw_hf.shutdown import exit_process

DATASET = 96


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(root: Path, engine: str, name: str, accumulation: int, stop: int | None = None, resume: str | None = None):
    fresh_accelerator_state()
    deepspeed = None
    if engine == "zero2":
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 2},
        }
    args = legw_training_args(
        root / "checkpoints" / name,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        legw_optimizer="lamb",
        legw_optimizer_preset="nvidia",
        weight_decay=0.01,
        save_strategy="steps" if stop else "no",
        save_steps=1000,
        deepspeed=deepspeed,
    )
    applied = AppliedLearningRates()
    callbacks = [applied] + ([StopAt(stop)] if stop else [])
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(DATASET), callbacks=callbacks)
    caught = Warnings()
    logging.getLogger("legw_hf").addHandler(caught)
    try:
        if resume is not None:
            # a copy: each resume converts or reads the checkpoint on its own
            checkpoint = root / "checkpoints" / f"{name}-from"
            if args.process_index == 0:
                shutil.copytree(root / "checkpoints" / resume, checkpoint)
            trainer.accelerator.wait_for_everyone()
            trainer.train(resume_from_checkpoint=str(checkpoint))
        else:
            trainer.train()
    finally:
        logging.getLogger("legw_hf").removeHandler(caught)
    scheduler = trainer.lr_scheduler
    while not hasattr(scheduler, "plan"):
        scheduler = scheduler.scheduler
    record = {
        "world_size": args.world_size,
        "plan": scheduler.plan.summary(),
        "applied_lrs": applied.lrs,
        "global_step": trainer.state.global_step,
        "updates": scheduler.updates,
        "warnings": caught.messages,
        "params": flat_parameters(trainer),
    }
    out = root / engine
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.rank{args.process_index}.json").write_text(json.dumps(record))


def main(engine: str, phase: str, output: str) -> None:
    root = Path(output)
    if phase == "first":
        run(root, engine, "i1-changing", accumulation=1, stop=6)
        run(root, engine, "i1-fixed", accumulation=2, stop=6)
        run(root, engine, "u1-fixed", accumulation=2)
    elif phase == "second":
        run(root, engine, "r2-changing", accumulation=1, resume="i1-changing/checkpoint-6")
        run(root, engine, "r2-fixed", accumulation=1, resume="i1-fixed/checkpoint-6")
        run(root, engine, "i2", accumulation=1, stop=5)
        run(root, engine, "u2", accumulation=1)
    else:
        run(root, engine, "r1-changing", accumulation=1, resume="i2/checkpoint-5")
        run(root, engine, "r1-fixed", accumulation=2, resume="i2/checkpoint-5")


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_process()
