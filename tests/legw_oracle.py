"""The LEGW learning rate written out once, for every test that checks a schedule (nothing imported from legw_hf).

LEGW (You et al.; ALGORITHMS.md): at k times the base batch, the peak LR is √k·η0 and the warmup lasts k·w0 epochs;
the LR rises linearly from 0 over the warmup, then decays. The other scaling rules differ only in the exponents of k
(:data:`RULES`). Progress is counted in epochs: the 0-based update ``u`` applies the LR at the progress it completes,
``(u + 1) / steps_per_epoch`` (:func:`update_epoch`).
"""

from __future__ import annotations

#: Exponents of k on the peak LR and on the warmup epochs, as the papers state the rules.
RULES = {"legw": (0.5, 1.0), "sqrt": (0.5, 0.0), "linear": (1.0, 0.0), "none": (0.0, 0.0)}


def update_epoch(update: int, steps_per_epoch: float) -> float:
    """The progress, in epochs, at which the 0-based ``update`` is taken."""
    return (update + 1) / steps_per_epoch


def legw_lr(
    epoch: float,
    *,
    base_lr: float,
    k: float,
    base_warmup_epochs: float,
    epochs: float,
    decay: str = "poly",
    power: float = 1.0,
    end_lr: float = 0.0,
    rule: str = "legw",
) -> float:
    """The LR at ``epoch`` epochs of a run of ``epochs`` epochs at k times the base batch.

    ``decay``: ``"poly"`` decays ``(1 - (t - warmup) / (epochs - warmup))^power`` after the warmup; ``"poly_run"``
    (NVIDIA's PolyWarmUpScheduler) decays ``(1 - t / epochs)^power`` over the whole run; ``"constant"`` keeps the
    peak. Both polynomials go from the peak to ``end_lr``."""
    lr_exponent, warmup_exponent = RULES[rule]
    peak = base_lr * k**lr_exponent
    warmup = base_warmup_epochs * k**warmup_exponent
    t = min(epoch, epochs)
    if t < warmup:
        return peak * t / warmup
    if decay == "constant":
        return peak
    left = 1 - (t - warmup) / (epochs - warmup) if decay == "poly" else 1 - t / epochs
    assert decay in ("poly", "poly_run"), decay
    return end_lr + (peak - end_lr) * left**power


def legw_poly_lr(update: int, *, base_batch: float, batch: float, steps_per_epoch: float, **schedule) -> float:
    """:func:`legw_lr` of the 0-based ``update`` of a run at ``batch`` (k = batch / base_batch)."""
    return legw_lr(update_epoch(update, steps_per_epoch), k=batch / base_batch, **schedule)


def nvidia_lr(update: int, *, peak: float, total: int, warmup_fraction: float, power: float = 0.5) -> float:
    """NVIDIA's PolyWarmUpScheduler (DeepLearningExamples BERT) for the ``update``-th update (1-based) of a phase:
    the schedule at the progress that update completes."""
    progress = update / total
    if progress < warmup_fraction:
        return peak * progress / warmup_fraction
    return peak * (1 - progress) ** power
