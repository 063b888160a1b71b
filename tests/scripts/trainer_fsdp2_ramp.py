"""LegwTrainer's scheduled batch ramp under Trainer's FSDP2 path, 2 processes: the runs of ``tests/test_sharded.py``'s
Trainer FSDP2 ramp checks.

Run from ``sharded_parity.py fsdp2`` (the same ``torchrun`` launch; its process group). The arguments ask for FSDP2
(``--fsdp``, ``fsdp_config`` version 2, every ``Linear`` an FSDP module of its own) with ``--use_cpu``.
Trainer builds accelerate's FSDP plugin from them and hands it to its ``Accelerator``, but accelerate turns FSDP on
only for GPU backends: on CPU its state stays ``MULTI_CPU`` without the plugin, and the run would silently be DDP.
:class:`ForcedFSDP2Trainer` forces exactly three things after Trainer's own ``create_accelerator_and_postprocess``:

* ``PartialState._shared_state["distributed_type"] = FSDP`` (every ``AcceleratorState`` accelerate makes as it goes
  copies it from there),
* ``AcceleratorState().distributed_type = FSDP`` and ``.fsdp_plugin =`` the plugin Trainer built from
  ``args.fsdp_plugin_args`` (taken as Trainer passes it to ``Accelerator``), as accelerate sets them on a GPU,
* ``trainer.is_fsdp_enabled = True``, the flag Trainer derives from that state right after creating the accelerator.

Everything after is Trainer's and accelerate's own code, as on GPUs: the optimizer created before the model is
prepared (FSDP2 does not delay it), ``accelerator.prepare(model, optimizer)`` shards the model with ``fully_shard``
(DTensor parameters) and swaps the optimizer's parameters for them, ``accelerator.no_sync`` calls
``set_requires_gradient_sync``, ``_save_checkpoint`` writes the model and optimizer with ``save_fsdp_model`` /
``save_fsdp_optimizer`` (``FULL_STATE_DICT``, Trainer's default) and a resume reads them back with
``load_fsdp_model`` / ``load_fsdp_optimizer``.

The ramp is ``toy.ramp_training_args``' 8@0,16@1,32@2 over 3 epochs of 100 samples at per-device batch 2, without
clipping, under Trainer's AdamW with eps 1 (a step nearly proportional to the gradient, so a loss divided by the wrong
accumulation shows in the weights). Runs: ``full`` (the whole ramp, saving a checkpoint after update 16, inside the
second stage, as it goes on) and ``resumed`` (a new Trainer resumed from that checkpoint), each in ``OUTPUT/<run>``.
Each rank records, gathered on rank 0 (:func:`runs`): the LR every update applied, the samples of each of its
micro-batches (by their first feature) and whether a gradient existed before each of them (none may: the micro-batches
accumulate unsharded gradients, reduce-scattered only by the last one's backward), the accelerator's distributed type,
whether the model's parameters were FSDP2's DTensors, the checkpoint's files, and the final weights gathered whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
from sharded_parity import full_parameters
from toy import MicroBatchesPerUpdate, RecordingRegressor, SaveAt, ramp_training_args, regression_dataset
from trainer_deepspeed import AppliedLearningRates

from legw_hf import LegwTrainer
from legw_hf.integrations.trainer.ramp import MicroBatches

SAVE_AT = 16  # inside the second stage (updates 13-18 over 100 samples)
MICRO_BATCH = 2
#: Trainer's FSDP arguments: FSDP2, each Linear sharded as its own module, the LayerNorm in the root's.
FSDP = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["Linear"]}}


class ForcedFSDP2Trainer(LegwTrainer):
    """LegwTrainer whose accelerator is put into accelerate's FSDP2 state on CPU (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: per update, for each micro-batch: whether a (sharded, reduced) gradient existed before Trainer's step on it
        self.grads_before_micro_batches: list[list[bool]] = []

    def _build_accelerator_args(self, **kwargs):
        # the plugin create_accelerator_and_postprocess built from args.fsdp_plugin_args, on its way to Accelerator
        self.trainer_fsdp_plugin = kwargs.get("fsdp_plugin")
        return super()._build_accelerator_args(**kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        super().create_accelerator_and_postprocess()
        plugin = self.trainer_fsdp_plugin
        if plugin is None or plugin.fsdp_version != 2:
            raise RuntimeError(f"Trainer built no FSDP2 plugin from its arguments: {plugin}")
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state = AcceleratorState()
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        self.is_fsdp_enabled = True
        if not self.accelerator.is_fsdp2:
            raise RuntimeError("accelerate's state is not FSDP2")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(inputs, MicroBatches):
            self.grads_before_micro_batches.append([])
        else:
            self.grads_before_micro_batches[-1].append(any(p.grad is not None for p in model.parameters()))
        return super().training_step(model, inputs, num_items_in_batch)


def reset_accelerate_state() -> None:
    """Each run forces its own state; the process group stays. Trainer's ``Accelerator`` set ``ACCELERATE_USE_FSDP``
    (it was handed a plugin), which a later accelerator without one would read."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_FSDP", None)


def trainer_run(root: Path, name: str, resume: str | None = None) -> list[dict] | None:
    """One Trainer run in ``root / name``; every rank's record, on rank 0 (None on the others)."""
    reset_accelerate_state()
    args = ramp_training_args(
        root / name, per_device_train_batch_size=MICRO_BATCH, adam_epsilon=1.0, max_grad_norm=0.0, **FSDP
    )
    model = RecordingRegressor()
    micro_batches, applied = MicroBatchesPerUpdate(model), AppliedLearningRates()
    callbacks = [micro_batches, applied] + ([SaveAt(SAVE_AT)] if resume is None else [])
    trainer = ForcedFSDP2Trainer(model=model, args=args, train_dataset=regression_dataset(100), callbacks=callbacks)
    checkpoint = None if resume is None else root / resume / f"checkpoint-{SAVE_AT}"
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    saved = root / name / f"checkpoint-{SAVE_AT}"
    record = {
        "world_size": args.world_size,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "dtensor_parameters": all(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
        "global_step": trainer.state.global_step,
        "lrs": applied.lrs,
        "micro_batches": micro_batches.updates,
        "grads_before_micro_batches": trainer.grads_before_micro_batches,
        "checkpoint_files": sorted(path.name for path in saved.iterdir()) if saved.is_dir() else None,
        "params": full_parameters(trainer.model).tolist(),
    }
    records = [None] * args.world_size
    dist.all_gather_object(records, record)
    return records if args.process_index == 0 else None


def runs(output: Path) -> dict[str, list[dict]] | None:
    """The whole ramp saving at update 16, then the run resumed from that checkpoint, with accelerate's state reset
    after them: on rank 0 each run's records (rank 0's first), None on the others."""
    records = {"full": trainer_run(output, "full"), "resumed": trainer_run(output, "resumed", resume="full")}
    reset_accelerate_state()
    return records if dist.get_rank() == 0 else None
