"""Compile every Triton kernel variant legw_hf launches for sm_90, and each kernel for sm_80, with Triton's real
compiler (no GPU needed: Triton ships ptxas) and print, per variant and target, the cubin size and the 16-byte
vector loads and stores in the PTX, as JSON. Run without TRITON_INTERPRET."""

from __future__ import annotations

import itertools
import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from legw_hf.optim import _triton_kernel as kernels

assert not kernels.INTERPRETED, "compiling needs the real compiler: run without TRITON_INTERPRET=1"

F32, I32, I64P, F32P = "fp32", "i32", "*i64", "*fp32"
HALVES = (tl.float32, tl.bfloat16, tl.float16)

SIGNATURES = {
    "_lamb_moments_kernel": {
        "table_ptr": I64P,
        "n_tensors": I32,
        "bc1_ptr": F32P,
        "bc2_ptr": F32P,
        "divisor_ptr": F32P,
        "partial_ptr": F32P,
        "beta1": F32,
        "beta2": F32,
        "grad_weight": F32,
        "square_weight": F32,
        "l2_decay": F32,
        "decay": F32,
        "eps": F32,
    },
    "_lamb_apply_kernel": {
        "table_ptr": I64P,
        "n_tensors": I32,
        "bc1_ptr": F32P,
        "bc2_ptr": F32P,
        "step_ptr": F32P,
        "decay": F32,
        "eps": F32,
    },
    "_lars_squares_kernel": {"table_ptr": I64P, "n_tensors": I32, "partial_ptr": F32P, "decay": F32},
    "_lars_apply_kernel": {
        "table_ptr": I64P,
        "n_tensors": I32,
        "decay_ptr": F32P,
        "into_ptr": F32P,
        "out_ptr": F32P,
        "momentum": F32,
    },
    "_sum_per_tensor_kernel": {
        "table_ptr": I64P,
        "n_tensors": I32,
        "n_chunks": I32,
        "partial_ptr": F32P,
        "out_ptr": F32P,
    },
}


def variants():
    """(kernel, constexprs, whether it writes tensors) for the dtype mixes and flags the optimizers use."""
    sizes = {"CHUNK": kernels.CHUNK, "BLOCK": kernels.BLOCK}
    for weight, aligned, inside in itertools.product(HALVES, (True, False), (False, True)):
        grads = (weight,) if weight is tl.float32 else (weight, tl.float32)
        for grad in grads:
            yield (
                "_lamb_moments_kernel",
                {"EPS_INSIDE_ROOT": inside, "WEIGHT": weight, "GRAD": grad, "ALIGNED": aligned, **sizes},
                True,
            )
            yield "_lars_squares_kernel", {"WEIGHT": weight, "GRAD": grad, "ALIGNED": aligned, **sizes}, False
    for (weight, copy), aligned in itertools.product(
        [
            (tl.float32, None),
            (tl.bfloat16, None),
            (tl.float16, None),
            (tl.float32, tl.bfloat16),
            (tl.float32, tl.float16),
        ],
        (True, False),
    ):
        has_copy = copy is not None
        copy = copy or tl.float32
        yield (
            "_lamb_apply_kernel",
            {
                "EPS_INSIDE_ROOT": False,
                "WEIGHT": weight,
                "COPY": copy,
                "HAS_COPY": has_copy,
                "ALIGNED": aligned,
                **sizes,
            },
            True,
        )
        grad = copy if has_copy else weight
        for momentum, nesterov in ((True, False), (True, True), (False, False)):
            yield (
                "_lars_apply_kernel",
                {
                    "WEIGHT": weight,
                    "GRAD": grad,
                    "COPY": copy,
                    "HAS_MOMENTUM": momentum,
                    "NESTEROV": nesterov,
                    "HAS_COPY": has_copy,
                    "ALIGNED": aligned,
                    **sizes,
                },
                True,
            )
    yield "_sum_per_tensor_kernel", {"BLOCK": 256}, False


def describe(value):
    return str(value).replace("triton.language.", "") if not isinstance(value, bool) else str(value)


def targets():
    """Every variant for sm_90; for sm_80, each kernel's first variant, which shows the kernels build for that
    architecture too (the vector width comes from the alignment and the layout, the same on both)."""
    first_of_kernel = set()
    for name, constexprs, stores_tensors in variants():
        yield name, constexprs, stores_tensors, 90
        if name not in first_of_kernel:
            first_of_kernel.add(name)
            yield name, constexprs, stores_tensors, 80


def main() -> None:
    report = {}
    for name, constexprs, stores_tensors, arch in targets():
        signature = dict(SIGNATURES[name]) | dict.fromkeys(constexprs, "constexpr")
        source = ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        ptx = compiled.asm["ptx"]
        label = f"{name}[{','.join(f'{k}={describe(v)}' for k, v in constexprs.items())}]@sm_{arch}"
        report[label] = {
            "cubin_bytes": len(compiled.asm["cubin"]),
            "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx)),
            "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[24]", ptx)),
            "aligned": constexprs.get("ALIGNED", False),
            "stores_tensors": stores_tensors,
        }
    json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
