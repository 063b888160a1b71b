"""LegwTrainer runs for torchrun, in one launch: without and with accelerate's ``split_batches`` (each rank writes its
plan and the LR of every update as JSON to ``OUTPUT/{nosplit,split}/rank{r}.json``), then the batch-ramp runs of
``trainer_ramp_ddp.py`` into ``OUTPUT/ramp``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy import Regressor, legw_training_args, logged_learning_rates, regression_dataset
from trainer_deepspeed import fresh_accelerator_state
from trainer_ramp_ddp import main as ramp_runs

from legw_hf import LegwTrainer
from legw_hf.shutdown import exit_process


def main(output: str) -> None:
    for split_batches in ("nosplit", "split"):
        fresh_accelerator_state()
        run(str(Path(output) / split_batches), split_batches)
    ramp_runs(str(Path(output) / "ramp"))


def run(output: str, split_batches: str) -> None:
    args = legw_training_args(
        Path(output) / "out",
        num_train_epochs=2,
        legw_base_batch_size=8,
        legw_base_warmup_epochs=0.2,
        accelerator_config={"split_batches": split_batches == "split"},
    )
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100))
    trainer.train()
    plan = trainer.lr_scheduler.plan
    record = {
        "world_size": args.world_size,
        "plan": plan.summary(),
        "lrs": logged_learning_rates(trainer.state.log_history),
        "updates": trainer.lr_scheduler.updates,
    }
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process()
