"""Independent references for the optimizer tests: NumPy transcriptions of the cited sources, and optax.

Each NumPy function follows its source line by line in fp32, as the original kernels compute (scalars cast to
float32 where the C++ holds them in ``float``). None of them shares code with legw_hf.
"""

from __future__ import annotations

import re

import jax

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp
import numpy as np
import optax
from optim_problem import DECAYED, NAMES, NOT_DECAYED, STEPS, Arrays, GradientField, initial_params

F32 = np.float32


def _norm(x: np.ndarray) -> np.float32:
    return F32(np.sqrt(np.sum(x * x, dtype=F32)))


def _groups(decay: float) -> list[tuple[tuple[str, ...], float]]:
    return [(DECAYED, decay), (NOT_DECAYED, 0.0)]


def apex_fused_lamb(
    field: GradientField,
    *,
    lr: float,
    decay: float,
    betas=(0.9, 0.999),
    eps: float = 1e-6,
    max_grad_norm: float = 1.0,
    use_nvlamb: bool = False,
) -> Arrays:
    """NVIDIA/apex ``apex/optimizers/fused_lamb.py`` ``FusedLAMB.step`` with ``csrc/multi_tensor_lamb.cu``
    (``multi_tensor_lamb_cuda``, ``LAMBStage1Functor``, ``LAMBStage2Functor``): fp32 params, bias_correction=True,
    adam_w_mode=True (MOMENT_MODE_1), grad_averaging=True, one decayed and one λ=0 group."""
    params = initial_params()
    exp_avg = {n: np.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: np.zeros_like(p) for n, p in params.items()}
    group_step = [0, 0]
    beta1, beta2 = F32(betas[0]), F32(betas[1])
    for t in range(STEPS):
        grads = field(params, t)
        # FusedLAMB.step: l2norm of the fp32 grads and of the (empty) fp16 grads, blended into one global norm.
        g_norm_32 = F32(np.sqrt(sum(np.sum(g * g, dtype=F32) for g in grads.values())))
        global_grad_norm = F32(np.sqrt(g_norm_32 * g_norm_32 + F32(0.0)))
        for index, (names, weight_decay) in enumerate(_groups(decay)):
            group_step[index] += 1  # "assume same step across group now"
            step = group_step[index]
            # multi_tensor_lamb_cuda: float bias corrections; beta3 = 1 - beta1 with grad averaging.
            bias_correction1 = F32(1 - float(beta1) ** step)
            bias_correction2 = F32(1 - float(beta2) ** step)
            beta3 = F32(1) - beta1
            # per-tensor param norms come from multi_tensor_l2norm before stage 1 runs
            param_norm = {n: _norm(params[n]) for n in names}
            # LAMBStage1Functor: clipped_global_grad_norm, then the update written into the grad buffer.
            clipped = global_grad_norm / F32(max_grad_norm) if global_grad_norm > max_grad_norm else F32(1.0)
            update = {}
            for n in names:
                scaled_grad = grads[n] / clipped
                exp_avg[n] = exp_avg[n] * beta1 + beta3 * scaled_grad
                exp_avg_sq[n] = exp_avg_sq[n] * beta2 + (F32(1) - beta2) * scaled_grad * scaled_grad
                next_m_unbiased = exp_avg[n] / bias_correction1
                next_v_unbiased = exp_avg_sq[n] / bias_correction2
                denom = np.sqrt(next_v_unbiased) + F32(eps)
                update[n] = (next_m_unbiased / denom) + (F32(weight_decay) * params[n])
            # LAMBStage2Functor: ratio = lr * (param_norm / update_norm) for nvlamb or decay != 0.
            for n in names:
                ratio = F32(lr)
                if use_nvlamb or weight_decay != 0.0:
                    update_norm = _norm(update[n])
                    if update_norm != 0 and param_norm[n] != 0:
                        ratio = F32(lr) * (param_norm[n] / update_norm)
                params[n] = params[n] - ratio * update[n]
    return params


def deepspeed_fused_lamb(
    field: GradientField,
    *,
    lr: float,
    decay: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    eps_inside_sqrt: bool = False,
    min_coeff: float = 0.01,
    max_coeff: float = 10.0,
) -> Arrays:
    """DeepSpeed ``deepspeed/ops/lamb/fused_lamb.py`` ``FusedLamb.step`` with
    ``csrc/lamb/fused_lamb_cuda_kernel.cu`` (``fused_lamb_cuda``, ``lamb_cuda_kernel_part1/2/3``): fp32 params,
    bias_correction=True, scale=1, max_grad_norm=0."""
    params = initial_params()
    exp_avg = {n: np.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: np.zeros_like(p) for n, p in params.items()}
    state_step = dict.fromkeys(NAMES, 0)
    beta1, beta2 = F32(betas[0]), F32(betas[1])
    for t in range(STEPS):
        grads = field(params, t)
        for names, weight_decay in _groups(decay):
            for n in names:
                state_step[n] += 1
                # fused_lamb_cuda: step_size = lr * sqrt(bias_correction2) / bias_correction1, in float
                bias_correction1 = F32(1 - float(beta1) ** state_step[n])
                bias_correction2 = F32(1 - float(beta2) ** state_step[n])
                step_size = F32(lr) * np.sqrt(bias_correction2) / bias_correction1
                # part 1: moments, update, and the two sums of squares
                p, scaled_grad = params[n], grads[n] / F32(1.0)
                exp_avg[n] = beta1 * exp_avg[n] + (F32(1) - beta1) * scaled_grad
                exp_avg_sq[n] = beta2 * exp_avg_sq[n] + (F32(1) - beta2) * scaled_grad * scaled_grad
                if eps_inside_sqrt:  # ADAM_MODE_0
                    denom = np.sqrt(exp_avg_sq[n] + F32(eps))
                else:  # ADAM_MODE_1
                    denom = np.sqrt(exp_avg_sq[n]) + F32(eps)
                update = (exp_avg[n] / denom) + (F32(weight_decay) * p)
                w_l2, u_l2 = np.sum(p * p, dtype=F32), np.sum(update * update, dtype=F32)
                # part 3: lamb_coeff, clamped only when both norms are non-zero
                reg_w, reg_u = np.sqrt(w_l2), np.sqrt(u_l2)
                lamb_coeff = F32(1.0)
                if reg_w != 0 and reg_u != 0:
                    lamb_coeff = min(max(reg_w / reg_u, F32(min_coeff)), F32(max_coeff))
                params[n] = p - (step_size * lamb_coeff * update)
    return params


def tf_addons_lamb(
    field: GradientField,
    *,
    lr: float,
    decay: float,
    betas=(0.9, 0.999),
    eps: float = 1e-6,
    exclude_from_weight_decay: tuple[str, ...] | None = NOT_DECAYED,
    exclude_from_layer_adaptation: tuple[str, ...] | None = None,
) -> Arrays:
    """tensorflow/addons ``tensorflow_addons/optimizers/lamb.py``: ``LAMB._prepare_local``,
    ``_resource_apply_dense``, ``_do_use_weight_decay``, ``_do_layer_adaptation``; the layer-adaptation
    exclusions default to the weight-decay exclusions (``__init__``)."""
    if not exclude_from_layer_adaptation:
        exclude_from_layer_adaptation = exclude_from_weight_decay
    params = initial_params()
    m_slot = {n: np.zeros_like(p) for n, p in params.items()}
    v_slot = {n: np.zeros_like(p) for n, p in params.items()}
    beta_1_t, beta_2_t = F32(betas[0]), F32(betas[1])

    def excluded(patterns, name):
        return bool(patterns) and any(re.search(r, name) is not None for r in patterns)

    for iterations in range(STEPS):
        grads = field(params, iterations)
        local_step = F32(iterations + 1)
        beta_1_power, beta_2_power = np.power(beta_1_t, local_step), np.power(beta_2_t, local_step)
        for n in NAMES:
            var, grad = params[n], grads[n]
            m_t = m_slot[n] * beta_1_t + grad * (F32(1) - beta_1_t)
            v_t = v_slot[n] * beta_2_t + (grad * grad) * (F32(1) - beta_2_t)
            m_slot[n], v_slot[n] = m_t, v_t
            m_t_hat = m_t / (F32(1.0) - beta_1_power)
            v_t_hat = v_t / (F32(1.0) - beta_2_power)
            update = m_t_hat / (np.sqrt(v_t_hat) + F32(eps))
            if not excluded(exclude_from_weight_decay, n):
                update = update + F32(decay) * var
            ratio = F32(1.0)
            if not excluded(exclude_from_layer_adaptation, n):
                w_norm, g_norm = _norm(var), _norm(update)
                ratio = (w_norm / g_norm if g_norm > 0 else F32(1.0)) if w_norm > 0 else F32(1.0)
            params[n] = var - ratio * F32(lr) * update
    return params


def apex_larc_sgd(
    field: GradientField,
    *,
    lr: float,
    decay: float,
    momentum: float,
    trust_coefficient: float,
    clip: bool,
    eps: float = 1e-8,
    nesterov: bool = False,
) -> Arrays:
    """apex ``apex/parallel/LARC.py`` ``LARC.step`` wrapping ``torch.optim.SGD`` (``torch/optim/sgd.py``
    ``_single_tensor_sgd``, dampening 0). LARC takes each group's weight decay and sets the SGD's to 0."""
    params = initial_params()
    momentum_buffer: dict[str, np.ndarray | None] = dict.fromkeys(NAMES)
    for t in range(STEPS):
        grads = {n: g.copy() for n, g in field(params, t).items()}  # LARC edits p.grad in place
        for names, weight_decay in _groups(decay):
            for n in names:
                param_norm, grad_norm = _norm(params[n]), _norm(grads[n])
                if param_norm != 0 and grad_norm != 0:
                    adaptive_lr = (
                        F32(trust_coefficient) * param_norm / (grad_norm + param_norm * F32(weight_decay) + F32(eps))
                    )
                    if clip:
                        adaptive_lr = min(adaptive_lr / F32(lr), F32(1))
                    grads[n] += F32(weight_decay) * params[n]
                    grads[n] *= adaptive_lr
        for n in NAMES:  # SGD.step with weight_decay 0
            grad = grads[n]
            if momentum != 0:
                if momentum_buffer[n] is None:
                    momentum_buffer[n] = grad.copy()
                else:
                    momentum_buffer[n] = momentum_buffer[n] * F32(momentum) + grad
                grad = grad + F32(momentum) * momentum_buffer[n] if nesterov else momentum_buffer[n]
            params[n] = params[n] + F32(-lr) * grad
    return params


def run_optax(transform: optax.GradientTransformation, field: GradientField) -> Arrays:
    """Train with an optax transformation on the same problem (jax on CPU, fp32)."""
    params = {n: jnp.asarray(p) for n, p in initial_params().items()}
    state = transform.init(params)
    update = jax.jit(transform.update)
    for t in range(STEPS):
        grads = field({n: np.asarray(p) for n, p in params.items()}, t)
        updates, state = update({n: jnp.asarray(g) for n, g in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
    return {n: np.asarray(p, dtype=np.float32) for n, p in params.items()}


DECAY_MASK = {n: n in DECAYED for n in NAMES}
