"""A batch-size ramp: the global batch grows during one run, and every update takes LEGW's LR for its own batch.

Large runs grow the batch on purpose (GPT-3's batch ramp, DeepSeek-V2's 2,304 → 9,216 sequences). LEGW already
says how the LR and the warmup follow the batch, and the plan already counts progress in epochs; a ramp is that
change made inside one run. Two pieces, no framework in either:

* :class:`BatchRamp` — the global batch as a function of progress: stages ``batch@epoch`` (``"256@0,1024@0.5,4096@2"``:
  256 from the start, 1024 from epoch 0.5, 4096 from epoch 2).
* :class:`RampedPlan` — a :class:`~legw_hf.plan.LegwConfig` and a ramp applied to one run (dataset size, epochs,
  the samples one micro-batch step takes across all processes). Update ``n`` belongs to the stage in which its
  progress *starts*, so an update never straddles two batches; its LR is the LEGW plan of its stage's batch
  (peak × √(B/B0), warmup × B/B0 epochs, the same decay in epochs) at the progress the update completes, and it
  accumulates ``B / (micro-batch × processes)`` micro-batches.

Progress is counted in samples: an update at batch B advances it by B / dataset_size epochs, across epoch ends.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingError, positive, positive_int
from .plan import LegwConfig, LegwPlan


@dataclass(frozen=True)
class RampStage:
    """From ``start`` epochs of progress on, updates take ``batch_size`` samples."""

    batch_size: int
    start: float


def _ceil(x: float) -> int:
    # a product of progress points and dataset sizes lands on an integer up to float noise
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


@dataclass(frozen=True)
class BatchRamp:
    """The global batch of a run as a function of progress in epochs: ``stages`` in order, the first at 0."""

    stages: tuple[RampStage, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise SettingError("batch_ramp", "must have at least one stage (batch@epoch)", self.to_text())
        for stage in self.stages:
            positive_int("batch_ramp", stage.batch_size)
            if isinstance(stage.start, bool) or not isinstance(stage.start, (int, float)) or not stage.start >= 0:
                raise SettingError("batch_ramp", "must give each stage's start as epochs >= 0", self.to_text())
        if self.stages[0].start != 0:
            raise SettingError("batch_ramp", "must start its first stage at epoch 0 (batch@0)", self.to_text())
        starts = [stage.start for stage in self.stages]
        if any(later <= earlier for earlier, later in itertools.pairwise(starts)):
            raise SettingError("batch_ramp", "must give strictly increasing progress points", self.to_text())

    @classmethod
    def parse(cls, text: str) -> BatchRamp:
        """``"256@0,1024@0.5,4096@2"``: comma-separated ``batch@epoch`` stages."""
        stages = []
        for part in str(text).split(","):
            batch, at, start = part.strip().partition("@")
            try:
                stages.append(RampStage(int(batch), float(start)))
            except ValueError:
                raise SettingError(
                    "batch_ramp", "must be comma-separated batch@epoch stages, e.g. 256@0,1024@0.5", text
                ) from None
            if not at:
                raise SettingError("batch_ramp", "must give every stage as batch@epoch, e.g. 256@0", text)
        return cls(tuple(stages))

    def to_text(self) -> str:
        return ",".join(f"{stage.batch_size}@{stage.start:g}" for stage in self.stages)

    def batch_at(self, epoch: float) -> int:
        """The batch of an update that starts at ``epoch`` epochs of progress."""
        starts = [stage.start for stage in self.stages]
        return self.stages[max(bisect.bisect_right(starts, epoch + 1e-12) - 1, 0)].batch_size


@dataclass(frozen=True)
class StagePlan:
    """One stage as a run takes it: updates ``first_update`` to ``first_update + updates - 1`` at ``plan``'s
    batch, each accumulating ``accumulation`` micro-batch steps, starting ``start_sample`` samples into the run."""

    plan: LegwPlan
    accumulation: int
    first_update: int
    updates: int
    start_sample: int

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size


def _nearest_multiples(batch: int, unit: int) -> str:
    below = batch // unit * unit
    return ", ".join(str(b) for b in (below, below + unit) if b > 0)


@dataclass(frozen=True, kw_only=True)
class RampedPlan:
    """A LEGW config and a :class:`BatchRamp` applied to one run. Build it with :func:`ramped_plan`.

    ``plans`` holds the LEGW plan of each stage's batch over the whole run (``epochs`` of ``dataset_size``
    examples); ``micro_step_samples`` is what one micro-batch step takes over all processes (per-device batch ×
    data-parallel processes).
    """

    ramp: BatchRamp
    plans: tuple[LegwPlan, ...]
    micro_step_samples: int
    stages: tuple[StagePlan, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plans", tuple(self.plans))
        positive_int("micro_step_samples", self.micro_step_samples)
        if len(self.plans) != len(self.ramp.stages):
            raise SettingError("plans", "must hold one plan per ramp stage", len(self.plans))
        first = self.plans[0]
        size, epochs = first.dataset_size, first.epochs
        stages, sample, update = [], 0, 0
        ends = [stage.start for stage in self.ramp.stages[1:]] + [epochs]
        for stage, plan, end in zip(self.ramp.stages, self.plans, ends, strict=True):
            if plan.batch_size != stage.batch_size or (plan.dataset_size, plan.epochs) != (size, epochs):
                raise SettingError("plans", "must be the plans of the ramp's batches over one run", plan.batch_size)
            if stage.batch_size % self.micro_step_samples:
                raise SettingError(
                    "batch_ramp",
                    f"has a stage batch ({stage.batch_size}) that micro-batch x processes = {self.micro_step_samples} "
                    f"does not divide; the nearest batches that reach it: "
                    f"{_nearest_multiples(stage.batch_size, self.micro_step_samples)}",
                    self.ramp.to_text(),
                )
            # the updates that start before the next stage's point (none when the last stage's overshoot passed it)
            count = max(_ceil((min(end, epochs) * size - sample) / stage.batch_size), 0)
            stages.append(StagePlan(plan, stage.batch_size // self.micro_step_samples, update, count, sample))
            sample += count * stage.batch_size
            update += count
        if update == 0:
            raise SettingError("epochs", "must give the run at least one update", epochs)
        object.__setattr__(self, "stages", tuple(stages))

    @property
    def dataset_size(self) -> int:
        return self.plans[0].dataset_size

    @property
    def epochs(self) -> float:
        return self.plans[0].epochs

    @property
    def base_lr(self) -> float:
        return self.plans[0].base_lr

    @property
    def total_steps(self) -> int:
        return sum(stage.updates for stage in self.stages)

    def stage_of(self, update: int) -> StagePlan:
        """The stage update ``update`` (0-based) belongs to; past the end, the last stage with updates."""
        firsts = [stage.first_update for stage in self.stages if stage.updates]
        running = [stage for stage in self.stages if stage.updates]
        return running[max(bisect.bisect_right(firsts, update) - 1, 0)]

    def samples_before(self, update: int) -> int:
        """Samples the run has taken when update ``update`` starts."""
        stage = self.stage_of(update)
        return stage.start_sample + (update - stage.first_update) * stage.batch_size

    def batch_for_update(self, update: int) -> int:
        return self.stage_of(update).batch_size

    def accumulation_for_update(self, update: int) -> int:
        """Micro-batch steps update ``update`` accumulates."""
        return self.stage_of(update).accumulation

    def lr_for_update(self, update: int) -> float:
        """LEGW's LR for the batch of update ``update`` at the progress that update completes."""
        stage = self.stage_of(update)
        done = self.samples_before(update) + stage.batch_size
        return stage.plan.lr_at_epoch(done / self.dataset_size)

    def describe(self) -> str:
        lines = [
            f"LEGW batch ramp {self.ramp.to_text()}: base batch {self.plans[0].base_batch_size}, base LR "
            f"{self.base_lr:.6g}, {self.epochs:g} epochs of {self.dataset_size}, {self.total_steps} updates"
        ]
        for stage in self.stages:
            if not stage.updates:
                lines.append(f"  batch {stage.batch_size}: no update (the previous stage ran past its start)")
                continue
            last = stage.first_update + stage.updates - 1
            lines.append(
                f"  batch {stage.batch_size} (k={stage.plan.k:g}, accumulation {stage.accumulation}): updates "
                f"{stage.first_update}-{last} ({stage.updates}), epochs {stage.start_sample / self.dataset_size:g}-"
                f"{(stage.start_sample + stage.updates * stage.batch_size) / self.dataset_size:g}, LR "
                f"{self.lr_for_update(stage.first_update):.6g} -> {self.lr_for_update(last):.6g} (peak "
                f"{stage.plan.peak_lr:.6g}, warmup {stage.plan.warmup_epochs:g} epochs)"
            )
        return "\n".join(lines)

    def summary(self) -> list[dict[str, Any]]:
        """One row per stage: the numbers a user checks before training."""
        return [
            {
                "batch": stage.batch_size,
                "k": stage.plan.k,
                "accumulation": stage.accumulation,
                "first_update": stage.first_update,
                "updates": stage.updates,
                "start_epoch": stage.start_sample / self.dataset_size,
                "peak_lr": stage.plan.peak_lr,
                "warmup_epochs": stage.plan.warmup_epochs,
            }
            for stage in self.stages
        ]

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (``torch.load(weights_only=True)`` and JSON both take it)."""
        return {
            "ramp": self.ramp.to_text(),
            "micro_step_samples": self.micro_step_samples,
            "plans": [plan.to_dict() for plan in self.plans],
            "stages": self.summary(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RampedPlan:
        return cls(
            ramp=BatchRamp.parse(data["ramp"]),
            plans=tuple(LegwPlan.from_dict(plan) for plan in data["plans"]),
            micro_step_samples=data["micro_step_samples"],
        )


def ramped_plan(
    config: LegwConfig,
    ramp: BatchRamp | str,
    *,
    dataset_size: int,
    epochs: float,
    micro_step_samples: int,
) -> RampedPlan:
    """The plan of a run of ``epochs`` epochs of ``dataset_size`` examples whose global batch follows ``ramp``.

    Args:
        config: the tuned base settings (base batch, base LR, base warmup, rule, decay).
        ramp: a :class:`BatchRamp` or its text, ``"256@0,1024@0.5,4096@2"``.
        dataset_size: examples per epoch.
        epochs: the run's length in epochs (the same as the base run's).
        micro_step_samples: samples of one micro-batch step over all processes (per-device batch × processes);
            every stage batch must be a multiple of it (the error names the nearest that are).
    """
    if not isinstance(ramp, BatchRamp):
        ramp = BatchRamp.parse(ramp)
    positive_int("dataset_size", dataset_size)
    positive("epochs", epochs)
    last_start = ramp.stages[-1].start
    if last_start >= epochs:
        raise SettingError(
            "batch_ramp", f"must start every stage before the run ends ({epochs:g} epochs)", ramp.to_text()
        )
    plans = tuple(
        config.plan(batch_size=stage.batch_size, dataset_size=dataset_size, epochs=epochs) for stage in ramp.stages
    )
    return RampedPlan(ramp=ramp, plans=plans, micro_step_samples=micro_step_samples)


__all__ = ["BatchRamp", "RampStage", "RampedPlan", "StagePlan", "ramped_plan"]
