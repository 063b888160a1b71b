"""LAMB: Adam's direction, decoupled weight decay, then a per-tensor trust ratio ‖p‖/‖u‖ scaling the step.

The math is a chain of small steps, each written once:

1. optional global gradient pre-normalisation ``g ← g / max(1, G / max_grad_norm)``,
2. Adam moments and the Adam direction ``r`` (:func:`_adam_direction` is the reference form),
3. decoupled decay ``u = r + λp`` (or L2 decay folded into ``g`` before step 2),
4. the trust ratio from :mod:`._trust`,
5. the step ``p ← p - η·k·ratio·u`` (``k`` carries bias correction in the DeepSpeed form).

Where LAMB implementations disagree, a keyword says which way to go; presets are dicts of those keywords.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import SettingError, non_negative
from . import _cpu_kernel, _ops
from ._base import Bucket, LayerwiseOptimizer, _warn_replaced_attribute, load_triton_kernels, state_dtype
from ._dispatch import (
    Dispatch,
    Implementation,
    Signature,
    check_value,
    parameter_signature,
    refuse_impl_beside,
    triton_missing,
    triton_refusal,
)
from ._settings import (
    FROM_PRESET,
    check_betas,
    check_choice,
    check_clamp,
    check_flag,
    check_fused,
    check_lr,
    check_optional_positive,
    resolve,
)
from ._trust import trust_ratio

BIAS_CORRECTIONS = ("inside", "step_size", "off")
ADAPT_RULES = ("all", "decayed")
DECAY_MODES = ("decoupled", "l2")

#: Keyword values of :class:`Lamb` without a preset.
LAMB_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-6,
    "weight_decay": 0.01,
    "bias_correction": "inside",
    "eps_inside_sqrt": False,
    "weight_decay_mode": "decoupled",
    "grad_averaging": True,
    "max_grad_norm": None,
    "trust_clamp": None,
    "adapt": "all",
}

#: Each reference implementation as keyword values: what it changes from :data:`LAMB_DEFAULTS`, whose lr 1e-3,
#: betas (0.9, 0.999), bias correction inside the update, ε outside the root, decoupled decay and gradient
#: averaging all of them share. Explicit keywords override a preset.
LAMB_PRESETS: dict[str, dict[str, Any]] = {
    # apex.optimizers.FusedLAMB defaults, as NVIDIA's BERT recipe runs it (csrc/multi_tensor_lamb.cu).
    "nvidia": {**LAMB_DEFAULTS, "max_grad_norm": 1.0, "adapt": "decayed"},
    # deepspeed.ops.lamb.FusedLamb (csrc/lamb/fused_lamb_cuda_kernel.cu).
    "deepspeed": {
        **LAMB_DEFAULTS,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "bias_correction": "step_size",
        "trust_clamp": (0.01, 10.0),
    },
    # optax.lamb: chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate).
    "optax": {**LAMB_DEFAULTS, "weight_decay": 0.0},
    # The paper's Algorithm 2 as tensorflow_addons.optimizers.LAMB implements it: optax's chain, except that
    # tensors excluded from decay are excluded from adaptation too (exclude_from_layer_adaptation's default).
    "paper": {**LAMB_DEFAULTS, "weight_decay": 0.0, "adapt": "decayed"},
}


class Lamb(LayerwiseOptimizer):
    r"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", 2019).

    Per tensor, with ``bc1 = 1-β1^t``, ``bc2 = 1-β2^t``, ``β3 = 1-β1`` (``grad_averaging``) or 1::

        g ← g / max(1, G / max_grad_norm)       G = global norm of all gradients; only if max_grad_norm
        g ← g + λ·p                              only if weight_decay_mode="l2"
        m ← β1·m + β3·g ;  v ← β2·v + (1-β2)·g²
        r = m̂ / (√v̂ + ε)  or  m̂ / √(v̂ + ε)       the latter with eps_inside_sqrt
                                                 m̂, v̂ = m/bc1, v/bc2 with bias_correction="inside", else m, v
        u = r + λ·p                              only if weight_decay_mode="decoupled"
        ratio = clamp(‖p‖ / ‖u‖, *trust_clamp)   1 if ‖p‖ = 0 or ‖u‖ = 0, or the group is not adapted
        p ← p - η·k·ratio·u                      k = √bc2 / bc1 if bias_correction="step_size", else 1

    Presets (``preset=``), each reproducing its reference to float tolerance:

    - ``"nvidia"``: apex ``FusedLAMB`` as NVIDIA's BERT recipe runs it. ``g ← g / max(1, G/1.0)``,
      ``r = m̂/(√v̂ + ε)``, ``u = r + λp``, ratio ``‖p‖/‖u‖`` only in groups with λ ≠ 0 (apex's ``use_nvlamb``
      is ``adapt="all"``). ε 1e-6, λ 0.01, max_grad_norm 1.0.
    - ``"deepspeed"``: DeepSpeed ``FusedLamb``. ``r = m/(√v + ε)`` on uncorrected moments, ``u = r + λp``,
      ``p ← p - η·(√bc2/bc1)·clamp(‖p‖/‖u‖, 0.01, 10)·u``. ε 1e-8, λ 0; its ``eps_inside_sqrt`` is ours.
    - ``"optax"``: ``optax.lamb``. ``r = m̂/(√v̂ + ε)``, ``u = r + λp``, ratio ``‖p‖/‖u‖`` for every tensor;
      per-group λ plays optax's decay ``mask``. ε 1e-6, λ 0.
    - ``"paper"``: Algorithm 2 as ``tensorflow_addons.optimizers.LAMB``: as optax, but tensors excluded from
      decay (groups with λ = 0) are excluded from adaptation too, TF-addons' default for
      ``exclude_from_layer_adaptation``. ε 1e-6, λ 0.

    All use lr 1e-3 and betas (0.9, 0.999) unless given. Without a preset: ε 1e-6, λ 0.01, bias correction
    inside, every tensor adapted, no pre-normalisation, no clamp. Explicit keywords override the preset. Two notes
    on fidelity: TF-addons adapts every layer when no decay exclusion list is given even with λ = 0; with
    ``preset="paper"`` and λ = 0 everywhere pass ``adapt="all"`` for that. DeepSpeed's optional ``max_grad_norm``
    relies on norms its engine passes in; the engine's own clipping is the intended route there.

    Refused combinations (:class:`~legw_hf.SettingError`), each because the result would be ambiguous:
    ``preset="deepspeed"`` with ``max_grad_norm`` (DeepSpeed's in-optimizer clipping uses a different formula on
    loss-scaled norms; clip in the engine or Trainer instead), a bool ``bias_correction`` (``True`` means
    "inside" in apex but "step_size" in DeepSpeed), an ``impl`` whose requirements the settings or parameters do
    not meet.

    Args:
        params: parameters or param groups. A group may override ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``bias_correction``, ``eps_inside_sqrt``, ``weight_decay_mode``, ``grad_averaging``,
            ``trust_clamp`` and ``adapt``, and may set ``layer_adaptation`` (bool) to force the trust ratio on or
            off for its tensors (see :func:`~legw_hf.decay_param_groups`).
        lr: learning rate η: a float or a one-element tensor (a tensor LR is read on device, never synced).
        betas: (β1, β2), each in [0, 1).
        eps: ε >= 0.
        weight_decay: λ >= 0.
        preset: ``"nvidia"``, ``"deepspeed"``, ``"optax"``, ``"paper"`` or None.
        bias_correction: ``"inside"`` (m̂, v̂ in r), ``"step_size"`` (√bc2/bc1 multiplies the step after the trust
            ratio) or ``"off"``.
        eps_inside_sqrt: put ε inside the square root.
        weight_decay_mode: ``"decoupled"`` (u = r + λp) or ``"l2"`` (λp added to the gradient before the moments;
            apex's ``adam_w_mode=False``).
        grad_averaging: m takes (1-β1)·g; False adds g itself (apex's ``grad_averaging=False``).
        max_grad_norm: divide all gradients by ``max(1, G/max_grad_norm)`` before the moments, with G their global
            norm (apex). None turns it off. Optimizer-wide, not per group. Do not combine with Trainer's own
            ``max_grad_norm`` clipping unless clipping twice is meant.
        trust_clamp: ``(min, max)`` bounds of a defined trust ratio, or None.
        adapt: ``"all"`` or ``"decayed"`` (only groups with λ ≠ 0).
        impl: which implementation runs the step, chosen once for every tensor of it (never one per bucket):

            - ``None`` (default): automatic, the first that fits every tensor and param group of ``"cpu"``,
              ``"fused_adam"``, ``"foreach"``. Chosen at construction from the parameters and again only when a
              step's tensors differ in device, dtype or masters (an engine's flat partitions, a moved model).
              Where the CPU kernel cannot be built, a one-time warning says why and the next one runs.
            - ``"reference"``: the single-tensor reference path, one tensor at a time in the formula's own order.
            - ``"foreach"``: torch's multi-tensor ``_foreach_`` ops; fits every tensor.
            - ``"fused_adam"``: torch's fused Adam kernel (``torch._fused_adam_`` / ``_fused_adamw_``, private ops
              checked once per process against the formula) for the moments and the Adam direction, ``_foreach_``
              ops for the rest. Needs bias_correction="inside", ε outside the root, decoupled decay and gradient
              averaging in every group, and fp32 tensors on CPU or CUDA without masters.
            - ``"cpu"``: legw_hf's two-pass C++ kernel (``csrc/lamb_cpu.cpp``, compiled on first use, see
              :mod:`legw_hf.optim._cpu_kernel`), which never materialises the update: no scratch memory, two passes
              over it. Needs contiguous fp32 CPU tensors without masters.
            - ``"triton"``: the same two passes as multi-tensor Triton kernels for contiguous fp32/bf16/fp16 CUDA
              tensors, fp32 masters written back to the parameters in the same pass
              (:mod:`legw_hf.optim._triton_kernel`, ``pip install 'legw_hf[gpu]'``; with ``TRITON_INTERPRET=1``
              Triton's interpreter takes CPU tensors). Opt-in until measured on a GPU.

            An explicit value never falls back: a requirement not met is a :class:`~legw_hf.SettingError` at
            construction, or at the first step whose tensors changed so that it no longer holds. :attr:`impl` says
            which implementation runs.
        master_weights: keep an fp32 copy of fp16/bf16 parameters and update that (moments are fp32 for such
            parameters either way).
        keep_workspace: keep the step's parameter-sized scratch list between steps; None keeps it on CPU only
            (see :class:`~legw_hf.optim.LayerwiseOptimizer`).
        foreach, fused, fused_adam: deprecated spellings of ``impl``, for one release (a
            :class:`DeprecationWarning` names the value to pass): ``foreach=False`` is ``"reference"``,
            ``foreach=True`` automatic, ``fused=True`` / ``"cpu"`` is ``"cpu"``, ``fused="triton"`` is ``"triton"``,
            ``fused_adam=True`` is ``"fused_adam"``; ``fused=False`` leaves the CPU kernel and ``fused_adam=False``
            torch's fused Adam kernel out of the automatic choice. They cannot be combined with ``impl``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = FROM_PRESET,
        betas: tuple[float, float] = FROM_PRESET,
        eps: float = FROM_PRESET,
        weight_decay: float = FROM_PRESET,
        *,
        preset: str | None = None,
        bias_correction: str = FROM_PRESET,
        eps_inside_sqrt: bool = FROM_PRESET,
        weight_decay_mode: str = FROM_PRESET,
        grad_averaging: bool = FROM_PRESET,
        max_grad_norm: float | None = FROM_PRESET,
        trust_clamp: tuple[float, float] | None = FROM_PRESET,
        adapt: str = FROM_PRESET,
        impl: str | None = None,
        master_weights: bool = False,
        keep_workspace: bool | None = None,
        foreach: bool | None = None,
        fused: bool | str | None = None,
        fused_adam: bool | None = None,
    ) -> None:
        requested, candidates = _requested_impl(impl, foreach, fused, fused_adam)
        given = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "eps_inside_sqrt": eps_inside_sqrt,
            "weight_decay_mode": weight_decay_mode,
            "grad_averaging": grad_averaging,
            "max_grad_norm": max_grad_norm,
            "trust_clamp": trust_clamp,
            "adapt": adapt,
        }
        if preset == "deepspeed" and max_grad_norm is not FROM_PRESET and max_grad_norm is not None:
            raise SettingError(
                "max_grad_norm",
                "cannot be combined with preset='deepspeed'",
                max_grad_norm,
                detail="DeepSpeed clips in its engine with its own formula; set gradient_clipping "
                "or Trainer's max_grad_norm instead, or pick preset='nvidia'",
            )
        settings = resolve(LAMB_DEFAULTS, LAMB_PRESETS, preset, given)
        self.preset = preset
        self.max_grad_norm = check_optional_positive("max_grad_norm", settings.pop("max_grad_norm"))
        if "fused_adam" in ((requested,) if requested else candidates):
            # the one-time check of torch's private kernel reads results back: here, never inside a step
            _fused_adam_agrees(in_place=self.max_grad_norm is not None)
        super().__init__(params, settings, master_weights=master_weights, keep_workspace=keep_workspace)
        # Chosen here for every tensor at once (the CPU kernel is built here when it is chosen, about half a minute
        # the first time), and again only when a step's tensors differ (legw_hf.optim._dispatch).
        self._cpu_kernel: Any = None  # the compiled module, once an implementation choice has loaded it
        self._dispatch = Dispatch(self, IMPLEMENTATIONS, requested, candidates)
        self._dispatch.start(parameter_signature(self))

    @property
    def fused_adam(self) -> bool | None:
        """Deprecated: read :attr:`impl`. True when ``impl="fused_adam"`` was asked for, else None."""
        _warn_replaced_attribute("fused_adam")
        return True if self.requested_impl == "fused_adam" else None

    def dispatch_settings(self, group: dict[str, Any]) -> tuple:
        return (group["bias_correction"], group["eps_inside_sqrt"], group["weight_decay_mode"], group["grad_averaging"])

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        group["lr"] = check_lr(group["lr"])
        group["betas"] = check_betas(group["betas"])
        group["eps"] = non_negative("eps", group["eps"])
        group["weight_decay"] = non_negative("weight_decay", group["weight_decay"])
        group["bias_correction"] = check_choice(
            "bias_correction",
            group["bias_correction"],
            BIAS_CORRECTIONS,
            detail="a bool is ambiguous: apex's True corrects inside the update, DeepSpeed's after the trust ratio"
            if isinstance(group["bias_correction"], bool)
            else "",
        )
        group["eps_inside_sqrt"] = check_flag("eps_inside_sqrt", group["eps_inside_sqrt"])
        group["weight_decay_mode"] = check_choice("weight_decay_mode", group["weight_decay_mode"], DECAY_MODES)
        group["grad_averaging"] = check_flag("grad_averaging", group["grad_averaging"])
        group["trust_clamp"] = check_clamp("trust_clamp", group["trust_clamp"])
        group["adapt"] = check_choice("adapt", group["adapt"], ADAPT_RULES)

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        # the step counter lives on the device, so bias corrections never need its value on the host
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)

    # ------------------------------------------------------------------------------------------------ step
    def _update(self, buckets: list[Bucket]) -> tuple[Tensor, Tensor, Tensor]:
        impl = self._implementation(buckets)  # first: a refusal leaves every tensor as it was
        grad_divisor = self._grad_divisor(buckets)
        for bucket in buckets:
            steps = list(bucket.counters.values())
            if self.uses_foreach:
                torch._foreach_add_(steps, 1.0)
            else:
                for step in steps:
                    step.add_(1.0)
        squares, apply = impl.run(self, buckets, grad_divisor)
        count = squares.numel() // 2
        param_norms, update_norms = squares[:count].sqrt(), squares[count:].sqrt()

        ratios, step_sizes, start = [], [], 0
        for bucket in buckets:
            group, end = bucket.group, start + len(bucket.weights)
            param_norm, update_norm = param_norms[start:end], update_norms[start:end]
            if self.is_adapted(group):
                ratio = trust_ratio(param_norm, update_norm, clamp=group["trust_clamp"])
            else:
                ratio = torch.ones_like(param_norm)
            step_size = group["lr"] * ratio
            if group["bias_correction"] == "step_size":
                bc1, bc2 = _bias_corrections(bucket, group)
                step_size = step_size * bc2.sqrt() / bc1
            ratios.append(ratio)
            step_sizes.append(step_size)
            start = end
        apply(step_sizes)
        return param_norms, update_norms, torch.cat(ratios)

    def _torch_pass(self, buckets: list[Bucket], grad_divisor: Tensor | None, direction: Any) -> tuple[Tensor, Any]:
        """Moments and a materialised ``u = c·u'`` per tensor (torch ops; ``direction`` is one of
        :func:`_reference_direction`, :func:`_foreach_direction`, :func:`_fused_adam_direction`); squared norms of
        p and u, and a function applying ``p -= step_size·u``."""
        updates: list[Tensor] = []
        inner_scales: list[Tensor] = []
        for bucket in buckets:
            bucket_updates, inner_scale = direction(self, bucket, grad_divisor)
            updates += bucket_updates
            inner_scales.append(inner_scale)
        weights = [weight for bucket in buckets for weight in bucket.weights]
        squares = self.squared_norms(weights + updates)
        scales = torch.cat(inner_scales)
        squares = torch.cat([squares[: len(weights)], squares[len(weights) :] * scales.square()])

        def apply(step_sizes: list[Tensor]) -> None:
            start = 0
            for bucket, step_size in zip(buckets, step_sizes, strict=True):
                end = start + len(bucket.weights)
                _ops.add_scaled_(
                    bucket.weights, updates[start:end], -step_size * scales[start:end], foreach=self.uses_foreach
                )
                start = end

        return squares, apply

    def _kernel_pass(self, buckets: list[Bucket], grad_divisor: Tensor | None, kernel: Any) -> tuple[Tensor, Any]:
        """Pass 1 of a two-pass kernel (the CPU one, or the Triton one, which takes the same arguments): moments and
        squared norms without materialising u; the returned function runs pass 2."""
        device = buckets[0].weights[0].device
        divisor = torch.ones(1, device=device) if grad_divisor is None else grad_divisor.reshape(1).float()
        parts, passes = [], []
        for bucket in buckets:
            group = bucket.group
            beta1, beta2 = group["betas"]
            decay = group["weight_decay"]
            l2 = group["weight_decay_mode"] == "l2"
            if group["bias_correction"] == "inside":
                bc1, bc2 = (c.float().contiguous() for c in _bias_corrections(bucket, group))
            else:
                bc1 = bc2 = torch.ones(len(bucket.weights), device=device)
            settings = (group["eps"], 0.0 if l2 else decay, group["eps_inside_sqrt"])
            exp_avgs, exp_avg_sqs = bucket.state_list("exp_avg"), bucket.state_list("exp_avg_sq")
            parts.append(
                kernel.moments_and_squared_norms(
                    bucket.weights,
                    bucket.grads,
                    exp_avgs,
                    exp_avg_sqs,
                    bc1,
                    bc2,
                    divisor,
                    beta1,
                    beta2,
                    1 - beta1 if group["grad_averaging"] else 1.0,
                    group["eps"],
                    decay if l2 else 0.0,
                    *settings[1:],
                )
            )
            # only the Triton kernel takes masters: it writes the rounded result into the parameters as well
            copies = {"copies": bucket.params} if bucket.has_masters else {}
            bucket.params_written = bucket.has_masters
            passes.append((bucket.weights, exp_avgs, exp_avg_sqs, bc1, bc2, settings, copies))
        local = torch.cat(parts)
        squares = self.reduce_squared_norms(torch.cat([local[:, 0], local[:, 1]]))

        def apply(step_sizes: list[Tensor]) -> None:
            for (weights, exp_avgs, exp_avg_sqs, bc1, bc2, settings, copies), step_size in zip(
                passes, step_sizes, strict=True
            ):
                steps = step_size.float().contiguous()
                kernel.apply_updates(weights, exp_avgs, exp_avg_sqs, bc1, bc2, steps, *settings, **copies)

        return squares, apply

    def _grad_divisor(self, buckets: list[Bucket]) -> Tensor | None:
        """``max(1, G / max_grad_norm)`` over every gradient of this step, on device; None when off."""
        if self.max_grad_norm is None:
            return None
        global_norm = self.global_grad_norm(buckets)
        return torch.where(
            global_norm > self.max_grad_norm, global_norm / self.max_grad_norm, torch.ones_like(global_norm)
        )


# ---------------------------------------------------------------------------------------------------- math
def _adam_direction(
    weight: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], grad_divisor: Tensor | None
) -> Tensor:
    """The reference form of steps 1-3 for one tensor: updates its moments, returns u."""
    beta1, beta2 = group["betas"]
    eps, decay = group["eps"], group["weight_decay"]
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    grad = grad.to(exp_avg.dtype)
    if grad_divisor is not None:
        grad = grad / grad_divisor
    if group["weight_decay_mode"] == "l2":
        grad = grad + decay * weight
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1 if group["grad_averaging"] else 1.0)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if group["bias_correction"] == "inside":
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    else:
        bias_correction1 = bias_correction2 = 1.0
    # in place on fresh tensors from here: one update per tensor is kept until the norms are known
    first, second = exp_avg / bias_correction1, exp_avg_sq / bias_correction2
    denominator = second.add_(eps).sqrt_() if group["eps_inside_sqrt"] else second.sqrt_().add_(eps)
    update = first.div_(denominator)
    if group["weight_decay_mode"] == "decoupled":
        update.add_(weight, alpha=decay)
    return update


def _bias_corrections(bucket: Bucket, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per-tensor ``(1-β1^t, 1-β2^t)`` vectors, from the step counters on device."""
    steps = torch.stack(bucket.state_list("step"))
    beta1, beta2 = group["betas"]
    return 1 - beta1**steps, 1 - beta2**steps


def _foreach_direction(
    bucket: Bucket, grad_divisor: Tensor | None, scratch: list[Tensor]
) -> tuple[list[Tensor], Tensor]:
    """Steps 1-3 over the bucket with ``_foreach_`` ops, in the one ``scratch`` list.

    With bias correction inside, ``r = c·m / (√v + ε√bc2)`` (or ``c·m / √(v + ε·bc2)``) with ``c = √bc2/bc1``
    is the same quotient as ``m̂/(√v̂ + ε)``; ``c`` stays a per-tensor factor of the result instead of a pass
    over memory, and the decay term is added as ``(λ/c)·p`` so the returned list is ``u / c``.
    """
    group = bucket.group
    beta1, beta2 = group["betas"]
    eps, decay = group["eps"], group["weight_decay"]
    weights, grads = bucket.weights, bucket.grads
    exp_avgs, exp_avg_sqs = bucket.state_list("exp_avg"), bucket.state_list("exp_avg_sq")
    dtype = exp_avgs[0].dtype

    l2 = group["weight_decay_mode"] == "l2" and decay != 0
    grads_in_scratch = grad_divisor is not None or l2 or grads[0].dtype != dtype
    if grads_in_scratch:  # the gradient the moments see must differ from p.grad, which stays untouched
        if grad_divisor is not None and grads[0].dtype == dtype:
            _ops.divide_by_into(grads, grad_divisor, scratch)
        else:  # upcast first: the quotient of fp16/bf16 values would be rounded to their precision
            torch._foreach_copy_(scratch, grads)
            if grad_divisor is not None:
                torch._foreach_div_(scratch, grad_divisor)
        if l2:
            torch._foreach_add_(scratch, weights, alpha=decay)
        grads = scratch

    if group["grad_averaging"]:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    else:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

    if group["bias_correction"] == "inside":
        bc1, bc2 = _bias_corrections(bucket, group)
        inner_scale = bc2.sqrt() / bc1
        eps_term = eps * (bc2 if group["eps_inside_sqrt"] else bc2.sqrt())
    else:
        inner_scale = torch.ones(len(weights), device=weights[0].device)
        eps_term = torch.full_like(inner_scale, eps)
    eps_terms = eps_term.unbind()

    if group["eps_inside_sqrt"]:
        _ops.add_into(exp_avg_sqs, eps_terms, scratch)
        torch._foreach_sqrt_(scratch)
    else:
        _ops.sqrt_into(exp_avg_sqs, scratch)
    if not group["eps_inside_sqrt"]:
        torch._foreach_add_(scratch, eps_terms)
    _ops.divide_into(exp_avgs, scratch)
    if group["weight_decay_mode"] == "decoupled" and decay != 0:
        _ops.add_scaled_(scratch, weights, decay / inner_scale, foreach=True)
    return scratch, inner_scale


def _fused_adam_direction(
    bucket: Bucket, scratch: list[Tensor], grad_divisor: Tensor | None
) -> tuple[list[Tensor], Tensor]:
    """Steps 1-3 through torch's fused Adam kernel, which updates the moments and forms ``m̂/(√v̂ + ε)`` in one
    pass over memory.

    Run on a scratch "parameter" holding ``λ·p`` with LR -1, the kernel leaves ``λ·p + m̂/(√v̂ + ε) = u``. With
    pre-normalisation the moments must see ``g / divisor``, which has to live in the scratch list (``p.grad`` is
    not ours to change); there the scratch is both gradient and parameter of the AdamW kernel, whose decoupled
    factor ``1 - lr·wd`` is 0 for lr = wd = -1, so the gradient is dropped and ``m̂/(√v̂ + ε)`` remains; ``λ·p`` is
    added after.
    """
    group = bucket.group
    beta1, beta2 = group["betas"]
    decay = group["weight_decay"]
    moments = (bucket.state_list("exp_avg"), bucket.state_list("exp_avg_sq"), [], bucket.state_list("step"))
    options = {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "amsgrad": False, "maximize": False}
    if grad_divisor is None:
        if decay != 0:
            _ops.scale_into(bucket.weights, decay, scratch)
        else:
            torch._foreach_zero_(scratch)
        torch._fused_adam_(scratch, bucket.grads, *moments, lr=-1.0, weight_decay=0.0, **options)
    else:
        _ops.divide_by_into(bucket.grads, grad_divisor, scratch)
        torch._fused_adamw_(scratch, scratch, *moments, lr=-1.0, weight_decay=-1.0, **options)
        if decay != 0:
            torch._foreach_add_(scratch, bucket.weights, alpha=decay)
    return scratch, torch.ones(len(scratch), device=scratch[0].device)


def _reference_direction(optimizer: Lamb, bucket: Bucket, grad_divisor: Tensor | None) -> tuple[list[Tensor], Tensor]:
    updates = [
        _adam_direction(weight, grad, state, bucket.group, grad_divisor)
        for weight, grad, state in zip(bucket.weights, bucket.grads, bucket.states, strict=True)
    ]
    return updates, torch.ones(len(updates), device=bucket.weights[0].device)


# ------------------------------------------------------------------------------------------ implementations
# Each is complete behind one two-pass interface, ``run(optimizer, buckets, grad_divisor) -> (squares, apply)``:
# pass 1 updates the moments and returns the squared norms of every p and then every u (reduced over shards);
# ``apply(step_sizes)`` is pass 2, ``p -= step_size·u``. legw_hf.optim._dispatch chooses one per step signature.
FP32 = torch.float32


def _fused_adam_settings(optimizer: Lamb) -> str | None:
    for group in optimizer.param_groups:
        if optimizer.dispatch_settings(group) != ("inside", False, "decoupled", True):
            return (
                "'fused_adam' needs bias_correction='inside', eps_inside_sqrt=False, weight_decay_mode='decoupled' "
                "and grad_averaging=True in every param group"
            )
    return None


def _fused_adam_tensors(signature: Signature) -> str | None:
    fits = all(
        kind.device in ("cpu", "cuda") and kind.weight_dtype == FP32 and kind.grad_dtypes == {FP32} and not kind.masters
        for kind in signature
    )
    return None if fits else "'fused_adam' needs fp32 parameters and gradients on CPU or CUDA, without masters"


def _fused_adam_available(optimizer: Lamb) -> str | None:
    if _fused_adam_agrees(in_place=optimizer.max_grad_norm is not None):
        return None
    return "'fused_adam' needs torch's fused Adam kernel, which this torch build lacks or computes differently"


def _cpu_tensors(signature: Signature) -> str | None:
    fits = all(
        kind.device == "cpu"
        and kind.weight_dtype == FP32
        and kind.grad_dtypes == {FP32}
        and not kind.masters
        and kind.contiguous
        and kind.lr_device in (None, "cpu")
        for kind in signature
    )
    return None if fits else "'cpu' needs contiguous fp32 CPU parameters and gradients without masters"


def _cpu_available(optimizer: Lamb) -> str | None:
    if optimizer._cpu_kernel is None:
        optimizer._cpu_kernel = _cpu_kernel.load()
    return None if optimizer._cpu_kernel is not None else "'cpu' needs LAMB's CPU kernel, which cannot be built here"


IMPLEMENTATIONS = (
    Implementation("reference", lambda opt, buckets, divisor: opt._torch_pass(buckets, divisor, _reference_direction)),
    Implementation(
        "foreach",
        lambda opt, buckets, divisor: opt._torch_pass(
            buckets, divisor, lambda o, bucket, d: _foreach_direction(bucket, d, o.workspace(bucket))
        ),
    ),
    Implementation(
        "fused_adam",
        lambda opt, buckets, divisor: opt._torch_pass(
            buckets, divisor, lambda o, bucket, d: _fused_adam_direction(bucket, o.workspace(bucket), d)
        ),
        settings=_fused_adam_settings,
        tensors=_fused_adam_tensors,
        available=_fused_adam_available,
    ),
    Implementation(
        "cpu",
        lambda opt, buckets, divisor: opt._kernel_pass(buckets, divisor, opt._cpu_kernel),
        tensors=_cpu_tensors,
        available=_cpu_available,
        builds=True,
        ready=lambda opt: opt._cpu_kernel is not None,
    ),
    Implementation(
        "triton",
        lambda opt, buckets, divisor: opt._kernel_pass(buckets, divisor, load_triton_kernels()),
        tensors=triton_refusal,
        available=triton_missing,
    ),
)
IMPL_NAMES = tuple(impl.name for impl in IMPLEMENTATIONS)
#: The automatic choice, best first: the first whose requirements every tensor and group meets.
AUTOMATIC = ("cpu", "fused_adam", "foreach")


def _requested_impl(impl: Any, foreach: Any, fused: Any, fused_adam: Any) -> tuple[str | None, tuple[str, ...]]:
    """``(impl, candidates of the automatic choice)`` from ``impl`` or the deprecated ``foreach``, ``fused`` and
    ``fused_adam`` (a :class:`DeprecationWarning` names the ``impl`` to pass instead)."""
    impl = check_value(impl, IMPL_NAMES)
    old = {name: value for name, value in (("foreach", foreach), ("fused", fused), ("fused_adam", fused_adam))}
    given = {name: value for name, value in old.items() if value is not None}
    if not given:
        return impl, AUTOMATIC
    refuse_impl_beside(impl, given, IMPL_NAMES)
    foreach = None if foreach is None else check_flag("foreach", foreach)
    fused = check_fused(fused, ("cpu", "triton"))
    fused_adam = None if fused_adam is None else check_flag("fused_adam", fused_adam)
    for name, insisted in (("fused_adam", fused_adam), ("fused", fused)):
        if insisted and foreach is False:
            raise SettingError(
                name,
                "needs the multi-tensor path",
                insisted,
                detail="foreach=False selects the single-tensor reference path, impl='reference'",
            )
    if fused_adam and fused:
        raise SettingError(
            "fused_adam", f"contradicts fused={fused!r}", True, detail=f"pick one: impl='fused_adam' or impl={fused!r}"
        )
    candidates = AUTOMATIC
    if foreach is False:
        impl, advice = "reference", "impl='reference'"
    elif fused:
        impl, advice = fused, f"impl={fused!r}"
    elif fused_adam:
        impl, advice = "fused_adam", "impl='fused_adam'"
    else:
        candidates = tuple(
            name
            for name in AUTOMATIC
            if not (name == "cpu" and fused is False) and not (name == "fused_adam" and fused_adam is False)
        )
        advice = {
            AUTOMATIC: "impl=None (the automatic choice)",
            ("fused_adam", "foreach"): "impl='fused_adam' or impl='foreach' (torch ops only; this spelling takes the "
            "first of them that fits)",
            ("cpu", "foreach"): "impl=None (the automatic choice), or impl='foreach' or impl='cpu'",
            ("foreach",): "impl='foreach'",
        }[candidates]
    spelled = ", ".join(f"{name}={value!r}" for name, value in given.items())
    warnings.warn(
        f"Lamb({spelled}) is deprecated and will be removed in the next release; pass {advice}",
        DeprecationWarning,
        stacklevel=3,
    )
    return impl, candidates


def _kernel_matches(in_place: bool) -> bool:
    """Run the fused kernel the way :func:`_fused_adam_direction` does on 37 values (whole SIMD vectors and a
    tail) and compare with the Adam formula."""
    generator = torch.Generator().manual_seed(0)
    grad, base = torch.randn(37, generator=generator), torch.randn(37, generator=generator)
    exp_avg = 0.1 * torch.randn(37, generator=generator)
    exp_avg_sq = 0.01 * torch.rand(37, generator=generator)
    m, v, step = exp_avg.clone(), exp_avg_sq.clone(), torch.tensor(3.0)
    options = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "amsgrad": False, "maximize": False}
    if in_place:
        out = start = grad.clone()
        torch._fused_adamw_([out], [out], [m], [v], [], [step], lr=-1.0, weight_decay=-1.0, **options)
        start, untouched = torch.zeros(37), True
    else:
        out, grad_in, start = base.clone(), grad.clone(), base
        torch._fused_adam_([out], [grad_in], [m], [v], [], [step], lr=-1.0, weight_decay=0.0, **options)
        untouched = torch.equal(grad_in, grad)
    m_ref = 0.9 * exp_avg + 0.1 * grad
    v_ref = 0.99 * exp_avg_sq + 0.01 * grad * grad
    expected = start + (m_ref / (1 - 0.9**3)) / ((v_ref / (1 - 0.99**3)).sqrt() + 1e-6)
    return bool(
        untouched
        and torch.allclose(m, m_ref, rtol=1e-5, atol=1e-7)
        and torch.allclose(v, v_ref, rtol=1e-5, atol=1e-7)
        and torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    )


@functools.cache
def _fused_adam_agrees(in_place: bool = False) -> bool:
    """Whether torch's private fused Adam kernel exists and computes what :func:`_fused_adam_direction` relies
    on (``in_place``: the AdamW kernel with gradient and parameter in one buffer). Checked once per process on CPU,
    outside any step, since the check reads results back."""
    if getattr(torch, "_fused_adamw_" if in_place else "_fused_adam_", None) is None:
        return False
    try:
        return _kernel_matches(in_place)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


__all__ = ["LAMB_DEFAULTS", "LAMB_PRESETS", "Lamb"]
