"""AdaScale (Johnson et al., ICML 2020) and the gradient-noise measurements behind it, in torch.

:class:`GradientStatistics` measures, for each optimizer update, the numbers :class:`~legw_hf.noise_scale.GradientNoise`
needs: ``Σ a_i‖g_i‖²`` over the micro-batch gradients that make the update (every process's, every accumulation
step's) and the squared norm of the applied gradient. Each micro-batch's own gradient is seen by a hook on every
parameter *before* it is accumulated into ``.grad`` (so before DDP's all-reduce): its squared norm is added to a
device scalar, without a host sync. At the end of the update one collective sums three scalars across processes,
and one host read brings five numbers back (the LR is a Python float in the param groups, so an LR that depends
on this update's gradients needs that read anyway).

:class:`AdaScaleScheduler` sets the LR of update t to ``r_t^p · lr(τ_t + r_t)``: the gain r_t of this update, the
schedule of the base run evaluated at the scale-invariant progress τ (in base-run updates), which advances by r_t
per applied update; training is over when τ reaches the base run's length. ``p = 1`` is the paper's rule (SGD);
``p = 0.5`` on Adam-preconditioned statistics is AdaptDL's extension to Adam-family optimizers (AdamW, LAMB).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from .errors import SettingError, non_negative
from .noise_scale import GradientNoise
from .plan import LegwPlan
from .scheduler import set_group_lrs

STATE_FORMAT = "legw_hf.AdaScaleScheduler/1"

#: AdaScale modes: the LR rule of ``gain`` (paper, p = 1) and ``sqrt_gain`` (Adam family, p = 1/2 on preconditioned
#: statistics); ``diagnostics`` measures and logs without touching the LR.
MODES: dict[str, float | None] = {"gain": 1.0, "sqrt_gain": 0.5, "diagnostics": None}


class GradientStatistics:
    """Per-update gradient statistics from per-micro-batch gradients, fed into a :class:`GradientNoise`.

    Call :meth:`micro_step_done` after every backward, with the weight that micro-batch's *mean* gradient has in the
    accumulated gradient (``1 / accumulation steps`` for a mean loss divided by the accumulation, as accelerate and
    Trainer do; ``items · processes / items of the whole batch`` for Trainer's ``num_items_in_batch`` losses), and
    :meth:`update_done` after the last backward of an update, before clipping and ``optimizer.step()``. Where the
    step runs inside the last backward (DeepSpeed), call :meth:`defer_micro_step` before that backward and
    :meth:`measure_deferred` from the optimizer's step pre-hook.

    With one estimate per update (one process, no accumulation) the variance comes from consecutive updates'
    gradients (AdaptDL's differenced estimator): it is biased, since they are taken at different parameters, and
    :attr:`GradientNoise.biased` says so; it keeps one fp32 copy of the gradients.

    Args:
        parameters: the trained parameters (leaf tensors; under DDP the wrapped module's, which are the same).
        noise: the running estimates to update.
        preconditioner: for ``sqrt_gain``, the Adam-family optimizer whose second moments ``exp_avg_sq`` precondition
            the gradients (``g / (√v + eps)``; Adam's bias correction is a common factor and cancels in r).
        loss_scale: returns the fp16 loss scale the gradients carry (e.g. ``scaler.get_scale``), or None.
        process_group: the data-parallel group (default: the world when torch.distributed is initialised).
        applied_norm: returns the norm of the applied (averaged, unscaled, unclipped) gradient where ``.grad`` does
            not hold it, as under DeepSpeed ZeRO, which partitions it and computes its norm itself.
    """

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        noise: GradientNoise,
        *,
        preconditioner: Any = None,
        loss_scale: Callable[[], float | None] | None = None,
        process_group: Any = None,
        applied_norm: Callable[[], Any] | None = None,
    ) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        if not self.parameters:
            raise SettingError("parameters", "must include at least one parameter that requires grad", 0)
        self.noise = noise
        self.loss_scale = loss_scale
        self.process_group = process_group
        self.applied_norm = applied_norm
        self._optimizer = preconditioner  # accelerate's wrapper shows the inner optimizer's state and groups
        self._eps = {}
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                for p in group["params"]:
                    self._eps[p] = group.get("eps", 1e-8)
        device = self.parameters[0].device
        self._micro = torch.zeros((), dtype=torch.float32, device=device)
        self._weighted = torch.zeros((), dtype=torch.float32, device=device)
        self._weights = torch.zeros((), dtype=torch.float32, device=device)
        self._micro_steps = 0
        self._deferred_weight: Any = None
        self._previous: list[torch.Tensor] | None = None
        self._handles: list[Any] = []

    def attach(self) -> GradientStatistics:
        if not self._handles:
            self._handles = [p.register_hook(self._hook(p)) for p in self.parameters]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _precondition(self, p: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        if self._optimizer is None:
            return grad
        state = self._optimizer.state.get(p)
        v = state.get("exp_avg_sq") if state else None
        if v is None:
            return grad
        return grad.float() / (v.float().sqrt() + self._eps.get(p, 1e-8))

    def _square_norm(self, p: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(self._precondition(p, grad), dtype=torch.float32).square()

    def _hook(self, p: torch.nn.Parameter) -> Callable[[torch.Tensor], None]:
        def add_square_norm(grad: torch.Tensor) -> None:
            self._micro.add_(self._square_norm(p, grad).to(self._micro.device))

        return add_square_norm

    def micro_step_done(self, weight: float | torch.Tensor) -> None:
        """Fold the micro-batch just back-propagated in; ``weight`` as in the class doc (a tensor stays on device)."""
        if isinstance(weight, torch.Tensor):
            weight = weight.to(dtype=torch.float32, device=self._micro.device)
            self._weighted.add_(torch.where(weight > 0, self._micro / weight, torch.zeros_like(self._micro)))
        elif weight > 0:
            self._weighted.add_(self._micro, alpha=1.0 / weight)
        self._weights.add_(weight)
        self._micro.zero_()
        self._micro_steps += 1

    def defer_micro_step(self, weight: float | torch.Tensor) -> None:
        """The coming backward is the update's last and runs the optimizer step (DeepSpeed): :meth:`measure_deferred`,
        from the step pre-hook, folds it in with ``weight`` and measures."""
        self._deferred_weight = weight

    def measure_deferred(self) -> None:
        """Fold the deferred micro-batch in and measure the update; a no-op once done (the pre-hook runs once per
        parameter group)."""
        if self._deferred_weight is not None:
            weight, self._deferred_weight = self._deferred_weight, None
            self.micro_step_done(weight)
            self.update_done()

    def discard_deferred(self) -> None:
        """After the deferred backward: if its step never reached the optimizer (an overflow), forget the update."""
        if self._deferred_weight is not None:
            self.discard()

    def discard(self) -> None:
        """Forget the micro-batches folded in since the last update (a step that never happened)."""
        for accumulator in (self._micro, self._weighted, self._weights):
            accumulator.zero_()
        self._micro_steps = 0
        self._deferred_weight = None

    def _with_gradients(self) -> list[torch.nn.Parameter]:
        parameters = [p for p in self.parameters if p.grad is not None]
        if not parameters:
            raise RuntimeError("update_done() found no gradients: call it after the backward, before zero_grad()")
        return parameters

    def update_done(self) -> bool:
        """Measure the update whose micro-batches were folded in; True if its statistics were recorded (False after
        an overflow, and for the first update of the consecutive-update estimator)."""
        if self._micro_steps == 0:
            raise RuntimeError("update_done() without micro_step_done(): no micro-batch was measured")
        scale = (self.loss_scale() if self.loss_scale is not None else None) or 1.0
        steps = torch.tensor(float(self._micro_steps), device=self._micro.device)
        local = torch.stack([self._weighted, self._weights, steps])
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size(self.process_group)
            if world > 1:
                torch.distributed.all_reduce(local, group=self.process_group)
        if self.applied_norm is not None:
            norm = self.applied_norm()
            if norm is None:
                raise RuntimeError("the applied gradient's norm is not available (DeepSpeed computed none)")
            applied_square = torch.as_tensor(norm, dtype=torch.float32).to(local.device).square()
        else:
            squares = [self._square_norm(p, p.grad) for p in self._with_gradients()]
            applied_square = torch.stack(squares).sum() / scale**2
        weighted, weights, count, applied_square = torch.cat([local, applied_square.view(1)]).tolist()
        self.discard()
        count = round(count)
        if weights <= 0:  # no micro-batch carried any weight (no labelled items): nothing was measured
            return False
        # The applied gradient is (1/world) Σ c_i g_i; its weighted mean Σ c_i g_i / Σ c_i, with a_i = count·c_i/Σc.
        mean_square = applied_square * (world / weights) ** 2
        weighted_square_norms = count * weighted / weights / scale**2
        if count >= 2:
            return self.noise.observe(weighted_square_norms, mean_square, count)
        if self.noise.global_batch >= 2 * self.noise.micro_batch or self.applied_norm is not None:
            return False  # a short last accumulation of an epoch (too few estimates), or no gradient to difference
        return self._observe_consecutive(world / weights / scale)

    def _observe_consecutive(self, normaliser: float) -> bool:
        current = [self._precondition(p, p.grad).float() * normaliser for p in self._with_gradients()]
        norms = torch.stack([torch.linalg.vector_norm(g).square() for g in current]).sum()
        if not bool(torch.isfinite(norms)):
            return False
        previous, self._previous = self._previous, current
        if previous is None:
            return False
        a = float(norms)
        c = float(sum(torch.linalg.vector_norm(g).square() for g in previous))
        d = float(sum(torch.dot(x.flatten(), y.flatten()) for x, y in zip(current, previous, strict=True)))
        return self.noise.observe(a + c, (a + 2 * d + c) / 4, 2, biased=True)


ProgressSchedule = Callable[[float], float]


def progress_schedule(schedule: Any) -> tuple[ProgressSchedule, str]:
    """The base run's LR as a function of fractional progress τ (in base-run updates), and a description.

    A :class:`~legw_hf.plan.LegwPlan` (at the base batch) is evaluated in epochs, ``τ / steps per epoch``; a plain
    callable is called with τ. A torch LR scheduler cannot be evaluated at a fractional point (its LR is a state that
    ``step()`` advances by whole steps) and is refused.
    """
    if isinstance(schedule, LegwPlan):
        plan = schedule
        return (lambda progress: plan.lr_at_epoch(progress / plan.steps_per_epoch)), plan.describe()
    if isinstance(schedule, (LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        raise SettingError(
            "schedule",
            "must be evaluable at fractional progress (a LegwPlan at the base batch, or a function of progress in "
            "base-run updates): a torch LR scheduler only advances by whole step() calls",
            type(schedule).__name__,
        )
    if not callable(schedule):
        raise SettingError("schedule", "must be a LegwPlan or a function of progress in base-run updates", schedule)
    try:
        value = schedule(0.5)
    except TypeError as error:
        raise SettingError(
            "schedule", f"must accept a fractional progress (a float), but schedule(0.5) failed: {error}", schedule
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingError("schedule", "must return a finite LR (a float) for a progress", value)
    return schedule, getattr(schedule, "__name__", type(schedule).__name__)


class AdaScaleScheduler(LRScheduler):
    """The AdaScale LR: ``r^power · schedule(τ + r)`` for each update, τ advancing by r per applied update.

    Call :meth:`begin_update` once the update's statistics are in (after :meth:`GradientStatistics.update_done`)
    and before ``optimizer.step()``, and ``step()`` after each *applied* update (not after a step the GradScaler
    skipped), like any scheduler. A group's LR is scaled by its ``lr_scale`` key (default 1).

    Args:
        optimizer: the optimizer whose groups to drive.
        schedule: the base run's schedule (:func:`progress_schedule`).
        noise: the statistics the gain comes from.
        total_progress: T, the base run's length in its updates; :attr:`finished` once τ ≥ T.
        power: 1 (``gain``) or 0.5 (``sqrt_gain``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        noise: GradientNoise,
        *,
        total_progress: float,
        power: float = 1.0,
    ) -> None:
        self.lr_of, self.schedule_description = progress_schedule(schedule)
        self.noise = noise
        self.total_progress = float(non_negative("total_progress", total_progress))
        self.power = float(power)
        #: τ: progress in base-run updates after the updates applied so far.
        self.progress = 0.0
        #: The gain of the coming (or current) update.
        self.gain = 1.0
        #: What the last load changed, for the integrations' logs.
        self.resume_note: str | None = None
        super().__init__(optimizer)

    @property
    def updates(self) -> int:
        return self.last_epoch

    @property
    def finished(self) -> bool:
        return self.progress >= self.total_progress - 1e-9

    def begin_update(self) -> None:
        """Take this update's gain and set its LR."""
        self.gain = self.noise.gain
        self._apply()

    def get_lr(self) -> list[float]:
        lr = self.gain**self.power * self.lr_of(min(self.progress + self.gain, self.total_progress))
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        self._last_lr = set_group_lrs(self.optimizer, self.get_lr())

    def step(self, epoch: None = None) -> None:
        """After an applied update: τ += r. (The call from ``__init__`` only sets the first LR.)"""
        if self._step_count > 0:
            self.progress += self.gain
            self.last_epoch += 1
        else:
            self.last_epoch = 0
        self._step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "progress": self.progress,
            "updates": self.last_epoch,
            "gain": self.gain,
            "total_progress": self.total_progress,
            "power": self.power,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore τ and the update count. A LEGW scheduler's state (a run resumed with AdaScale newly on) gives its
        samples seen: τ starts at samples / base batch, the most progress those samples can have made, with a
        warning; the statistics are then estimated afresh."""
        if state_dict.get("format") == STATE_FORMAT:
            self.progress = float(state_dict["progress"])
            self.last_epoch = int(state_dict["updates"])
            self.gain = float(state_dict["gain"])
            if not math.isclose(float(state_dict["total_progress"]), self.total_progress):
                self.resume_note = (
                    f"The AdaScale run length changed since the checkpoint ({state_dict['total_progress']:g} base-run "
                    f"updates, now {self.total_progress:g}); continuing at progress {self.progress:g}."
                )
        elif "updates" in state_dict and "plan" in state_dict:
            updates = int(state_dict["updates"])
            batch = state_dict["plan"].get("batch_size", self.noise.global_batch)
            self.progress = updates * batch / self.noise.base_batch
            self.last_epoch = updates
            self.resume_note = (
                f"Resuming a LEGW checkpoint with AdaScale: its {updates} updates at batch {batch} count as progress "
                f"{self.progress:g} base-run updates (every sample counted in full); the gradient statistics are "
                "estimated afresh."
            )
            warnings.warn(self.resume_note, stacklevel=2)
        else:
            raise ValueError(f"not an AdaScale scheduler state (keys: {sorted(state_dict)})")
        self._step_count = max(self._step_count, 1)
        self._apply()
