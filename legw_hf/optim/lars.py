"""LARS: SGD with momentum whose per-tensor step is rescaled by a trust ratio ``tc·‖p‖ / ‖gradient side‖``.

The chain: decayed gradient ``u = g + λp`` → trust ratio (:mod:`._trust`) → momentum → LR. References differ in
the ratio's denominator, in whether the LR is capped (LARC's clip mode), and in whether the momentum buffer holds
gradients (torch SGD, LR applied after) or LR-scaled steps (optax); each is a keyword, each reference a preset.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import SettingError, non_negative, positive
from . import _ops
from ._base import Bucket, LayerwiseOptimizer, load_triton_kernels, state_dtype
from ._dispatch import (
    Dispatch,
    Implementation,
    check_value,
    parameter_signature,
    refuse_impl_beside,
    triton_missing,
    triton_refusal,
)
from ._settings import FROM_PRESET, check_choice, check_flag, check_fraction, check_fused, check_lr, resolve
from ._trust import trust_ratio

DENOMINATORS = ("norm_sum", "update_norm")
ADAPT_RULES = ("all", "decayed")

#: Keyword values of :class:`Lars` without a preset: the ``"larc_scale"`` rule with momentum 0.9.
LARS_DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "weight_decay": 0.0,
    "trust_coefficient": 0.001,
    "eps": 1e-8,
    "nesterov": False,
    "trust_denominator": "norm_sum",
    "local_lr_clip": False,
    "lr_before_momentum": False,
    "adapt": "all",
}

#: Each reference implementation as keyword values (explicit keywords override them). LARC wraps a torch SGD,
#: whose momentum, nesterov and weight decay are the caller's choice, so its presets leave those to the defaults.
LARS_PRESETS: dict[str, dict[str, Any]] = {
    # apex.parallel.LARC(torch.optim.SGD(...)) with its defaults: clip=True, trust_coefficient=0.02, eps=1e-8.
    "larc": {
        "trust_coefficient": 0.02,
        "eps": 1e-8,
        "trust_denominator": "norm_sum",
        "local_lr_clip": True,
        "lr_before_momentum": False,
        "adapt": "all",
    },
    # apex.parallel.LARC(..., clip=False): the LARS paper's local LR with its trust coefficient 0.001.
    "larc_scale": {
        "trust_coefficient": 0.001,
        "eps": 1e-8,
        "trust_denominator": "norm_sum",
        "local_lr_clip": False,
        "lr_before_momentum": False,
        "adapt": "all",
    },
    # optax.lars: chain(add_decayed_weights, masked(scale_by_trust_ratio), scale_by_learning_rate, trace).
    "optax": {
        "momentum": 0.9,
        "weight_decay": 0.0,
        "trust_coefficient": 0.001,
        "eps": 0.0,
        "nesterov": False,
        "trust_denominator": "update_norm",
        "local_lr_clip": False,
        "lr_before_momentum": True,
        "adapt": "all",
    },
}


class Lars(LayerwiseOptimizer):
    r"""LARS (You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", 2017).

    Per tensor, with trust coefficient ``tc``::

        trust_denominator="norm_sum" (LARC):     ratio = tc·‖p‖ / (‖g‖ + λ‖p‖ + ε),  g' = ratio·(g + λp)
        trust_denominator="update_norm" (optax): u = g + λp,  ratio = tc·‖p‖ / (‖u‖ + ε),  g' = ratio·u
        local_lr_clip:                           ratio ← min(ratio / η, 1)      (LARC clip: η·ratio <= η)
        lr_before_momentum=False (torch SGD):    buf ← μ·buf + g' ;    p ← p - η·buf
        lr_before_momentum=True (optax trace):   buf ← μ·buf + η·g' ;  p ← p - buf
        nesterov:                                the step uses (g' + μ·buf) in place of buf (η·g' + μ·buf)

    The ratio is 1 where ``‖p‖`` or the gradient side (``‖g‖``, resp. ``‖u‖``) is 0, and for groups that are not
    adapted (note: 1, not ``tc``, as in optax's ``trust_ratio_mask``). With ``"norm_sum"`` the decay term goes
    with the ratio: where the ratio falls back to 1 because a norm is 0, LARC leaves the gradient undecayed, and
    so does this. ``momentum=0`` keeps no buffer.

    Presets (``preset=``), each reproducing its reference to float tolerance:

    - ``"larc"``: apex ``LARC(torch.optim.SGD(...))`` in its default clip mode: ``"norm_sum"``, local LR capped
      at η, tc 0.02, ε 1e-8, torch-SGD momentum (μ, nesterov, λ are the SGD's: pass them).
    - ``"larc_scale"``: the same with ``clip=False``, i.e. the LARS paper's local LR, tc 0.001, ε 1e-8; this is
      also the default rule.
    - ``"optax"``: ``optax.lars``: ``"update_norm"``, momentum after the LR scaling, tc 0.001, ε 0, μ 0.9.
      Groups' λ play ``weight_decay_mask``; ``adapt="decayed"`` or ``layer_adaptation`` play
      ``trust_ratio_mask``.

    The two momentum placements coincide while η is constant and differ when a schedule changes it.
    No keyword combination is refused for a preset: every override has one meaning.

    Args:
        params: parameters or param groups; a group may override every keyword below except ``preset``,
            ``impl``, ``master_weights`` and ``keep_workspace``, and may set ``layer_adaptation`` (bool).
        lr: η, a float or a one-element tensor.
        momentum: μ in [0, 1).
        weight_decay: λ >= 0.
        trust_coefficient: tc > 0.
        eps: ε >= 0 in the ratio's denominator.
        nesterov: Nesterov momentum (needs μ > 0).
        preset: ``"larc"``, ``"larc_scale"``, ``"optax"`` or None.
        trust_denominator: ``"norm_sum"`` or ``"update_norm"``.
        local_lr_clip: LARC's clip mode.
        lr_before_momentum: optax's order (buffer of LR-scaled steps).
        adapt: ``"all"`` or ``"decayed"`` (only groups with λ ≠ 0).
        impl: which implementation runs the step, one for every tensor of it: ``None`` (default, automatic:
            ``"foreach"``), ``"reference"`` (the single-tensor reference path), ``"foreach"`` (torch's
            ``_foreach_`` ops) or ``"triton"`` (two multi-tensor Triton kernels: norms, then decay, momentum and
            update in one pass, no scratch; contiguous fp32/bf16/fp16 CUDA tensors, or CPU ones under
            ``TRITON_INTERPRET=1``; :mod:`legw_hf.optim._triton_kernel`, ``pip install 'legw_hf[gpu]'``; opt-in
            until measured on a GPU). What an explicit value cannot take is a :class:`~legw_hf.SettingError` at
            construction, or at the first step whose tensors changed; :attr:`impl` says which one runs.
        master_weights: keep an fp32 copy of fp16/bf16 parameters and update that.
        keep_workspace: keep the step's gradient-sized scratch list between steps; None keeps it on CPU only
            (see :class:`~legw_hf.optim.LayerwiseOptimizer`).
        foreach, fused: deprecated spellings of ``impl`` for one release (a :class:`DeprecationWarning` names
            the value to pass): ``foreach=False`` is ``"reference"``, ``fused="triton"`` is ``"triton"``,
            ``foreach=True`` and ``fused=False`` the automatic choice. They cannot be combined with ``impl``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor,
        momentum: float = FROM_PRESET,
        weight_decay: float = FROM_PRESET,
        trust_coefficient: float = FROM_PRESET,
        eps: float = FROM_PRESET,
        nesterov: bool = FROM_PRESET,
        *,
        preset: str | None = None,
        trust_denominator: str = FROM_PRESET,
        local_lr_clip: bool = FROM_PRESET,
        lr_before_momentum: bool = FROM_PRESET,
        adapt: str = FROM_PRESET,
        impl: str | None = None,
        master_weights: bool = False,
        keep_workspace: bool | None = None,
        foreach: bool | None = None,
        fused: str | bool | None = None,
    ) -> None:
        requested = _requested_impl(impl, foreach, fused)
        given = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "trust_denominator": trust_denominator,
            "local_lr_clip": local_lr_clip,
            "lr_before_momentum": lr_before_momentum,
            "adapt": adapt,
        }
        self.preset = preset
        settings = resolve(LARS_DEFAULTS, LARS_PRESETS, preset, given)
        super().__init__(params, settings, master_weights=master_weights, keep_workspace=keep_workspace)
        self._dispatch = Dispatch(self, IMPLEMENTATIONS, requested, AUTOMATIC)
        self._dispatch.start(parameter_signature(self))

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["lr"] = check_lr(group["lr"])
        group["momentum"] = check_fraction("momentum", group["momentum"])
        group["weight_decay"] = non_negative("weight_decay", group["weight_decay"])
        group["trust_coefficient"] = positive("trust_coefficient", group["trust_coefficient"])
        group["eps"] = non_negative("eps", group["eps"])
        group["nesterov"] = check_flag("nesterov", group["nesterov"])
        if group["nesterov"] and group["momentum"] == 0:
            raise SettingError("nesterov", "needs momentum > 0", True)
        group["trust_denominator"] = check_choice("trust_denominator", group["trust_denominator"], DENOMINATORS)
        group["local_lr_clip"] = check_flag("local_lr_clip", group["local_lr_clip"])
        group["lr_before_momentum"] = check_flag("lr_before_momentum", group["lr_before_momentum"])
        group["adapt"] = check_choice("adapt", group["adapt"], ADAPT_RULES)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(
                param, dtype=state_dtype(param), memory_format=torch.preserve_format
            )

    def _ensure_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        super()._ensure_state(group, param, state)
        if group["momentum"] != 0 and "momentum_buffer" not in state:  # momentum was 0 when the state was made
            self._init_state(group, param, state)

    def _update(self, buckets: list[Bucket]) -> tuple[Tensor, Tensor, Tensor]:
        impl = self._implementation(buckets)  # first: a refusal leaves every tensor as it was
        squares, apply = impl.run(self, buckets)
        count = squares.numel() // 2
        param_norms, direction_norms = squares[:count].sqrt(), squares[count:].sqrt()

        denominators, ratios = [], []
        start = 0
        for bucket in buckets:
            group, end = bucket.group, start + len(bucket.weights)
            param_norm, direction_norm = param_norms[start:end], direction_norms[start:end]
            decay_norm = None
            if group["trust_denominator"] == "norm_sum" and group["weight_decay"] != 0:
                decay_norm = group["weight_decay"] * param_norm
            ratio = torch.ones_like(param_norm)
            if self.is_adapted(group):
                ratio = trust_ratio(
                    param_norm,
                    direction_norm,
                    coefficient=group["trust_coefficient"],
                    eps=group["eps"],
                    decay_norm=decay_norm,
                    local_lr_clip=group["lr"] if group["local_lr_clip"] else None,
                )
            denominators.append(direction_norm if decay_norm is None else direction_norm + decay_norm)
            ratios.append(ratio)
            start = end
        apply(ratios, param_norms, direction_norms)
        return param_norms, torch.cat(denominators), torch.cat(ratios)

    def _torch_pass(self, buckets: list[Bucket]) -> tuple[Tensor, Any]:
        """Pass 1 with torch ops (``_foreach_`` or one tensor at a time, as :attr:`uses_foreach` says): squared
        norms of every p and then of every ratio denominator's tensor; the returned function is pass 2, decay,
        momentum and update from the per-bucket ratios."""
        weights = [weight for bucket in buckets for weight in bucket.weights]
        directions = [self._decayed_gradient(bucket) for bucket in buckets]
        squares = self.squared_norms(weights + [tensor for direction in directions for tensor in direction])

        def apply(ratios: list[Tensor], param_norms: Tensor, direction_norms: Tensor) -> None:
            start = 0
            for bucket, direction, ratio in zip(buckets, directions, ratios, strict=True):
                group, end = bucket.group, start + len(bucket.weights)
                if group["trust_denominator"] == "norm_sum" and group["weight_decay"] != 0:
                    direction = self._add_gated_decay(
                        bucket, direction, param_norms[start:end], direction_norms[start:end]
                    )
                self._momentum_step(bucket, direction, ratio)
                start = end

        return squares, apply

    def _triton_pass(self, buckets: list[Bucket]) -> tuple[Tensor, Any]:
        """Pass 1 on the Triton kernels (the squares without materialising ``g + λp``); pass 2 is one kernel per
        bucket."""
        triton = load_triton_kernels()
        parts = [
            triton.lars_squared_norms(bucket.weights, bucket.grads, self._norm_decay(bucket.group))
            for bucket in buckets
        ]
        local = torch.cat(parts)
        squares = self.reduce_squared_norms(torch.cat([local[:, 0], local[:, 1]]))

        def apply(ratios: list[Tensor], param_norms: Tensor, direction_norms: Tensor) -> None:
            start = 0
            for bucket, ratio in zip(buckets, ratios, strict=True):
                end = start + len(bucket.weights)
                self._triton_step(triton, bucket, ratio, param_norms[start:end], direction_norms[start:end])
                start = end

        return squares, apply

    @staticmethod
    def _norm_decay(group: dict[str, Any]) -> float:
        """λ where the ratio's denominator is ``‖g + λp‖`` (``"update_norm"``), else 0: the norm is of ``g``."""
        return group["weight_decay"] if group["trust_denominator"] == "update_norm" else 0.0

    def _triton_step(self, triton: Any, bucket: Bucket, ratio: Tensor, param_norm: Tensor, grad_norm: Tensor) -> None:
        """Decay, momentum and update in one Triton pass, with the per-tensor factors of :meth:`_momentum_step`."""
        group = bucket.group
        if group["trust_denominator"] == "norm_sum" and group["weight_decay"] != 0:
            decays = self._gated_decay(group, param_norm, grad_norm)
        else:
            decays = torch.full_like(param_norm, self._norm_decay(group))
        lr = group["lr"]  # a float becomes a kernel argument of the fill, a tensor LR stays on device
        lrs = lr.to(ratio).expand_as(ratio) if isinstance(lr, Tensor) else torch.full_like(ratio, lr)
        into, out = (ratio * lrs, torch.ones_like(ratio)) if group["lr_before_momentum"] else (ratio, lrs)
        momentum = group["momentum"]
        triton.lars_apply_updates(
            bucket.weights,
            bucket.grads,
            bucket.state_list("momentum_buffer") if momentum != 0 else None,
            decays,
            into,
            out,
            momentum,
            group["nesterov"],
            copies=bucket.params if bucket.has_masters else None,
        )
        bucket.params_written = bucket.has_masters

    def _decayed_gradient(self, bucket: Bucket) -> list[Tensor]:
        """The tensors whose norms form the ratio's denominator: ``g + λp`` for ``"update_norm"``, else ``g``.

        A copy in the workspace (the step's one scratch list) only when the gradient must change: decay, or an
        fp16/bf16 gradient that the fp32 state needs upcast.
        """
        group, grads = bucket.group, bucket.grads
        decay_here = group["trust_denominator"] == "update_norm" and group["weight_decay"] != 0
        if not decay_here and grads[0].dtype == state_dtype(bucket.params[0]):
            return grads
        direction = self.workspace(bucket)
        torch._foreach_copy_(direction, grads)
        if decay_here:
            _ops.add_scaled_(direction, bucket.weights, group["weight_decay"], foreach=self.uses_foreach)
        return direction

    def _add_gated_decay(
        self, bucket: Bucket, direction: list[Tensor], param_norm: Tensor, grad_norm: Tensor
    ) -> list[Tensor]:
        """``g + λ·p`` for LARC's sum form, where the decay is part of the adaptation: an adapted tensor with
        ``‖p‖ = 0`` or ``‖g‖ = 0`` keeps its plain gradient."""
        decay = self._gated_decay(bucket.group, param_norm, grad_norm)
        if direction is bucket.grads:
            direction = self.workspace(bucket)
            torch._foreach_copy_(direction, bucket.grads)
        _ops.add_scaled_(direction, bucket.weights, decay, foreach=self.uses_foreach)
        return direction

    def _gated_decay(self, group: dict[str, Any], param_norm: Tensor, grad_norm: Tensor) -> Tensor:
        """Per tensor, the λ of LARC's ``g + λp``: 0 for an adapted tensor whose ratio is not defined."""
        decay = torch.full_like(param_norm, group["weight_decay"])
        if self.is_adapted(group):
            decay = torch.where((param_norm > 0) & (grad_norm > 0), decay, torch.zeros_like(decay))
        return decay

    def _momentum_step(self, bucket: Bucket, direction: list[Tensor], ratio: Tensor) -> None:
        group = bucket.group
        lr, momentum = group["lr"], group["momentum"]
        into_buffer = ratio * lr if group["lr_before_momentum"] else ratio
        out_of_buffer = 1.0 if group["lr_before_momentum"] else lr
        foreach = self.uses_foreach
        if momentum == 0:
            _ops.add_scaled_(bucket.weights, direction, -out_of_buffer * into_buffer, foreach=foreach)
            return
        buffers = bucket.state_list("momentum_buffer")
        if foreach:
            torch._foreach_mul_(buffers, momentum)
        else:
            for buffer in buffers:
                buffer.mul_(momentum)
        _ops.add_scaled_(buffers, direction, into_buffer, foreach=foreach)
        if group["nesterov"]:
            _ops.add_scaled_(bucket.weights, direction, -out_of_buffer * into_buffer, foreach=foreach)
            _ops.add_scaled_(bucket.weights, buffers, -out_of_buffer * momentum, foreach=foreach)
        else:
            _ops.add_scaled_(bucket.weights, buffers, -out_of_buffer, foreach=foreach)


# ------------------------------------------------------------------------------------------ implementations
# One two-pass interface, ``run(optimizer, buckets) -> (squares, apply)``: pass 1 returns the squared norms of every
# p and then of every ratio denominator's tensor (reduced over shards); ``apply(ratios, param_norms,
# direction_norms)`` is pass 2. "reference" and "foreach" share the torch-ops code, which reads uses_foreach.
IMPLEMENTATIONS = (
    Implementation("reference", lambda opt, buckets: opt._torch_pass(buckets)),
    Implementation("foreach", lambda opt, buckets: opt._torch_pass(buckets)),
    Implementation(
        "triton", lambda opt, buckets: opt._triton_pass(buckets), tensors=triton_refusal, available=triton_missing
    ),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLEMENTATIONS)
AUTOMATIC = ("foreach",)


def _requested_impl(impl: Any, foreach: Any, fused: Any) -> str | None:
    """The ``impl`` asked for, from ``impl`` or the deprecated ``foreach`` and ``fused`` (with a
    :class:`DeprecationWarning` naming the ``impl`` to pass instead)."""
    impl = check_value(impl, IMPL_NAMES)
    given = {name: value for name, value in (("foreach", foreach), ("fused", fused)) if value is not None}
    if not given:
        return impl
    refuse_impl_beside(impl, given, IMPL_NAMES)
    foreach = None if foreach is None else check_flag("foreach", foreach)
    fused = check_fused(fused, ("triton",))
    if fused and foreach is False:
        raise SettingError(
            "fused",
            "needs the multi-tensor path",
            fused,
            detail="foreach=False selects the single-tensor reference path, impl='reference'",
        )
    impl = "reference" if foreach is False else fused or None
    spelled = ", ".join(f"{name}={value!r}" for name, value in given.items())
    advice = "impl=None (the automatic choice)" if impl is None else f"impl={impl!r}"
    warnings.warn(
        f"Lars({spelled}) is deprecated and will be removed in the next release; pass {advice}",
        DeprecationWarning,
        stacklevel=3,
    )
    return impl


__all__ = ["LARS_DEFAULTS", "LARS_PRESETS", "Lars"]
