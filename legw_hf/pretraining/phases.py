"""The phases of a pretraining run as Trainer runs them: the Trainer that starts a phase from the previous one, and
what marks a phase finished. What a phase trains with is a :class:`legw_hf.recipes.PretrainingPhase`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..integrations.trainer import LegwTrainer
from ..optim import layerwise_optimizer_of
from ..optim.phases import continue_from_phase, restart_step_counts
from ..plan import LegwPlan
from ..record import write_json

logger = logging.getLogger(__name__)

COMPLETE = "phase_complete.json"


def trainer_steps_per_epoch(dataset_size: int, per_device: int, accumulation: int, world_size: int) -> int:
    """Updates per epoch as Trainer counts them: each process's dataloader batches (the sampler pads the dataset to
    a multiple of the processes), then whole or partial accumulation windows."""
    batches = math.ceil(math.ceil(dataset_size / world_size) / per_device)
    return max(math.ceil(batches / accumulation), 1)


class SaveAtPhaseEnd(TrainerCallback):
    """Save a full checkpoint (weights, optimizer, scheduler) at a phase's last update, whatever ``save_steps``
    is: the next phase starts from its moments, and a later run resumes from it."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True


class PhaseTrainer(LegwTrainer):
    """A :class:`~legw_hf.LegwTrainer` for one phase: it plans with the phase's config (``legw_config=``, see
    :class:`~legw_hf.LegwTrainer`), and its optimizer starts from the previous phase's checkpoint ``carry_from``:
    its moments, with the step counts restarted (:func:`~legw_hf.optim.phases.continue_from_phase`), unless the
    phase itself is being resumed from one of its own checkpoints.

    ``planned`` is the phase's plan as the program printed and recorded it, from its own count of Trainer's updates
    per epoch: a Trainer that counts otherwise (``--dataloader_drop_last``, ``--auto_find_batch_size`` shrinking the
    batch) is an error before the first update, not a phase trained on another plan than the one shown."""

    def __init__(
        self, *args: Any, carry_from: str | None = None, planned: LegwPlan | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.carry_from = carry_from
        self.planned = planned
        if carry_from is not None:
            self.add_callback(_StartFromPreviousPhase(self))

    def legw_plan(self, num_training_steps: int) -> LegwPlan:
        plan = super().legw_plan(num_training_steps)
        if self.planned is not None and plan.to_dict() != self.planned.to_dict():
            ours, printed = plan.to_dict(), self.planned.to_dict()
            differ = ", ".join(
                f"{key} {ours[key]} (printed: {printed.get(key)})" for key in ours if ours[key] != printed.get(key)
            )
            raise RuntimeError(f"Trainer counts this phase otherwise than the plan printed for it: {differ}")
        return plan

    def start_from_previous_phase(self) -> None:
        if self.is_deepspeed_enabled:
            # The engine holds the (partitioned) moments: let it read its own checkpoint, without the old scheduler.
            # It also restores the old param groups' settings (phase 1's last LR): this phase's are put back.
            client = layerwise_optimizer_of(self.optimizer) or _client_optimizer(self.optimizer)
            settings = [{k: v for k, v in group.items() if k != "params"} for group in client.param_groups]
            self.model_wrapped.load_checkpoint(
                self.carry_from, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
            )
            for group, own in zip(client.param_groups, settings, strict=True):
                group.update(own)
            reset = restart_step_counts(client)
        else:
            saved = torch.load(Path(self.carry_from) / "optimizer.pt", map_location="cpu", weights_only=True)
            reset = continue_from_phase(self.optimizer, saved)
        logger.info(
            "Optimizer moments carried over from %s; step counts of %d tensors restarted", self.carry_from, reset
        )


class _StartFromPreviousPhase(TrainerCallback):
    """Trainer has built (and, under DeepSpeed, wrapped) the optimizer by ``on_train_begin``; a phase resumed from
    its own checkpoint (``global_step`` > 0) already has its moments."""

    def __init__(self, trainer: PhaseTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.trainer.start_from_previous_phase()


def _client_optimizer(optimizer: Any) -> Any:
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def mark_complete(phase_dir: Path, checkpoint: Path, plan: LegwPlan) -> None:
    write_json(phase_dir / COMPLETE, {"checkpoint": checkpoint.name, "plan": plan.to_dict()})


def completed_checkpoint(phase_dir: Path) -> Path | None:
    """The checkpoint a finished phase ended with, or None while it is unfinished."""
    try:
        record = json.loads((phase_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    checkpoint = phase_dir / record["checkpoint"]
    return checkpoint if checkpoint.is_dir() else None
