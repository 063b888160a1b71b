"""Learning-rate schedules as pure functions of training progress measured in epochs.

A schedule is a linear warmup from 0 to the peak LR followed by one decay shape. Decay shapes are small
frozen dataclasses: their parameters are data (they round-trip through :meth:`to_dict` / :func:`decay_from_dict`),
and :meth:`lr` is the whole formula. Nothing here knows about steps, batches or torch.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .errors import SettingError, non_negative, positive


@dataclass(frozen=True)
class Decay:
    """Base of the decay shapes. ``lr`` is only called for ``warmup_epochs <= epoch <= epochs``.

    Options that are wrong whatever the run (a negative power) fail when the shape is built; ``check`` adds
    what depends on the run (an end LR above this batch size's peak, a milestone after the last epoch).
    """

    name: ClassVar[str]

    def lr(self, peak_lr: float, epoch: float, warmup_epochs: float, epochs: float) -> float:
        raise NotImplementedError

    def check(self, peak_lr: float, warmup_epochs: float, epochs: float) -> None:
        """Raise :class:`SettingError` if the shape does not fit a run with these settings."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}


def _check_end_lr(end_lr: float, peak_lr: float) -> None:
    if end_lr > peak_lr:
        raise SettingError("end_lr", f"must not exceed the peak LR ({peak_lr:.6g})", end_lr)


def _decay_fraction(epoch: float, warmup_epochs: float, epochs: float) -> float:
    return (epoch - warmup_epochs) / (epochs - warmup_epochs)


@dataclass(frozen=True)
class Polynomial(Decay):
    """``end + (peak - end) · (1 - f)^power``, f the fraction of the post-warmup epochs done.

    power 1 is linear decay (LAMB paper), 0.5 the NVIDIA BERT recipe, 2 the LEGW ImageNet runs.
    """

    name: ClassVar[str] = "poly"
    power: float = 1.0
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        positive("power", self.power)
        non_negative("end_lr", self.end_lr)

    def lr(self, peak_lr, epoch, warmup_epochs, epochs):
        remaining = 1.0 - _decay_fraction(epoch, warmup_epochs, epochs)
        return self.end_lr + (peak_lr - self.end_lr) * remaining**self.power

    def check(self, peak_lr, warmup_epochs, epochs):
        _check_end_lr(self.end_lr, peak_lr)


@dataclass(frozen=True)
class PolynomialOfRun(Decay):
    """``peak · (1 - epoch / epochs)^power``: the polynomial of the whole run's progress, warmup included.

    NVIDIA's BERT scheduler (``PolyWarmUpScheduler``) decays this way, so the LR drops at the end of warmup from the
    peak to ``peak · (1 - warmup/epochs)^power``; :class:`Polynomial` is the post-warmup form (HF's), which starts
    the decay at the peak.
    """

    name: ClassVar[str] = "poly_run"
    power: float = 0.5

    def __post_init__(self) -> None:
        positive("power", self.power)

    def lr(self, peak_lr, epoch, warmup_epochs, epochs):
        return peak_lr * (1.0 - epoch / epochs) ** self.power


@dataclass(frozen=True)
class Cosine(Decay):
    """Half a cosine from the peak down to ``end_lr`` over the post-warmup epochs."""

    name: ClassVar[str] = "cosine"
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        non_negative("end_lr", self.end_lr)

    def lr(self, peak_lr, epoch, warmup_epochs, epochs):
        done = _decay_fraction(epoch, warmup_epochs, epochs)
        return self.end_lr + (peak_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * done))

    def check(self, peak_lr, warmup_epochs, epochs):
        _check_end_lr(self.end_lr, peak_lr)


@dataclass(frozen=True)
class MultiStep(Decay):
    """Multiply the LR by ``gamma`` at each milestone, given in epochs from the start of training.

    The milestones are the same epochs at every batch size; that is what makes the shape LEGW-invariant.
    """

    name: ClassVar[str] = "multistep"
    milestones: tuple[float, ...] = field(default=())
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.milestones, (str, bytes)) or not all(
            isinstance(m, (int, float)) and not isinstance(m, bool) for m in self.milestones
        ):
            raise SettingError("milestones", "must be a list of epochs", self.milestones)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if not self.milestones:
            raise SettingError("milestones", "must list at least one epoch", list(self.milestones))
        if any(b <= a for a, b in itertools.pairwise(self.milestones)):
            raise SettingError("milestones", "must be strictly increasing", list(self.milestones))
        _check_gamma(self.gamma)

    def lr(self, peak_lr, epoch, warmup_epochs, epochs):
        return peak_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)

    def check(self, peak_lr, warmup_epochs, epochs):
        if not all(warmup_epochs < m < epochs for m in self.milestones):
            raise SettingError(
                "milestones",
                f"must lie after the warmup and inside training, in ({warmup_epochs:g}, {epochs:g}) epochs "
                "at this batch size",
                list(self.milestones),
            )


def _check_gamma(gamma: float) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise SettingError("gamma", "must be in (0, 1]", gamma)


@dataclass(frozen=True)
class Exponential(Decay):
    """``peak · gamma^((epoch - warmup) / period)``; with ``staircase`` the exponent is floored."""

    name: ClassVar[str] = "exp"
    gamma: float = 0.9
    period: float = 1.0
    staircase: bool = False

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)
        positive("period", self.period)

    def lr(self, peak_lr, epoch, warmup_epochs, epochs):
        periods = (epoch - warmup_epochs) / self.period
        return peak_lr * self.gamma ** (math.floor(periods) if self.staircase else periods)


@dataclass(frozen=True)
class Constant(Decay):
    """Hold the peak after warmup."""

    name: ClassVar[str] = "constant"

    def lr(self, peak_lr, epoch, warmup_epochs, epochs):
        return peak_lr


DECAYS: dict[str, type[Decay]] = {
    cls.name: cls for cls in (Polynomial, PolynomialOfRun, MultiStep, Exponential, Cosine, Constant)
}

#: Every option any decay shape takes.
DECAY_OPTIONS: frozenset[str] = frozenset(f.name for cls in DECAYS.values() for f in fields(cls))


def make_decay(name: str, **options: Any) -> Decay:
    """The decay shape called ``name`` (one of :data:`DECAYS`) with ``options``.

    Options that are ``None`` take the shape's default; an option the shape does not take is an error, so a
    stray ``milestones`` on a polynomial decay is reported rather than ignored.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name not in DECAYS:
        raise SettingError("decay", f"must be one of {', '.join(map(repr, DECAYS))}", name)
    cls = DECAYS[name]
    accepted = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise SettingError(
            unknown[0],
            f"is not an option of the {name!r} decay (it takes: {', '.join(sorted(accepted)) or 'none'})",
            options[unknown[0]],
        )
    return cls(**options)


def decay_from_dict(data: dict[str, Any]) -> Decay:
    options = dict(data)
    return make_decay(options.pop("name"), **options)


def lr_at_epoch(epoch: float, *, peak_lr: float, warmup_epochs: float, epochs: float, decay: Decay) -> float:
    """The LR at ``epoch`` epochs of progress: linear warmup from 0, then ``decay``; clamped to [0, epochs]."""
    epoch = min(max(epoch, 0.0), epochs)
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    return decay.lr(peak_lr, epoch, warmup_epochs, epochs)
