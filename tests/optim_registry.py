"""The optimizer configurations the tests run, declared once (torch's ``common_optimizers.py`` is the model).

- :data:`INFOS`: per optimizer, the settings that change its math (presets and switches) and the implementations
  of one step (paths). The path tests run every setting on every path against the single-tensor reference; the
  Triton tests run every setting on the Triton path.
- :data:`NAMED`: named configurations (optimizer, settings, path, learning rate) for the tests that need a few
  representative optimizers rather than every setting: precision, behaviour (no host sync, state round trips) and
  the sharded-parity launches.
- :data:`PRECISIONS`: parameter dtype and whether the optimizer keeps fp32 masters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from legw_hf import Lamb, Lars
from legw_hf.optim._base import LayerwiseOptimizer


@dataclass(frozen=True)
class OptimizerInfo:
    cls: type[LayerwiseOptimizer]
    #: the gradient-field tests' learning rate
    lr: float
    #: presets and switches that change the math, each a keyword dict
    settings: tuple[dict[str, Any], ...]
    #: implementations of one step; ``"single"`` is the reference the others must agree with
    paths: dict[str, dict[str, Any]]


INFOS: dict[str, OptimizerInfo] = {
    "lamb": OptimizerInfo(
        Lamb,
        lr=1e-2,
        settings=(
            {},
            {"preset": "nvidia"},
            {"preset": "nvidia", "adapt": "all", "max_grad_norm": 0.5},
            {"preset": "deepspeed"},
            {"preset": "deepspeed", "eps_inside_sqrt": True},
            {"preset": "optax", "eps_inside_sqrt": True},
            {"preset": "paper"},
            {"bias_correction": "off", "trust_clamp": (0.5, 2.0)},
            {"weight_decay_mode": "l2", "grad_averaging": False},
            {"max_grad_norm": 0.5, "adapt": "decayed"},
        ),
        paths={
            "single": {"impl": "reference"},
            "foreach": {"impl": "foreach"},  # plain _foreach_ ops
            "fused-adam": {"impl": "fused_adam"},  # torch's fused Adam kernel; refused where the settings differ
            "cpu-kernel": {"impl": "cpu"},  # legw_hf's two-pass kernel
            "triton": {"impl": "triton"},  # opt-in; on CPU in Triton's interpreter
        },
    ),
    "lars": OptimizerInfo(
        Lars,
        lr=0.5,
        settings=(
            {},
            {"preset": "larc", "nesterov": True},
            {"preset": "larc_scale", "momentum": 0.9},
            {"preset": "optax"},
            {"preset": "optax", "nesterov": True},
            {"preset": "optax", "nesterov": True, "adapt": "decayed"},
            {"momentum": 0.0, "local_lr_clip": True},
            {"momentum": 0.0, "trust_denominator": "update_norm"},
            {"trust_denominator": "update_norm", "adapt": "decayed"},
        ),
        paths={
            "single": {"impl": "reference"},
            "foreach": {"impl": "foreach"},
            "triton": {"impl": "triton"},
        },
    ),
}


def settings_id(settings: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in settings.items()) or "default"


def settings_of(optimizer: str) -> list[Any]:
    """``pytest.param`` of each setting of ``optimizer``, named by its keywords."""
    import pytest

    return [pytest.param(s, id=settings_id(s)) for s in INFOS[optimizer].settings]


@dataclass(frozen=True)
class NamedConfig:
    optimizer: str
    lr: float
    settings: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # None: the default path for the tensors
    tensor_lr: bool = False  # the LR as a one-element tensor (read on device)

    def build(self, params: Iterable[Any], **overrides: Any) -> LayerwiseOptimizer:
        info = INFOS[self.optimizer]
        lr = torch.tensor(self.lr) if self.tensor_lr else self.lr
        path = info.paths[self.path] if self.path else {}
        return info.cls(params, lr=lr, **(self.settings | path | overrides))


NAMED: dict[str, NamedConfig] = {
    "lamb": NamedConfig("lamb", 1e-2),
    "lamb-single": NamedConfig("lamb", 1e-2, path="single"),
    "lamb-foreach": NamedConfig("lamb", 1e-2, path="foreach"),
    "lamb-fused-adam": NamedConfig("lamb", 1e-2, path="fused-adam"),
    "lamb-nvidia": NamedConfig("lamb", 1e-2, {"preset": "nvidia"}),
    "lamb-deepspeed": NamedConfig("lamb", 1e-2, {"preset": "deepspeed", "eps_inside_sqrt": True}, tensor_lr=True),
    "lamb-deepspeed-single": NamedConfig("lamb", 1e-2, {"preset": "deepspeed"}, path="single"),
    "lamb-paper-l2": NamedConfig("lamb", 1e-2, {"preset": "paper", "weight_decay_mode": "l2", "grad_averaging": False}),
    "lamb-optax-single": NamedConfig("lamb", 1e-2, {"preset": "optax"}, path="single"),
    "lars": NamedConfig("lars", 0.1),
    "lars-larc": NamedConfig("lars", 0.1, {"preset": "larc", "nesterov": True}, tensor_lr=True),
    "lars-larc-decay": NamedConfig("lars", 0.05, {"preset": "larc", "weight_decay": 1e-4}),
    "lars-optax-single": NamedConfig("lars", 0.1, {"preset": "optax"}, path="single"),
    "lars-optax-nesterov": NamedConfig("lars", 1.0, {"preset": "optax", "nesterov": True}),
    "lars-no-momentum": NamedConfig("lars", 0.1, {"momentum": 0.0, "trust_denominator": "update_norm"}),
}

#: The sharded-parity launches' configurations (tests/scripts/sharded_parity.py), at step sizes that move a tiny
#: transformer far in 10 steps, so that an unaware (per-piece) trust ratio shows.
SHARDED: dict[str, NamedConfig] = {
    "lamb-nvidia": NamedConfig("lamb", 0.02, {"preset": "nvidia"}),
    "lamb-deepspeed": NamedConfig("lamb", 0.02, {"preset": "deepspeed", "weight_decay": 0.01}),
    "lamb-optax": NamedConfig("lamb", 0.02, {"preset": "optax", "weight_decay": 0.01}),
    # the others take LAMB's CPU kernel (the default for fp32 CPU tensors); this one torch's ops
    "lamb-optax-torch-ops": NamedConfig("lamb", 0.02, {"preset": "optax", "weight_decay": 0.01}, path="fused-adam"),
    "lars": NamedConfig("lars", 1.0, {"preset": "larc_scale", "momentum": 0.9, "weight_decay": 1e-4}),
}
#: The configurations the engine variants run (ZeRO-3's persistence threshold, bf16, offload, the Triton kernels,
#: accelerate's FSDP2 preparation), and whose unaware run shows the check can fail: the two whose norms reduce
#: differently (LAMB's pre-normalisation takes a global norm of its own; LARS has no moments). Every configuration
#: runs on the plain sharded engines (SHARDED_EVERY_CONFIG), where the element-wise math of the others meets each
#: sharding; ZeRO-0, which keeps whole tensors, runs the two. No unaware run on ZeRO-0 (awareness changes nothing
#: there) nor on the Triton variants.
SHARDED_FEW = SHARDED_NAIVE = ("lamb-nvidia", "lars")
SHARDED_EVERY_CONFIG = ("zero1", "zero2", "zero3", "fsdp2")


def makes_naive_run(engine: str, name: str) -> bool:
    """Whether the sharded-parity launch also runs configuration ``name`` on ``engine`` with the awareness off."""
    return name in SHARDED_NAIVE and not engine.endswith("-triton") and not engine.startswith("zero0")


#: (parameter dtype, fp32 masters)
PRECISIONS = [(torch.float32, False), (torch.bfloat16, True)]
