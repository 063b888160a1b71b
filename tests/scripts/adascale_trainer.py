"""LegwTrainer runs with ``--legw_adascale gain`` under ``deepspeed --num_gpus 2`` (CPU), in one launch: DDP (no
DeepSpeed config), then DeepSpeed ZeRO-2 and ZeRO-3. Each rank writes the statistics, gain and progress of every
update and the final parameters as JSON to ``OUTPUT/{ddp,2,3}/rank{r}.json``, so the test can compare the DeepSpeed
runs with the DDP one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from toy import Regressor, legw_training_args, regression_dataset
from trainer_deepspeed import fresh_accelerator_state
from transformers import TrainerCallback

from legw_hf import AdaScaleScheduler, LegwTrainer
from legw_hf.shutdown import exit_process


def adascale_scheduler(scheduler):
    while not isinstance(scheduler, AdaScaleScheduler):  # accelerate wraps the scheduler DeepSpeed built
        scheduler = scheduler.scheduler
    return scheduler


class EveryUpdate(TrainerCallback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        scheduler = adascale_scheduler(lr_scheduler)
        self.rows.append({"gain": scheduler.gain, "progress": scheduler.progress, **scheduler.noise.last})


def main(output: str) -> None:
    for stage in ("ddp", "2", "3"):  # stage 1 runs stage 2's code in DeepSpeed; ZeRO-3's zero.Init comes last
        fresh_accelerator_state()
        run(str(Path(output) / stage), stage)


def run(output: str, stage: str) -> None:
    deepspeed = None
    if stage != "ddp":
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": 0,
            "zero_optimization": {"stage": int(stage)},
        }
        if stage == "3":  # partition even this model's small tensors, as ZeRO-3 does a large model's
            deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    args = legw_training_args(
        Path(output) / "out",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        legw_adascale="gain",
        legw_optimizer="sgd",
        max_grad_norm=0.0,
        deepspeed=deepspeed,
    )
    updates = EveryUpdate()
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(96), callbacks=[updates])
    trainer.train()
    parameters = list(trainer.model.parameters())
    if stage == "3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters):
            flat = torch.cat([p.detach().reshape(-1) for p in parameters]).tolist()
    else:
        flat = torch.cat([p.detach().reshape(-1) for p in parameters]).tolist()
    record = {
        "world_size": args.world_size,
        "rows": updates.rows,
        "finished": adascale_scheduler(trainer.lr_scheduler).finished,
        "params": flat,
    }
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_process()
