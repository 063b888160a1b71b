"""Gradient noise statistics: the estimators AdaScale and the gradient noise scale share, as plain Python.

One optimizer update is made of S independent gradient estimates g_i (processes × accumulation micro-batches),
each the mean gradient of a micro-batch of b samples, combined with weights w_i into the applied gradient
ḡ = Σ w_i g_i. With a_i = S·w_i (mean 1; all 1 when the micro-batches count equally):

    σ̂²_b = (Σ a_i ‖g_i‖² − S‖ḡ‖²) / (S − 1)       the variance of one micro-batch gradient
    μ̂²   = ‖ḡ‖² − σ̂²_b / S                         the squared norm of the true gradient

With equal weights these are Johnson et al.'s (AdaScale, ICML 2020); with weights proportional to each
micro-batch's item count (Trainer's ``num_items_in_batch``, where a micro-batch's gradient is a partial sum of
token gradients) they stay unbiased for token-level noise. The per-sample noise is tr Σ = b·σ̂²_b, so for any
base batch B₀ the variance of its gradient is tr Σ / B₀, and

    gain r = (tr Σ/B₀ + μ²) / (tr Σ/(S·B₀) + μ²) ∈ [1, S],   B_simple = tr Σ / μ²   (McCandlish et al. 2018)
    efficiency of the batch S·B₀ over B₀ = r / S

where S = global batch / B₀ and the moments are exponential moving averages over updates (θ = max(1 − S/1000, 0),
a plain mean over the first 1/(1 − θ) updates). Nothing here knows about torch: the integrations measure the
norms and hand over five numbers per update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingError, positive, positive_int

STATE_FORMAT = "legw_hf.GradientNoise/1"

#: The floor of σ̂² (Johnson et al.'s reference implementation): a variance estimate of 0 would make r = S exactly.
VARIANCE_FLOOR = 1e-6

#: A global batch this many times B_simple is "far above" it: more batch buys almost no saved steps.
FAR_ABOVE_B_SIMPLE = 10.0


def micro_batch_moments(weighted_square_norms: float, applied_square_norm: float, count: int) -> tuple[float, float]:
    """(σ̂²_b, μ̂²) of one update from ``Σ a_i‖g_i‖²``, ``‖ḡ‖²`` and the number of estimates S ≥ 2 (module doc).

    σ̂²_b is floored at :data:`VARIANCE_FLOOR` and μ̂² at 0, as in the paper.
    """
    if count < 2:
        raise SettingError("count", "must be >= 2 independent gradient estimates for a variance", count)
    variance = (weighted_square_norms - count * applied_square_norm) / (count - 1)
    variance = max(variance, VARIANCE_FLOOR)
    signal = max(applied_square_norm - variance / count, 0.0)
    return variance, signal


def gain(trace: float, signal: float, *, base_batch: float, scale: float) -> float:
    """AdaScale's gain r of a batch ``scale`` × ``base_batch`` over ``base_batch``: in [1, scale]."""
    base_variance = trace / base_batch
    denominator = base_variance / scale + signal
    if denominator <= 0:
        return 1.0
    return min(max((base_variance + signal) / denominator, 1.0), scale)


def doubling_efficiency(trace: float, signal: float, *, batch: float) -> float:
    """The efficiency of doubling the batch ``batch``: :func:`gain` of 2B over B, halved.

    With B_simple = tr Σ / μ², dividing :func:`gain`'s numerator and denominator by μ² gives
    r = (1 + B_simple/B) / (1 + B_simple/(2B)), so r / 2 = (B + B_simple) / (2B + B_simple): 1 while B ≪ B_simple
    (twice the batch, half the steps), 1/2 once B ≫ B_simple (twice the samples for the same progress).
    """
    return gain(trace, signal, base_batch=batch, scale=2.0) / 2.0


def b_simple(trace: float, signal: float) -> float:
    """The simple noise scale tr Σ / ‖G‖² in samples (inf while the signal estimate is 0)."""
    return trace / signal if signal > 0 else math.inf


def ema_theta(scale: float) -> float:
    """The EMA decay of Johnson et al.: θ = max(1 − S/1000, 0)."""
    return max(1.0 - scale / 1000.0, 0.0)


@dataclass
class GradientNoise:
    """Running estimates of the gradient noise (tr Σ per sample) and signal (‖G‖²) of a run.

    Args:
        micro_batch: samples per gradient estimate (the per-device micro-batch).
        base_batch: B₀, the batch the gain and efficiency are relative to (AdaScale's S = 1 run).
        global_batch: samples per update; ``scale`` S = global_batch / base_batch must be >= 1.
    """

    micro_batch: int
    base_batch: int
    global_batch: int
    #: EMAs of the per-sample trace and of the signal; None before the first recorded update.
    trace: float | None = None
    signal: float | None = None
    #: Updates recorded into the EMAs (overflowed ones are not).
    recorded: int = 0
    #: Whether the estimates come from consecutive updates' gradients (one estimate per update: S = 1).
    biased: bool = False
    #: The last recorded update: its estimates and the measurements they came from.
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive_int("micro_batch", self.micro_batch)
        check_scale(None, global_batch=self.global_batch, base_batch=self.base_batch, base_field="base_batch")

    @property
    def scale(self) -> float:
        """S = global batch / base batch."""
        return self.global_batch / self.base_batch

    @property
    def theta(self) -> float:
        return ema_theta(self.scale)

    def observe(
        self, weighted_square_norms: float, applied_square_norm: float, count: int, *, biased: bool = False
    ) -> bool:
        """Record one update's statistics; False (and nothing recorded) when they are not finite, as after an fp16
        overflow, whose step the GradScaler skips."""
        if not (math.isfinite(weighted_square_norms) and math.isfinite(applied_square_norm)):
            return False
        variance, signal = micro_batch_moments(weighted_square_norms, applied_square_norm, count)
        trace = variance * self.micro_batch
        # A plain mean over the first 1/(1 − θ) updates, then the EMA.
        weight = 1.0 / (self.recorded + 1) if self.recorded < 1.0 / (1.0 - self.theta) else 1.0 - self.theta
        self.trace = trace if self.trace is None else self.trace + weight * (trace - self.trace)
        self.signal = signal if self.signal is None else self.signal + weight * (signal - self.signal)
        self.recorded += 1
        self.biased = biased
        self.last = {
            "trace": trace,
            "signal": signal,
            "weighted_square_norms": weighted_square_norms,
            "applied_square_norm": applied_square_norm,
            "estimates": count,
        }
        return True

    @property
    def gain(self) -> float:
        """r ∈ [1, S] from the EMAs; 1 before any update was recorded."""
        if self.trace is None:
            return 1.0
        return gain(self.trace, self.signal, base_batch=self.base_batch, scale=self.scale)

    @property
    def b_simple(self) -> float:
        if self.trace is None:
            return math.nan
        return b_simple(self.trace, self.signal)

    @property
    def efficiency(self) -> float:
        """r / S: the fraction of the batch's samples that count, compared with the base batch."""
        return self.gain / self.scale

    def summary(self) -> dict[str, float]:
        """The log keys: ``noise_scale/b_simple``, ``noise_scale/trace``, ``noise_scale/signal``, ``adascale/gain``,
        ``adascale/efficiency`` (and ``noise_scale/biased`` = 1 for the consecutive-update estimator)."""
        if self.trace is None:
            return {}
        logs = {
            "noise_scale/b_simple": self.b_simple,
            "noise_scale/trace": self.trace,
            "noise_scale/signal": self.signal,
            "adascale/gain": self.gain,
            "adascale/efficiency": self.efficiency,
        }
        if self.biased:
            logs["noise_scale/biased"] = 1.0
        return logs

    def batch_warning(self, *, min_updates: int = 10) -> str | None:
        """A sentence when the global batch is far above B_simple, from ``min_updates`` recorded updates on."""
        if self.recorded < min_updates or not self.global_batch > FAR_ABOVE_B_SIMPLE * self.b_simple:
            return None
        return (
            f"The global batch ({self.global_batch}) is {self.global_batch / self.b_simple:.0f}x the gradient noise "
            f"scale B_simple ({self.b_simple:.4g} samples): beyond B_simple more batch saves few steps, so a "
            f"fixed-epoch run (LEGW) at this batch is likely to lose quality. The gain over base batch "
            f"{self.base_batch} is {self.gain:.3g} of a possible {self.scale:g} (efficiency {self.efficiency:.2f})."
        )

    def state_dict(self) -> dict[str, Any]:
        """Primitives only (JSON and ``torch.load(weights_only=True)`` both take it)."""
        return {
            "format": STATE_FORMAT,
            "micro_batch": self.micro_batch,
            "base_batch": self.base_batch,
            "global_batch": self.global_batch,
            "trace": self.trace,
            "signal": self.signal,
            "recorded": self.recorded,
            "biased": self.biased,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the EMAs. Saved at another micro, base or global batch, the per-sample trace and the signal are
        still valid (they do not depend on the batch); only the EMA weight changes with the new S."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a GradientNoise state (format {state.get('format')!r})")
        self.trace, self.signal = state["trace"], state["signal"]
        self.recorded, self.biased = int(state["recorded"]), bool(state["biased"])


def check_scale(
    expected: float | None,
    *,
    global_batch: int,
    base_batch: int,
    field_name: str = "scale",
    base_field: str = "base_batch_size",
) -> float:
    """S = global / base, and the user's expected S (if any) must agree with it."""
    positive_int("global_batch", global_batch)
    positive_int("base_batch", base_batch)
    scale = global_batch / base_batch
    if scale < 1:
        raise SettingError(
            base_field,
            f"must not exceed the global batch ({global_batch}): AdaScale's scale S = global / base is >= 1",
            base_batch,
        )
    if expected is not None:
        positive(field_name, expected)
        if not math.isclose(expected, scale, rel_tol=1e-9):
            raise SettingError(
                field_name,
                f"must equal global batch / base batch = {global_batch} / {base_batch} = {scale:g} for this run",
                expected,
            )
    return scale
