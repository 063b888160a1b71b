"""A small random problem on which each optimizer is compared against an independent reference.

Tensors of several shapes in two groups (decayed / not decayed), including a one-element tensor, a matrix, a 4-d
tensor, a bias that starts at zero (‖p‖ = 0 on the first step) and a tensor whose gradient is always zero
(‖g‖ = 0, and ‖u‖ = 0 without decay). Gradients feed back: ``g_t = A ⊙ p + noise_t``, so a wrong step changes
every later gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

STEPS = 50
SHAPES: dict[str, tuple[int, ...]] = {
    "matrix": (16, 8),
    "kernel": (4, 3, 2, 2),
    "scalar": (1,),
    "frozen": (3, 4),
    "bias": (7,),
    "norm_weight": (8,),
}
DECAYED = ("matrix", "kernel", "scalar", "frozen")
NOT_DECAYED = ("bias", "norm_weight")
NAMES = DECAYED + NOT_DECAYED

Arrays = dict[str, np.ndarray]


def initial_params(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    params = {
        "matrix": rng.normal(0.0, 0.5, SHAPES["matrix"]),
        "kernel": rng.normal(0.0, 1.0, SHAPES["kernel"]),
        "scalar": np.array([0.8]),
        "frozen": rng.normal(0.0, 0.3, SHAPES["frozen"]),
        "bias": np.zeros(SHAPES["bias"]),
        "norm_weight": 1.0 + rng.normal(0.0, 0.1, SHAPES["norm_weight"]),
    }
    return {name: value.astype(np.float32) for name, value in params.items()}


class GradientField:
    """``g_t(p) = A ⊙ p + noise_t`` per tensor; zero for ``frozen``."""

    def __init__(self, seed: int = 1, steps: int = STEPS, noise: float = 0.3) -> None:
        rng = np.random.default_rng(seed)
        self.curvature = {name: rng.uniform(0.5, 1.5, shape).astype(np.float32) for name, shape in SHAPES.items()}
        self.noise = [
            {name: (noise * rng.normal(size=shape)).astype(np.float32) for name, shape in SHAPES.items()}
            for _ in range(steps)
        ]
        self.curvature["frozen"][...] = 0.0
        for noise_t in self.noise:
            noise_t["frozen"][...] = 0.0

    def __call__(self, params: Arrays, step: int) -> Arrays:
        return {
            name: (self.curvature[name] * params[name] + self.noise[step][name]).astype(np.float32) for name in params
        }


def torch_params(arrays: Arrays, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(arrays[name], dtype=dtype, requires_grad=True) for name in NAMES}


def torch_groups(params: dict[str, torch.Tensor], decay: float, **no_decay_extra) -> list[dict]:
    return [
        {"params": [params[n] for n in DECAYED], "param_names": list(DECAYED), "weight_decay": decay},
        {
            "params": [params[n] for n in NOT_DECAYED],
            "param_names": list(NOT_DECAYED),
            "weight_decay": 0.0,
            **no_decay_extra,
        },
    ]


def run_torch(
    make_optimizer: Callable[[dict[str, torch.Tensor]], torch.optim.Optimizer],
    field: GradientField,
    steps: int = STEPS,
    dtype: torch.dtype = torch.float32,
) -> tuple[Arrays, torch.optim.Optimizer]:
    """Train with the optimizer on the gradient field; returns final parameters as fp32 arrays."""
    params = torch_params(initial_params(), dtype)
    optimizer = make_optimizer(params)
    for step in range(steps):
        current = {name: p.detach().float().numpy() for name, p in params.items()}
        for name, grad in field(current, step).items():
            params[name].grad = torch.tensor(grad, dtype=dtype)
        optimizer.step()
    return {name: p.detach().float().numpy() for name, p in params.items()}, optimizer


def relative_errors(result: Arrays, reference: Arrays) -> dict[str, float]:
    """Per tensor ‖result - reference‖ / ‖reference‖ (0 when both are exactly zero)."""
    errors = {}
    for name in reference:
        diff = float(np.linalg.norm((result[name] - reference[name]).astype(np.float64)))
        scale = float(np.linalg.norm(reference[name].astype(np.float64)))
        errors[name] = diff / scale if scale > 0 else diff
    return errors


def assert_close(result: Arrays, reference: Arrays, tolerance: float = 1e-5) -> None:
    errors = relative_errors(result, reference)
    assert max(errors.values()) <= tolerance, errors
    moved = relative_errors(initial_params(), reference)
    del moved["frozen"]  # moves by decay alone, if at all
    assert min(moved.values()) > 1e-2, ("the reference barely moved; the comparison would prove nothing", moved)
