"""A LegwTrainer run with LAMB under ``deepspeed --num_gpus 2`` (CPU): each rank writes its plan, the LR of every
update, the trust-ratio log keys and the final parameters as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from toy import Regressor, legw_training_args, logged_learning_rates, regression_dataset

from legw_hf import LegwTrainer


def main(output: str, stage: str, preset: str) -> None:
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": int(stage) if stage != "ddp" else 0},
    }
    args = legw_training_args(
        Path(output) / "out",
        per_device_train_batch_size=4,
        num_train_epochs=2,
        legw_optimizer="lamb",
        legw_optimizer_preset=preset,
        weight_decay=0.01,
        deepspeed=ds_config if stage != "ddp" else None,
    )
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(96))
    trainer.train()
    params = list(trainer.model.parameters())
    record = {
        "world_size": args.world_size,
        "plan": trainer.lr_scheduler.plan.summary() if hasattr(trainer.lr_scheduler, "plan") else None,
        "lrs": logged_learning_rates(trainer.state.log_history),
        "trust_keys": sorted({k for e in trainer.state.log_history for k in e if k.startswith("trust_ratio/")}),
        "params": torch.cat([p.detach().reshape(-1) for p in params]).tolist(),
        "gradient_clipping": getattr(getattr(args, "hf_deepspeed_config", None), "config", {}).get("gradient_clipping"),
    }
    (Path(output) / f"rank{args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
