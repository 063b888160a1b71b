"""LegwTrainer with a batch ramp under torchrun, in one launch: a whole run and one stopped with a checkpoint inside
its second stage. Each rank writes the LR of every update and the samples of each of its micro-batches as JSON to
``OUTPUT/{full,stopped}/rank{r}.json``, and its final weights to ``weights{r}.pt`` there. (The automatic ramp's
2-process Trainer run is in the elastic DeepSpeed launch, ``ramp_deepspeed.py``, beside its runs under ZeRO.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy import (
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
    for name in ("full", "stopped"):
        fresh_accelerator_state()
        run(Path(output) / name, stop_at=STOP_AT if name == "stopped" else None)


def run(output: Path, stop_at: int | None) -> None:
    # per-device 2 x 2 processes: each update of batch B accumulates B / 4 micro-batch steps
    args = ramp_training_args(output / "out", per_device_train_batch_size=2)
    model = RecordingRegressor()
    recorder = MicroBatchesPerUpdate(model)
    callbacks = [recorder] + ([StopAt(stop_at)] if stop_at else [])
    trainer = LegwTrainer(model=model, args=args, train_dataset=regression_dataset(100), callbacks=callbacks)
    trainer.train()
    record = {
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "lrs": logged_learning_rates(trainer.state.log_history),
        "updates": recorder.updates,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{args.process_index}.json").write_text(json.dumps(record))
    torch.save(model.state_dict(), output / f"weights{args.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process()
