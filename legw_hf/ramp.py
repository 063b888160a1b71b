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

A ramp can also be decided during the run from the measured gradient noise scale (:class:`AutoRamp`): a
:class:`RampController` doubles the batch while doubling is still efficient, and each change becomes one more stage
of the run's :class:`RampedPlan` (:meth:`RampedPlan.with_stage`), starting at the progress the run had reached. Its
decisions (:class:`RampDecision`) written as a ramp (:func:`ramp_from_decisions`) replay the run as a scheduled one.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SettingError, positive, positive_int
from .noise_scale import b_simple, doubling_efficiency
from .plan import LegwConfig, LegwPlan


@dataclass(frozen=True)
class RampStage:
    """From ``start`` epochs of progress on, updates take ``batch_size`` samples."""

    batch_size: int
    start: float


def _epoch_text(epoch: float) -> str:
    """A stage start as a ramp writes it: short where that is exact, else every digit (a stage an automatic ramp
    started at ``samples / dataset_size`` must be read back as the same number, or an update would change stage)."""
    short = f"{epoch:g}"
    return short if float(short) == epoch else repr(float(epoch))


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
        return ",".join(f"{stage.batch_size}@{_epoch_text(stage.start)}" for stage in self.stages)

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
    _running: tuple[StagePlan, ...] = field(init=False, repr=False, compare=False)
    _firsts: list[int] = field(init=False, repr=False, compare=False)

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
        # the stages that take updates, looked up on every update by the scheduler
        object.__setattr__(self, "_running", tuple(stage for stage in stages if stage.updates))
        object.__setattr__(self, "_firsts", [stage.first_update for stage in self._running])

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

    def with_stage(self, plan: LegwPlan, start: float) -> RampedPlan:
        """This plan and one more stage: ``plan``'s batch (a LEGW plan of the same run) from ``start`` epochs on.

        The updates that start before ``start`` keep their batch and LR; with ``start`` = the samples taken so far /
        the dataset size, the stage begins with the next update (what an automatic ramp does at a change).
        """
        ramp = BatchRamp((*self.ramp.stages, RampStage(plan.batch_size, start)))
        return RampedPlan(ramp=ramp, plans=(*self.plans, plan), micro_step_samples=self.micro_step_samples)

    def stage_of(self, update: int) -> StagePlan:
        """The stage update ``update`` (0-based) belongs to; past the end, the last stage with updates."""
        running = self._running
        return running[max(bisect.bisect_right(self._firsts, update) - 1, 0)]

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

    def has_updates_of(self, saved: dict[str, Any]) -> bool:
        """Whether the plan ``saved`` (:meth:`to_dict`, a checkpoint's, say) takes this plan's updates: the same
        ramp over the same data and length, whatever its micro-batch step (processes x per-device batch)."""
        return saved.get("ramp") == self.ramp.to_text() and saved.get("plans") == [p.to_dict() for p in self.plans]

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


def _doublings(start: int, cap: int) -> list[int]:
    batches = [start]
    while batches[-1] < cap:
        batches.append(2 * batches[-1])
    return batches


@dataclass(frozen=True, kw_only=True)
class AutoRamp:
    """A batch ramp decided during the run from the measured gradient noise scale.

    The run starts at ``start_batch`` (by default the dataloader's global batch) and doubles its batch at an update
    boundary when doubling is still efficient. Doubling B gives AdaScale's gain of 2B over B
    (:func:`~legw_hf.noise_scale.gain` with scale 2),

        r = (1 + B_simple/B) / (1 + B_simple/(2B)),   efficiency e = r / 2 = (B + B_simple) / (2B + B_simple),

    the fraction of the doubled batch's samples that still buy progress (1 when B ≪ B_simple, 1/2 when B ≫ B_simple).
    The batch doubles when e ≥ ``efficiency``, which solves to

        B ≤ B_simple · (1 − efficiency) / (2 · efficiency − 1)       (efficiency 0.8: B ≤ B_simple / 3),

    provided that

    * at least ``patience`` updates ran at the current batch (from the start and after every change), so that the
      moving averages of tr Σ and ‖G‖² reflect it;
    * the estimate B_simple = tr Σ / ‖G‖² is finite (a positive signal estimate);
    * 2B ≤ ``max_batch``, and the run has an update left.

    Args:
        max_batch: the largest batch the ramp may reach: the start batch times a power of 2.
        efficiency: the threshold on e, in (0.5, 1): 0.5 would always double, 1 never.
        patience: updates at a batch before the next decision (>= 1).
        start_batch: the first stage's batch; by default the dataloader's global batch (per-device × processes). It
            must give at least 2 gradient estimates per update (accumulation × processes).
        log: a file to append each decision to, as one JSON line (main process only).
    """

    max_batch: int
    efficiency: float = 0.8
    patience: int = 20
    start_batch: int | None = None
    log: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        positive_int("max_batch", self.max_batch)
        positive_int("patience", self.patience)
        if self.start_batch is not None:
            positive_int("start_batch", self.start_batch)
        e = self.efficiency
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.5 < e < 1:
            raise SettingError(
                "efficiency",
                "must be in (0.5, 1): doubling the batch is (B + B_simple) / (2B + B_simple) efficient, which is "
                "always > 0.5 and never > 1",
                e,
            )

    @property
    def batch_ratio(self) -> float:
        """The batch doubles while B ≤ ``batch_ratio`` · B_simple: (1 − e) / (2e − 1) for the threshold e."""
        return (1 - self.efficiency) / (2 * self.efficiency - 1)

    def batches(self, start_batch: int) -> list[int]:
        """The batches a run starting at ``start_batch`` can take: doublings up to ``max_batch``."""
        return _doublings(start_batch, self.max_batch)

    def check(self, start_batch: int, *, micro_batch: int, micro_step_samples: int) -> None:
        """Refuse a start and cap the ramp cannot run: a start that ``micro_step_samples`` (one micro-batch step over
        all processes) does not divide, a cap below the start or not a doubling of it, or fewer than 2 gradient
        estimates (of ``micro_batch`` samples each) per update at the start."""
        positive_int("start_batch", start_batch)
        if start_batch % micro_step_samples:
            raise SettingError(
                "start_batch",
                f"must be a multiple of per-device batch x processes = {micro_step_samples}; the nearest: "
                f"{_nearest_multiples(start_batch, micro_step_samples)}",
                start_batch,
            )
        if self.max_batch < start_batch:
            raise SettingError("max_batch", f"must be >= the start batch ({start_batch})", self.max_batch)
        reached = self.batches(start_batch)[-1]
        if reached != self.max_batch:
            raise SettingError(
                "max_batch",
                f"must be reachable by doubling the start batch ({start_batch}); the nearest: {reached // 2}, "
                f"{reached}",
                self.max_batch,
            )
        if start_batch // micro_batch < 2:
            raise SettingError(
                "start_batch",
                f"must give at least 2 gradient estimates per update (accumulation x processes = start batch / "
                f"per-device batch {micro_batch}) for the noise scale to be measured",
                start_batch,
            )

    def plans(
        self, config: LegwConfig, *, micro_batch: int, micro_step_samples: int, dataset_size: int, epochs: float
    ) -> tuple[RampedPlan, dict[int, LegwPlan]]:
        """The run's first plan (one stage, at the start batch) and the LEGW plan of every batch the ramp may double
        to, for ``epochs`` of ``dataset_size`` samples in micro-batch steps of ``micro_step_samples`` (``micro_batch``
        per process). A start, cap or batch the run cannot take is refused here, before any work (:meth:`check`)."""
        positive_int("dataset_size", dataset_size)
        positive("epochs", epochs)
        start = micro_step_samples if self.start_batch is None else self.start_batch
        self.check(start, micro_batch=micro_batch, micro_step_samples=micro_step_samples)
        plans = {}
        for batch in self.batches(start):
            try:
                plans[batch] = config.plan(batch_size=batch, dataset_size=dataset_size, epochs=epochs)
            except SettingError as error:
                reason = f"must be a batch LEGW can plan for this run: at batch {batch}, {error}"
                raise SettingError("max_batch", reason, self.max_batch) from None
        first = RampedPlan(
            ramp=BatchRamp((RampStage(start, 0.0),)), plans=(plans[start],), micro_step_samples=micro_step_samples
        )
        return first, plans

    def takes(self, ramp: BatchRamp, start_batch: int) -> bool:
        """Whether ``ramp`` is one this automatic ramp can have decided from ``start_batch``: its stages are that
        batch and its doublings in order, none above the cap (a checkpoint's ramp, say)."""
        batches = [stage.batch_size for stage in ramp.stages]
        return batches == self.batches(start_batch)[: len(batches)]


#: Why an automatic ramp does not run beside a backend (the accelerate and Trainer refusals say it). Under DeepSpeed
#: (ZeRO 1-3) it runs, in accelerate loops and in Trainer, with DeepSpeed's own refusals of the statistics
#: (:func:`legw_hf.integrations.deepspeed.adascale_refusal`).
AUTO_RAMP_UNSUPPORTED = {
    "FSDP": "each micro-batch's own gradient is reduce-scattered into shards before it can be measured",
}


@dataclass(frozen=True)
class RampDecision:
    """One change of an automatic ramp: from ``update`` (0-based, the first update at ``new_batch``) on, after
    ``samples`` samples (``epoch`` = samples / dataset size), the batch is ``new_batch`` instead of ``old_batch``; the
    estimates that triggered it (moving averages after update ``update - 1``) and the efficiency of doubling."""

    update: int
    samples: int
    epoch: float
    b_simple: float
    trace: float
    signal: float
    efficiency: float
    old_batch: int
    new_batch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RampDecision:
        return cls(**data)


class RampController:
    """The decisions of an :class:`AutoRamp` over one run, from the estimates after each update (no torch here).

    Call :meth:`observe` after each applied update with the samples the run has taken and the moving averages of
    tr Σ (per sample) and ‖G‖²; it returns the :class:`RampDecision` when the batch doubles from the next update on.
    Fed the same estimates, it makes the same decisions.
    """

    def __init__(self, settings: AutoRamp, start_batch: int, *, dataset_size: int, epochs: float) -> None:
        self.settings = settings
        self.dataset_size = dataset_size
        self.epochs = epochs
        self.start_batch = start_batch
        #: The current batch.
        self.batch = start_batch
        #: Updates observed at the current batch.
        self.updates_at_batch = 0
        self.decisions: list[RampDecision] = []

    def observe(self, *, update: int, samples: int, trace: float | None, signal: float | None) -> RampDecision | None:
        """After update ``update`` (0-based) at the current batch, ``samples`` taken in all: double or not."""
        self.updates_at_batch += 1
        if self.updates_at_batch < self.settings.patience or trace is None or signal is None:
            return None
        estimate = b_simple(trace, signal)
        new_batch = 2 * self.batch
        if not math.isfinite(estimate) or new_batch > self.settings.max_batch:
            return None
        epoch = samples / self.dataset_size
        if epoch >= self.epochs:  # no update left
            return None
        efficiency = doubling_efficiency(trace, signal, batch=self.batch)
        if efficiency < self.settings.efficiency:
            return None
        # fields in order: the first update at the new batch, samples, epoch, the estimates, the efficiency, batches
        decision = RampDecision(update + 1, samples, epoch, estimate, trace, signal, efficiency, self.batch, new_batch)
        self.batch, self.updates_at_batch = new_batch, 0
        self.decisions.append(decision)
        return decision

    def state_dict(self) -> dict[str, Any]:
        """Primitives only."""
        return {
            "batch": self.batch,
            "updates_at_batch": self.updates_at_batch,
            "decisions": [decision.to_dict() for decision in self.decisions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch, self.updates_at_batch = int(state["batch"]), int(state["updates_at_batch"])
        self.decisions = [RampDecision.from_dict(decision) for decision in state["decisions"]]


def read_decisions(path: str | os.PathLike) -> list[RampDecision]:
    """The decisions of a JSON-lines decision log (:attr:`AutoRamp.log`)."""
    with open(path) as log:
        return [RampDecision.from_dict(json.loads(line)) for line in log if line.strip()]


def write_decisions(path: str | os.PathLike, decisions: Iterable[RampDecision]) -> None:
    """A decision log (:attr:`AutoRamp.log`) holding ``decisions`` alone, as a run resumed from a checkpoint starts
    it: the changes up to the checkpoint (a log that ran past it would otherwise get the later ones twice)."""
    from .record import replace_file  # (record imports this module)

    replace_file(path, "".join(json.dumps(decision.to_dict()) + "\n" for decision in decisions))


def ramp_from_decisions(decisions: Iterable[RampDecision | dict[str, Any]], *, start_batch: int | None = None) -> str:
    """The :class:`BatchRamp` text of an automatic run's decisions: a scheduled ramp that replays it (each stage
    starts at the exact progress of its change, so every update takes the same batch and LR).

    ``start_batch`` is needed only without decisions (otherwise the first decision's old batch).
    """
    decisions = [d if isinstance(d, RampDecision) else RampDecision.from_dict(d) for d in decisions]
    if decisions:
        start_batch = decisions[0].old_batch if start_batch is None else start_batch
        if start_batch != decisions[0].old_batch:
            raise SettingError(
                "start_batch", f"must be the first decision's old batch ({decisions[0].old_batch})", start_batch
            )
    elif start_batch is None:
        raise SettingError("start_batch", "is needed to replay a run without decisions", None)
    stages = [RampStage(start_batch, 0.0), *(RampStage(d.new_batch, d.epoch) for d in decisions)]
    return BatchRamp(tuple(stages)).to_text()


__all__ = [
    "AUTO_RAMP_UNSUPPORTED",
    "AutoRamp",
    "BatchRamp",
    "RampController",
    "RampDecision",
    "RampStage",
    "RampedPlan",
    "StagePlan",
    "ramp_from_decisions",
    "ramped_plan",
    "read_decisions",
    "write_decisions",
]
