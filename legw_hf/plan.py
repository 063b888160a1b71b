"""The LEGW plan: the schedule a run at a new global batch should use, derived from a tuned base run.

LEGW (You et al., "Large-Batch Training for LSTM and Beyond", SC'19): when the global batch grows k times,
scale the peak LR by √k and the warmup *in epochs* by k, keeping the epochs and the decay shape (in epochs).
The warmup in *steps* is then the same at every batch size.

Two layers, no framework in either:

* :class:`LegwConfig` — what the user tuned (base batch, base LR, base warmup), the scaling rule and the
  decay shape. It does not depend on the run.
* :class:`LegwPlan` — a config applied to one run's shape (global batch, dataset size, training length).
  It owns every derived number (k, peak LR, warmup epochs and steps, steps per epoch, total steps) and the
  LR of every update. :class:`PhasedPlan` chains plans (e.g. BERT phase 1 at seq 128, phase 2 at seq 512).

Steps are counted the way Trainer counts them: ``ceil(dataset_size / batch)`` per epoch (floor with
``drop_last``) and ``ceil(epochs · steps_per_epoch)`` in all.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, fields
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from .errors import SettingError, non_negative, one_of, positive, positive_int
from .schedules import Decay, Polynomial, decay_from_dict, lr_at_epoch

#: Scaling rules as data: (exponent of k on the peak LR, exponent of k on the warmup epochs).
RULES: dict[str, tuple[float, float]] = {
    "legw": (0.5, 1.0),  # You et al. 2019: sqrt LR, linear-epoch warmup
    "sqrt": (0.5, 0.0),  # sqrt LR, warmup epochs unchanged
    "linear": (1.0, 0.0),  # Goyal et al. 2017: linear LR, warmup epochs unchanged
    "none": (0.0, 0.0),
}


def epoch_steps(dataset_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer updates per epoch, as Trainer counts them."""
    return dataset_size // batch_size if drop_last else -(-dataset_size // batch_size)


def _ceil_count(x: float) -> int:
    # Products like 0.3125·k·steps_per_epoch land on integers up to float noise; an ulp over must not add a step.
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def _scaled(value: float, ratio: Fraction, exponent: float) -> float:
    """``value · ratio**exponent`` rounded once to float.

    Chaining float operations drifts by an ulp; rounding once makes the LEGW reference settings exact
    (2^2.5 · √2 is 2^3, not 8.000000000000002).
    """
    if exponent == 0:
        return float(value)
    with localcontext() as ctx:
        ctx.prec = 60
        r = Decimal(ratio.numerator) / Decimal(ratio.denominator)
        return float(Decimal(value) * r ** Decimal(exponent))


def _require_steps(count: int, field: str, batch_size: int, dataset_size: int) -> None:
    if count == 0:
        raise SettingError(
            field, f"must not exceed dataset_size ({dataset_size}) with drop_last on: 0 steps per epoch", batch_size
        )


@dataclass(frozen=True, kw_only=True)
class LegwPlan:
    """A LEGW config applied to one run. Construct it with :meth:`LegwConfig.plan`.

    The LR of update ``n`` (0-based) is the schedule at the progress that update completes,
    ``(n + 1) / steps_per_epoch`` epochs: the first update gets a small positive LR, never 0, and the peak is
    reached on the last warmup step (the convention of the NVIDIA BERT recipe).
    """

    base_batch_size: int
    base_lr: float
    base_warmup_epochs: float
    rule: str
    decay: Decay
    batch_size: int
    dataset_size: int
    epochs: float
    steps_per_epoch: int
    total_steps: int
    drop_last: bool = False

    k: float = field(init=False)
    peak_lr: float = field(init=False)
    warmup_epochs: float = field(init=False)
    warmup_steps: int = field(init=False)

    def __post_init__(self) -> None:
        positive_int("base_batch_size", self.base_batch_size)
        positive("base_lr", self.base_lr)
        non_negative("base_warmup_epochs", self.base_warmup_epochs)
        one_of("rule", self.rule, tuple(RULES))
        positive_int("batch_size", self.batch_size)
        positive_int("dataset_size", self.dataset_size)
        positive("epochs", self.epochs)
        positive_int("steps_per_epoch", self.steps_per_epoch)
        positive_int("total_steps", self.total_steps)

        ratio = Fraction(self.batch_size, self.base_batch_size)
        lr_exponent, warmup_exponent = RULES[self.rule]
        set_ = object.__setattr__
        set_(self, "k", float(ratio))
        set_(self, "peak_lr", _scaled(self.base_lr, ratio, lr_exponent))
        set_(self, "warmup_epochs", _scaled(self.base_warmup_epochs, ratio, warmup_exponent))
        set_(self, "warmup_steps", _ceil_count(self.warmup_epochs * self.steps_per_epoch))
        if self.warmup_epochs >= self.epochs:
            raise SettingError(
                "base_warmup_epochs",
                f"must give a warmup shorter than training ({self.epochs:g} epochs)",
                self.base_warmup_epochs,
                detail=f"rule {self.rule!r} at batch {self.batch_size} (k={self.k:g}) makes it "
                f"{self.warmup_epochs:g} epochs",
            )
        self.decay.check(self.peak_lr, self.warmup_epochs, self.epochs)

    def lr_at_epoch(self, epoch: float) -> float:
        """The LR at ``epoch`` epochs of progress (clamped to the run)."""
        return lr_at_epoch(
            epoch, peak_lr=self.peak_lr, warmup_epochs=self.warmup_epochs, epochs=self.epochs, decay=self.decay
        )

    def lr_for_update(self, update: int) -> float:
        """The LR of update ``update`` (0-based): the schedule at the progress that update completes."""
        return self.lr_at_epoch((update + 1) / self.steps_per_epoch)

    def summary(self) -> dict[str, Any]:
        """The numbers a user checks before training."""
        return {
            "batch": self.batch_size,
            "k": self.k,
            "rule": self.rule,
            "peak_lr": self.peak_lr,
            "warmup_epochs": self.warmup_epochs,
            "warmup_steps": self.warmup_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.epochs,
            "decay": self.decay.name,
        }

    def describe(self) -> str:
        s = self.summary()
        return (
            f"LEGW plan ({s['rule']}): batch {s['batch']} (k={s['k']:g} x base {self.base_batch_size}), "
            f"peak LR {s['peak_lr']:.6g} (base {self.base_lr:.6g}), warmup {s['warmup_epochs']:g} epochs = "
            f"{s['warmup_steps']} steps, {s['steps_per_epoch']} steps/epoch, {s['total_steps']} steps "
            f"({s['epochs']:g} epochs), {s['decay']} decay"
        )

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (``torch.load(weights_only=True)`` and JSON both take it)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data["decay"] = self.decay.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LegwPlan:
        init = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in data.items() if k in init}
        kwargs["decay"] = decay_from_dict(data["decay"])
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class LegwConfig:
    """What was tuned at the base batch, and how to scale it.

    Args:
        base_batch_size: global batch B0 the base settings were tuned at.
        base_lr: peak LR η0 at B0.
        base_warmup_epochs: the base warmup in epochs (or give ``base_warmup_steps``: exactly one of the two).
        base_warmup_steps: the base warmup in optimizer steps at B0.
        rule: ``legw`` (√k LR, k× warmup epochs), ``sqrt`` (√k LR), ``linear`` (k× LR) or ``none``.
        decay: the decay shape after warmup, in epochs (:mod:`legw_hf.schedules`).
    """

    base_batch_size: int
    base_lr: float
    base_warmup_epochs: float | None = None
    base_warmup_steps: float | None = None
    rule: str = "legw"
    decay: Decay = field(default_factory=Polynomial)

    def __post_init__(self) -> None:
        positive_int("base_batch_size", self.base_batch_size)
        positive("base_lr", self.base_lr)
        one_of("rule", self.rule, tuple(RULES))
        if (self.base_warmup_epochs is None) == (self.base_warmup_steps is None):
            raise SettingError(
                "base_warmup_epochs",
                "or {0} must be given, exactly one of them",
                (self.base_warmup_epochs, self.base_warmup_steps),
                also=("base_warmup_steps",),
            )
        if self.base_warmup_epochs is not None:
            non_negative("base_warmup_epochs", self.base_warmup_epochs)
        else:
            non_negative("base_warmup_steps", self.base_warmup_steps)
        if not isinstance(self.decay, Decay):
            raise SettingError("decay", "must be a legw_hf.schedules decay shape", self.decay)

    def plan(
        self,
        *,
        batch_size: int,
        dataset_size: int,
        epochs: float | None = None,
        base_steps: int | None = None,
        steps: int | None = None,
        drop_last: bool = False,
        steps_per_epoch: int | None = None,
    ) -> LegwPlan:
        """The plan for a run at global batch ``batch_size`` over ``dataset_size`` examples per epoch.

        The training length is exactly one of ``epochs``, ``base_steps`` (optimizer steps at the base batch,
        converted to epochs) or ``steps`` (optimizer steps at ``batch_size``, e.g. Trainer's ``max_steps``).
        ``steps_per_epoch`` overrides the computed count with the real dataloader's (Trainer, accelerate).
        """
        positive_int("batch_size", batch_size)
        positive_int("dataset_size", dataset_size)
        lengths = {"epochs": epochs, "base_steps": base_steps, "steps": steps}
        given = [name for name, value in lengths.items() if value is not None]
        if len(given) != 1:
            raise SettingError("epochs", "or base_steps or steps must be given, exactly one of them", lengths)
        base_spe = epoch_steps(dataset_size, self.base_batch_size, drop_last)
        if steps_per_epoch is None:
            steps_per_epoch = epoch_steps(dataset_size, batch_size, drop_last)
            _require_steps(steps_per_epoch, "batch_size", batch_size, dataset_size)
        positive_int("steps_per_epoch", steps_per_epoch)

        if epochs is not None:
            positive("epochs", epochs)
            total_steps = math.ceil(epochs * steps_per_epoch)  # Trainer's own expression
        elif base_steps is not None:
            positive_int("base_steps", base_steps)
            _require_steps(base_spe, "base_batch_size", self.base_batch_size, dataset_size)
            epochs = base_steps / base_spe
            total_steps = _ceil_count(epochs * steps_per_epoch)
        else:
            positive_int("steps", steps)
            epochs = steps / steps_per_epoch
            total_steps = steps
        if self.base_warmup_epochs is not None:
            warmup = self.base_warmup_epochs
        else:
            _require_steps(base_spe, "base_batch_size", self.base_batch_size, dataset_size)
            warmup = self.base_warmup_steps / base_spe
        try:
            return LegwPlan(
                base_batch_size=self.base_batch_size,
                base_lr=self.base_lr,
                base_warmup_epochs=warmup,
                rule=self.rule,
                decay=self.decay,
                batch_size=batch_size,
                dataset_size=dataset_size,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                total_steps=total_steps,
                drop_last=drop_last,
            )
        except SettingError as error:
            if error.field == "base_warmup_epochs" and self.base_warmup_steps is not None:
                raise SettingError(
                    "base_warmup_steps", error.requirement, self.base_warmup_steps, detail=error.detail
                ) from None
            raise


@dataclass(frozen=True)
class Phase:
    """One phase of a multi-phase run, e.g. BERT phase 2 at sequence length 512."""

    name: str
    plan: LegwPlan


@dataclass(frozen=True)
class PhasedPlan:
    """Plans run back to back, each with its own batch, peak LR and a re-warmup from 0.

    Update ``u`` of the whole run belongs to the phase whose step range contains it; within a phase the
    LR is that phase's :meth:`LegwPlan.lr_for_update` of the phase-local update.
    """

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "phases", tuple(self.phases))
        if not self.phases:
            raise SettingError("phases", "must list at least one phase", [])
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise SettingError("phases", "must have distinct names", names)

    @property
    def phase_starts(self) -> tuple[int, ...]:
        starts, total = [], 0
        for phase in self.phases:
            starts.append(total)
            total += phase.plan.total_steps
        return tuple(starts)

    @property
    def total_steps(self) -> int:
        return sum(p.plan.total_steps for p in self.phases)

    @property
    def base_lr(self) -> float:
        return self.phases[0].plan.base_lr

    def locate(self, update: int) -> tuple[int, int]:
        """(phase index, phase-local update) of global update ``update``; past the end stays in the last."""
        starts = self.phase_starts
        index = max(bisect.bisect_right(starts, update) - 1, 0)
        return index, update - starts[index]

    def lr_for_update(self, update: int) -> float:
        index, local = self.locate(update)
        return self.phases[index].plan.lr_for_update(local)

    def describe(self) -> str:
        return "\n".join(f"phase {p.name}: {p.plan.describe()}" for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return {"phases": [{"name": p.name, "plan": p.plan.to_dict()} for p in self.phases]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhasedPlan:
        return cls(tuple(Phase(p["name"], LegwPlan.from_dict(p["plan"])) for p in data["phases"]))


def plan_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a plan saved with ``to_dict``: a :class:`LegwPlan`, a :class:`PhasedPlan` or a
    :class:`~legw_hf.ramp.RampedPlan`."""
    if "ramp" in data:
        from .ramp import RampedPlan  # built on this module

        return RampedPlan.from_dict(data)
    return PhasedPlan.from_dict(data) if "phases" in data else LegwPlan.from_dict(data)
