"""Parse DeepSpeed configs with DeepSpeed's own ``DeepSpeedConfig`` at a stated data-parallel world size.

Input (argv[1]): a JSON list of ``{"path", "world_size", "trainer"}``; ``trainer`` is None for a config with numbers,
or the Trainer arguments (``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``fp16``/``bf16``) that
fill a config's ``"auto"`` fields the way a Trainer run does. Output (argv[2]): per entry, what DeepSpeed made of it,
or the error it raised.

DeepSpeedConfig reads the world size from ``deepspeed.comm``; a one-process gloo group is initialised, and the
stated world size comes in through the ``mpu`` argument, as Megatron-style callers pass it.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from legw_hf.shutdown import exit_process

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # MASTER_PORT: the test's


class DataParallelWorld:
    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


def filled_by_trainer(path: str, trainer: dict) -> dict:
    from legw_hf import LegwTrainingArguments

    args = LegwTrainingArguments(
        output_dir=os.environ["VALIDATE_OUTPUT_DIR"],
        use_cpu=True,
        deepspeed=path,
        report_to="none",
        legw_base_batch_size=65536,
        legw_base_warmup_steps=2000.9,
        legw_optimizer="lamb",
        legw_optimizer_preset="nvidia",
        **trainer,
    )
    return args.hf_deepspeed_config.config


def parsed(entry: dict) -> dict:
    from deepspeed.runtime.config import DeepSpeedConfig

    if entry["trainer"] is None:
        with open(entry["path"]) as file:
            config = json.load(file)
    else:
        config = filled_by_trainer(entry["path"], entry["trainer"])
    try:
        ds = DeepSpeedConfig(json.loads(json.dumps(config)), mpu=DataParallelWorld(entry["world_size"]))
    except (AssertionError, ValueError, TypeError, KeyError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    zero = ds.zero_config
    offload = zero.offload_optimizer
    return {
        "world_size": ds.world_size,
        "train_batch_size": ds.train_batch_size,
        "micro_batch": ds.train_micro_batch_size_per_gpu,
        "accumulation": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_stage": ds.zero_optimization_stage,
        "fp16": bool(ds.float16_config.enabled),
        "dynamic_loss_scale": bool(ds.float16_config.enabled) and ds.float16_config.loss_scale == 0,
        "bf16": bool(ds.bfloat16_config.enabled),
        "offload_device": None if offload is None else str(getattr(offload.device, "value", offload.device)),
        "force_ds_cpu_optimizer": ds.zero_force_ds_cpu_optimizer,
        "optimizer_block": ds.optimizer_name,
        "scheduler_block": ds.scheduler_name,
    }


def main(entries_path: str, output: str) -> None:
    import deepspeed

    deepspeed.init_distributed("gloo")
    with open(entries_path) as file:
        entries = json.load(file)
    with open(output, "w") as file:
        json.dump([parsed(entry) for entry in entries], file)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process()
