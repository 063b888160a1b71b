"""LegwTrainer with a batch ramp under torchrun, in one launch: a whole run, one stopped with a checkpoint inside
its second stage, and an automatic ramp (``--legw_batch_ramp auto``). Each rank writes the LR of every update and the
samples of each of its micro-batches as JSON to ``OUTPUT/{full,stopped,auto}/rank{r}.json`` (the automatic run also
its decisions and its log entries), and its final weights to ``weights{r}.pt`` there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy import (
    AUTO_RAMP,
    NOISY_DATA,
    MicroBatchesPerUpdate,
    RecordingRegressor,
    StopAt,
    logged_learning_rates,
    ramp_training_args,
    regression_dataset,
)
from trainer_deepspeed import fresh_accelerator_state

from legw_hf import LegwTrainer
from legw_hf.shutdown import exit_process

STOP_AT = 16  # inside the second stage (updates 13-18)


def main(output: str) -> None:
    for name in ("full", "stopped", "auto"):
        fresh_accelerator_state()
        run(Path(output) / name, stop_at=STOP_AT if name == "stopped" else None, auto=name == "auto")


def run(output: Path, stop_at: int | None, auto: bool = False) -> None:
    # per-device 2 x 2 processes: each update of batch B accumulates B / 4 micro-batch steps; the automatic ramp
    # starts at batch 4 (2 gradient estimates per update, one per process)
    args = ramp_training_args(output / "out", **(AUTO_RAMP if auto else {"per_device_train_batch_size": 2}))
    model = RecordingRegressor()
    recorder = MicroBatchesPerUpdate(model)
    callbacks = [recorder] + ([StopAt(stop_at)] if stop_at else [])
    dataset = regression_dataset(**NOISY_DATA) if auto else regression_dataset(100)
    trainer = LegwTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    record = {
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "lrs": logged_learning_rates(trainer.state.log_history),
        "updates": recorder.updates,
    }
    if auto:
        record["decisions"] = [decision.to_dict() for decision in trainer.lr_scheduler.decisions]
        record["logs"] = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{args.process_index}.json").write_text(json.dumps(record))
    torch.save(model.state_dict(), output / f"weights{args.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process()
