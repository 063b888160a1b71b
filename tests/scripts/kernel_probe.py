"""Load LAMB's CPU kernel from the checkout given as argv[1], use it once, and print what happened as JSON."""

from __future__ import annotations

import json
import sys

sys.path.insert(0, sys.argv[1])

import torch

from legw_hf import Lamb
from legw_hf.optim import _cpu_kernel


def one_step(impl: str) -> torch.Tensor:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(1000))
    param.grad = torch.randn(1000)
    Lamb([param], lr=1e-2, weight_decay=0.01, impl=impl).step()
    return param.detach()


kernel = one_step("cpu")
print(
    json.dumps(
        {
            "package": _cpu_kernel.__file__,
            "library": str(_cpu_kernel.library_path()),
            "built_here": _cpu_kernel.built_here,
            "agrees": bool(torch.allclose(kernel, one_step("foreach"), rtol=1e-6, atol=1e-7)),
        }
    )
)
