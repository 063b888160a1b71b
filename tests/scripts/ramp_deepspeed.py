"""Batch ramps under DeepSpeed, inside launches that run anyway (no launch of their own). The ramp is 8@0,16@1,32@2
over 3 epochs at base batch 8 and per-device batch 2, without clipping, and every step is nearly proportional to the
gradient (SGD with momentum in the loops; AdamW with eps 1 where a run resumes at another world size, since
DeepSpeed's universal checkpoint, which re-shards a checkpoint for it, takes only Adam's moments), so a loss divided
by the wrong accumulation shows in the weights.

* :func:`trainer` (``elastic.py``'s launches): LegwTrainer with ZeRO-2 over 100 samples. Phase ``second`` (2
  processes): the whole run, saving a checkpoint after update 16 (inside the second stage) as it goes on
  (``full``), and a run resumed from that checkpoint (``resumed``); the accelerate loop's ramp under ZeRO-2 likewise,
  saving its state after update 10 (``loop-full``, ``loop-resumed``); then ``--legw_batch_ramp auto``
  (toy.AUTO_RAMP) under plain DDP (``auto-ddp``) and ZeRO-2 (``auto-zero2``). Phase
  ``third`` (1 process): both resumed from their checkpoints again (``r1``, ``loop-r1``), where every stage
  accumulates twice the micro-batches.
* :func:`loops` (``trainer_deepspeed.py``'s launch, 2 processes): ``ramped_updates`` in an accelerate loop with a
  DeepSpeed plugin over 64 samples, ZeRO-1 (``loop-zero1``) and ZeRO-3 (``loop-zero3``); then an automatic ramp
  (:data:`LOOP_AUTO_RAMP`) under plain DDP (``auto-ddp``), ZeRO-1 and ZeRO-3 (``auto-zero1``, ``auto-zero3``; the
  Trainer's runs ZeRO-2), and the configs a DeepSpeed plugin must not hold beside the scheduler (``refusals``).

Every rank writes ``OUTPUT/<run>/rank{r}.json``: for every update the LR it applied, the samples of each of its
micro-batches (by their first feature), and the DeepSpeed engine's accumulation, train batch, samples and steps
after it; the final weights (whole, on every rank).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy import (
    AUTO_RAMP,
    NOISY_DATA,
    MicroBatchesPerUpdate,
    RecordingRegressor,
    Regressor,
    SaveAt,
    ramp_training_args,
    regression_dataset,
)
from trainer_deepspeed import AppliedLearningRates, flat_parameters, fresh_accelerator_state, legw_scheduler
from transformers import TrainerCallback

from legw_hf import LegwConfig, LegwTrainer

SAVE_AT = 16  # inside the second stage (updates 13-18 over 100 samples)
MICRO_BATCH = 2
LOOP_DATASET = 64
LOOP_CONFIG = LegwConfig(base_batch_size=8, base_lr=0.05, base_warmup_epochs=0.25)


def engine_numbers(engine) -> dict:
    return {
        "accumulation": engine.gradient_accumulation_steps(),
        "batch": engine.train_batch_size(),
        "global_samples": engine.global_samples,
        "global_steps": engine.global_steps,
    }


class EngineAfterUpdates(TrainerCallback):
    """The DeepSpeed engine's numbers after every update."""

    def __init__(self) -> None:
        self.trainer: LegwTrainer | None = None
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.rows.append(engine_numbers(self.trainer.model_wrapped))


def write(output: Path, rank: int, record: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{rank}.json").write_text(json.dumps(record))


def trainer_run(root: Path, name: str, resume: str | None = None) -> None:
    fresh_accelerator_state()
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # max_grad_norm 0: no clipping, the update stays proportional to the gradient
        "zero_optimization": {"stage": 2},
    }
    args = ramp_training_args(
        root / name / "out",
        per_device_train_batch_size=MICRO_BATCH,
        adam_epsilon=1.0,
        max_grad_norm=0.0,
        deepspeed=ds_config,
    )
    model = RecordingRegressor()
    micro_batches, applied, engine = MicroBatchesPerUpdate(model), AppliedLearningRates(), EngineAfterUpdates()
    callbacks = [micro_batches, applied, engine] + ([SaveAt(SAVE_AT)] if resume is None else [])
    trainer = LegwTrainer(model=model, args=args, train_dataset=regression_dataset(100), callbacks=callbacks)
    engine.trainer = trainer
    checkpoint = None if resume is None else str(root / resume / "out" / f"checkpoint-{SAVE_AT}")
    trainer.train(resume_from_checkpoint=checkpoint)
    record = {
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "lrs": applied.lrs,
        "micro_batches": micro_batches.updates,
        "engine": engine.rows,
        "params": flat_parameters(trainer),
    }
    write(root / name, args.process_index, record)


def trainer_auto_run(root: Path, name: str, stage: int | None) -> None:
    """``--legw_batch_ramp auto`` (toy.AUTO_RAMP over toy.NOISY_DATA) under ZeRO ``stage``, or (None) plain DDP: the
    estimates and LR of every update as Trainer logged them, its micro-batches, the decisions, the final weights."""
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # a Trainer without a DeepSpeed config must not inherit one
    fresh_accelerator_state()
    ds_config = None
    if stage is not None:
        ds_config = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage},
        }
    args = ramp_training_args(root / name / "out", **AUTO_RAMP, max_grad_norm=0.0, deepspeed=ds_config)
    model = RecordingRegressor()
    micro_batches, engine = MicroBatchesPerUpdate(model), EngineAfterUpdates()
    callbacks = [micro_batches] + ([engine] if stage is not None else [])
    trainer = LegwTrainer(model=model, args=args, train_dataset=regression_dataset(**NOISY_DATA), callbacks=callbacks)
    engine.trainer = trainer
    trainer.train()
    record = {
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "logs": [entry for entry in trainer.state.log_history if "learning_rate" in entry],
        "micro_batches": micro_batches.updates,
        "engine": engine.rows,
        "decisions": [decision.to_dict() for decision in legw_scheduler(trainer.lr_scheduler).decisions],
        "params": flat_parameters(trainer),
    }
    write(root / name, args.process_index, record)


def trainer(phase: str, output: str) -> None:
    root = Path(output)
    if phase == "second":
        trainer_run(root, "full")
        trainer_run(root, "resumed", resume="full")
        resumable_loop_run(root, "loop-full")
        resumable_loop_run(root, "loop-resumed", resume=True)
        for stage in (None, 2):  # (the accelerate loops' AutoRamp runs under ZeRO-1 and ZeRO-3)
            trainer_auto_run(root, "auto-ddp" if stage is None else f"auto-zero{stage}", stage)
    elif phase == "third":
        trainer_run(root, "r1", resume="full")
        resumable_loop_run(root, "loop-r1", resume=True)


def loop_ds_config(stage: int) -> dict:
    """The accelerate loops' DeepSpeed config: batch and accumulation left to the ramp, no clipping."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }


def loop_accelerator(stage: int):
    """A fresh Accelerator with a DeepSpeed plugin at ZeRO ``stage`` (:func:`loop_ds_config`) and a seedable sampler."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, DeepSpeedPlugin, set_seed

    fresh_accelerator_state()
    PartialState(cpu=True)  # without it, accelerate on a machine without GPUs counts one process (as Trainer's use_cpu)
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=loop_ds_config(stage)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(0)  # the seedable sampler's permutations: the same on every rank
    return accelerator


def ramped_loop(accelerator, model, optimizer, scheduler, loader, *, save_at=None, state_dir=None) -> dict:
    """The ramp from the scheduler's progress to its end (``save_state`` into ``state_dir`` after update
    ``save_at``, going on): per update the LR, this rank's micro-batches and the engine's numbers; the final weights
    gathered whole (None off the main process)."""
    from legw_hf.integrations.accelerate import ramped_updates

    engine = accelerator.deepspeed_engine_wrapped.engine
    model.train()
    lrs, micro_batches, rows = [], [], []
    for update in ramped_updates(accelerator, scheduler, loader, model):
        lrs.append(optimizer.param_groups[0]["lr"])
        micro_batches.append([])
        for batch in update.micro_batches():
            update.backward(model(x=batch["x"], y=batch["y"])["loss"])
            micro_batches[-1].append(batch["x"][:, 0].tolist())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rows.append(engine_numbers(engine))
        if update.index + 1 == save_at:
            accelerator.save_state(str(state_dir))
    state = accelerator.get_state_dict(model)  # gathered from ZeRO-3's partitions, on the main process
    params = torch.cat([state[name].reshape(-1) for name in Regressor().state_dict()]).tolist() if state else None
    return {"lrs": lrs, "micro_batches": micro_batches, "engine": rows, "params": params}


def loop_run(output: Path, stage: int) -> None:
    from torch.utils.data import DataLoader

    from legw_hf import SettingError
    from legw_hf.integrations.accelerate import create_legw_scheduler

    accelerator = loop_accelerator(stage)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=LOOP_CONFIG.base_lr, momentum=0.9)
    loader = DataLoader(regression_dataset(LOOP_DATASET), batch_size=MICRO_BATCH, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    refusals = {}
    # a dataloader whose batch is not the engine's micro-batch (4 against 2)
    wider = accelerator.prepare(DataLoader(regression_dataset(LOOP_DATASET), batch_size=2 * MICRO_BATCH))
    try:
        create_legw_scheduler(accelerator, optimizer, LOOP_CONFIG, wider, num_epochs=3, batch_ramp="8@0,16@1")
    except SettingError as error:
        refusals["micro_batch"] = {"field": error.field, "message": str(error)}
    scheduler = create_legw_scheduler(
        accelerator, optimizer, LOOP_CONFIG, loader, num_epochs=3, batch_ramp="8@0,16@1,32@2"
    )
    record = ramped_loop(accelerator, model, optimizer, scheduler, loader) | {"refusals": refusals}
    write(output / f"loop-zero{stage}", accelerator.process_index, record)


#: The update after which the resumable accelerate loop saves its state: inside the second stage (updates 8-11).
LOOP_SAVE_AT = 10


def resumable_loop_run(root: Path, name: str, resume: bool = False) -> None:
    """The accelerate loop's ramp under ZeRO-2 with AdamW (eps 1, so the step stays nearly proportional to the
    gradient; DeepSpeed's universal checkpoint takes Adam's moments): whole, saving its state after
    :data:`LOOP_SAVE_AT` updates into ``root/loop-state`` as it goes on; or (``resume``) from that state through
    ``legw_hf.integrations.accelerate.load_state``, at whatever world size this launch has."""
    from torch.utils.data import DataLoader

    from legw_hf.integrations.accelerate import create_legw_scheduler, load_state

    accelerator = loop_accelerator(2)
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LOOP_CONFIG.base_lr, eps=1.0, weight_decay=0.0)
    loader = DataLoader(regression_dataset(LOOP_DATASET), batch_size=MICRO_BATCH, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = create_legw_scheduler(
        accelerator, optimizer, LOOP_CONFIG, loader, num_epochs=3, batch_ramp="8@0,16@1,32@2"
    )
    state_dir = root / "loop-state"
    if resume:
        load_state(accelerator, str(state_dir))
        record = ramped_loop(accelerator, model, optimizer, scheduler, loader)
    else:
        record = ramped_loop(
            accelerator, model, optimizer, scheduler, loader, save_at=LOOP_SAVE_AT, state_dir=state_dir
        )
    record["world_size"] = accelerator.num_processes
    write(root / name, accelerator.process_index, record)


#: The automatic ramp's runs: from batch 8, doubling up to 32 after 2 updates at a batch while doubling is at least
#: 60% efficient, over 3 epochs of 64 noisy samples.
LOOP_AUTO_RAMP = {"max_batch": 32, "patience": 2, "start_batch": 8, "efficiency": 0.6}


def auto_loop_run(output: Path, stage: int | None) -> None:
    """An accelerate loop under an AutoRamp, with a DeepSpeed plugin at ZeRO ``stage`` or (None) plain DDP: each
    update's batch and LR, and the moving averages of tr Σ and ‖G‖² after it; the decisions."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DeepSpeedPlugin, set_seed
    from torch.utils.data import DataLoader

    from legw_hf.integrations.accelerate import create_legw_scheduler, ramped_updates
    from legw_hf.ramp import AutoRamp

    # an Accelerator made with a DeepSpeed plugin sets this, and a later one without a plugin would make a default one
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(reset_partial_state=True)  # the process group stays
    PartialState(cpu=True)
    plugin = {}
    if stage is not None:
        plugin["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=loop_ds_config(stage))
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), **plugin)
    set_seed(0)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=LOOP_CONFIG.base_lr, momentum=0.9)
    data = regression_dataset(LOOP_DATASET, noise=0.5)
    loader = DataLoader(data, batch_size=MICRO_BATCH, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = create_legw_scheduler(
        accelerator, optimizer, LOOP_CONFIG, loader, num_epochs=3, batch_ramp=AutoRamp(**LOOP_AUTO_RAMP)
    )
    model.train()
    rows = []
    for update in ramped_updates(accelerator, scheduler, loader, model):
        lr = optimizer.param_groups[0]["lr"]
        for batch in update.micro_batches():
            update.backward(model(x=batch["x"], y=batch["y"])["loss"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rows.append(
            {"batch": update.batch_size, "lr": lr, "trace": scheduler.noise.trace, "signal": scheduler.noise.signal}
        )
    record = {"rows": rows, "decisions": [decision.to_dict() for decision in scheduler.decisions]}
    write(output / f"auto-{'ddp' if stage is None else f'zero{stage}'}", accelerator.process_index, record)


#: What a DeepSpeed plugin's config must not hold beside the LEGW scheduler: fp16 loss scaling under an AutoRamp
#: (its scale may change inside the step that is measured), and a "scheduler" block (a second schedule), with a
#: scheduled ramp or without one.
REFUSED_CONFIGS = {
    "auto-fp16": ({"fp16": {"enabled": True}}, "auto"),
    "scheduler-block": ({"scheduler": {"type": "WarmupLR", "params": {}}}, None),
    "ramp-scheduler-block": ({"scheduler": {"type": "WarmupLR", "params": {}}}, "8@0,16@1"),
}


def plugin_refusals(output: Path) -> None:
    """``create_legw_scheduler`` under a DeepSpeed plugin with each config of :data:`REFUSED_CONFIGS`, before any
    model is prepared: the refusal's field and message (or None) in ``OUTPUT/refusals/rank{r}.json``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from torch.utils.data import DataLoader

    from legw_hf import SettingError
    from legw_hf.integrations.accelerate import create_legw_scheduler
    from legw_hf.ramp import AutoRamp

    record = {}
    for name, (entries, batch_ramp) in REFUSED_CONFIGS.items():
        fresh_accelerator_state()
        PartialState(cpu=True)
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=loop_ds_config(2) | entries))
        loader = accelerator.prepare(DataLoader(regression_dataset(LOOP_DATASET), batch_size=MICRO_BATCH))
        optimizer = torch.optim.SGD(Regressor().parameters(), lr=LOOP_CONFIG.base_lr)
        ramp = AutoRamp(**LOOP_AUTO_RAMP) if batch_ramp == "auto" else batch_ramp
        try:
            create_legw_scheduler(accelerator, optimizer, LOOP_CONFIG, loader, num_epochs=3, batch_ramp=ramp)
            record[name] = None
        except SettingError as error:
            record[name] = {"field": error.field, "message": str(error)}
    write(output / "refusals", accelerator.process_index, record)


def loops(output: str) -> None:
    for stage in (1, 3):
        loop_run(Path(output), stage)
    for stage in (None, 1, 3):
        auto_loop_run(Path(output), stage)
    plugin_refusals(Path(output))
