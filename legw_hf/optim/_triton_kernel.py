"""LAMB's and LARS' two passes as multi-tensor Triton kernels (``pip install legw_hf[gpu]``).

The passes are the CPU kernel's (``csrc/lamb_cpu.cpp``), for CUDA tensors of fp32, bf16 or fp16:

- LAMB pass 1 updates m and v and returns, per tensor, ``‖p‖²`` and ``‖u‖²`` of the update
  ``u = (m/bc1) / (√(v/bc2) + ε) + λp`` without writing u; pass 2 recomputes u from the new moments and applies
  ``p -= step[t]·u`` (and, with fp32 masters, writes the rounded copy into the fp16/bf16 parameter).
- LARS pass 1 returns ``‖p‖²`` and ``‖g + λp‖²``; pass 2 applies the momentum step with per-tensor factors.

Between the passes the caller turns the squares into trust ratios with torch ops on device, after its
``reduce_squared_norms`` hook, so a sharded step keeps its one all-reduce.

*Multi-tensor*: every tensor of a launch is cut into chunks of :data:`CHUNK` elements, and one program runs per
chunk of any tensor, so a step is a handful of launches whatever the number of tensors. The addresses and sizes
of the tensors travel in one int64 table (one host-to-device copy, from pinned memory, never a read back); the
per-tensor sums of the chunks' partial squares come from a third, deterministic kernel (no atomics), so a step
gives the same bits every time.

Moments and momentum buffers are fp32 (the optimizers' :func:`~legw_hf.optim._base.state_dtype`), loaded values
are computed in fp32 and rounded once on store. Every per-tensor scalar (bias corrections, the steps, the
gradient divisor, a tensor LR) is read by the kernel from device memory.

With ``TRITON_INTERPRET=1`` Triton runs these kernels on CPU tensors in its interpreter (numpy), which is how
they are tested on machines without a GPU; it must be set before this module is imported.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Elements per program; a multiple of :data:`BLOCK`.
CHUNK = 16384
#: Elements per loop iteration of a program (the vector width of one program).
BLOCK = 1024
#: Entries of the address-table cache (the gradients' addresses may change from step to step).
TABLE_CACHE = 16

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def runs_on(tensor: Tensor) -> bool:
    """Whether this kernel can take ``tensor``: contiguous, of a supported dtype, on CUDA (or on the CPU when
    Triton interprets)."""
    device_fits = tensor.device.type == "cuda" or (INTERPRETED and tensor.device.type == "cpu")
    return device_fits and tensor.dtype in DTYPES and tensor.is_contiguous()


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _where_am_i(table_ptr, n_tensors, CHUNK: tl.constexpr):
    """This program's tensor, the first element of its chunk and the end of that chunk in the tensor.

    The table holds, in order: ``n`` numels, ``n_chunks`` chunk-to-tensor indices, ``n_chunks`` chunk starts,
    ``n + 1`` first-chunk indices, then the address columns, ``n`` each."""
    chunk = tl.program_id(0)
    n_chunks = tl.num_programs(0)
    tensor = tl.load(table_ptr + n_tensors + chunk)
    start = tl.multiple_of(tl.load(table_ptr + n_tensors + n_chunks + chunk), CHUNK)
    end = tl.minimum(start + CHUNK, tl.load(table_ptr + tensor))
    return chunk, tensor, start, end


@triton.jit
def _address(table_ptr, n_tensors, column, tensor, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    n_chunks = tl.num_programs(0)
    base = 2 * n_tensors + 2 * n_chunks + 1
    pointer = tl.load(table_ptr + base + column * n_tensors + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of the table is a multiple of 16 bytes: 16-byte vector loads and stores
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in ``DTYPE``, rounded to nearest even as torch rounds. bf16 is rounded on the bits: Triton's
    interpreter truncates in its cast, which would make the interpreted kernel disagree with the compiled one."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (a constexpr against a dtype)
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, bits >> 16, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _lamb_direction(m, v, p, inv_bc1, inv_bc2, eps, decay, EPS_INSIDE_ROOT: tl.constexpr):
    if EPS_INSIDE_ROOT:
        root = tl.sqrt(v * inv_bc2 + eps)
    else:
        root = tl.sqrt(v * inv_bc2) + eps
    return (m * inv_bc1) / root + decay * p


@triton.jit
def _load(pointers, inside, MASKED: tl.constexpr, other: tl.constexpr = 0.0):
    # Unmasked accesses in whole chunks: a mask with an arbitrary bound keeps the compiler from vectorising.
    if MASKED:
        return tl.load(pointers, mask=inside, other=other)
    else:
        return tl.load(pointers)


@triton.jit
def _store(pointers, values, inside, MASKED: tl.constexpr):
    if MASKED:
        tl.store(pointers, values, mask=inside)
    else:
        tl.store(pointers, values)


@triton.jit
def _lamb_moments_chunk(
    weights,
    grads,
    exp_avgs,
    exp_avg_sqs,
    start,
    end,
    inv_bc1,
    inv_bc2,
    grad_scale,
    beta1,
    beta2,
    grad_weight,
    square_weight,
    l2_decay,
    decay,
    eps,
    EPS_INSIDE_ROOT: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    param_squares = tl.zeros([BLOCK], dtype=tl.float32)
    update_squares = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < end
        p = _load(weights + index, inside, MASKED).to(tl.float32)
        g = _load(grads + index, inside, MASKED).to(tl.float32) * grad_scale + l2_decay * p
        m = beta1 * _load(exp_avgs + index, inside, MASKED) + grad_weight * g
        v = beta2 * _load(exp_avg_sqs + index, inside, MASKED) + square_weight * g * g
        _store(exp_avgs + index, m, inside, MASKED)
        _store(exp_avg_sqs + index, v, inside, MASKED)
        u = _lamb_direction(m, v, p, inv_bc1, inv_bc2, eps, decay, EPS_INSIDE_ROOT)
        param_squares += p * p
        if MASKED:
            u = tl.where(inside, u, 0.0)  # 0/0 in the padding when ε = 0
        update_squares += u * u
    return tl.sum(param_squares, axis=0), tl.sum(update_squares, axis=0)


@triton.jit
def _lamb_moments_kernel(
    table_ptr,
    n_tensors,
    bc1_ptr,
    bc2_ptr,
    divisor_ptr,
    partial_ptr,
    beta1,
    beta2,
    grad_weight,
    square_weight,
    l2_decay,
    decay,
    eps,
    EPS_INSIDE_ROOT: tl.constexpr,
    WEIGHT: tl.constexpr,
    GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk, tensor, start, end = _where_am_i(table_ptr, n_tensors, CHUNK)
    weights = _address(table_ptr, n_tensors, 0, tensor, WEIGHT, ALIGNED)
    grads = _address(table_ptr, n_tensors, 1, tensor, GRAD, ALIGNED)
    exp_avgs = _address(table_ptr, n_tensors, 2, tensor, tl.float32, ALIGNED)
    exp_avg_sqs = _address(table_ptr, n_tensors, 3, tensor, tl.float32, ALIGNED)
    inv_bc1 = 1.0 / tl.load(bc1_ptr + tensor)
    inv_bc2 = 1.0 / tl.load(bc2_ptr + tensor)
    grad_scale = 1.0 / tl.load(divisor_ptr)
    arguments = (
        weights,
        grads,
        exp_avgs,
        exp_avg_sqs,
        start,
        end,
        inv_bc1,
        inv_bc2,
        grad_scale,
        beta1,
        beta2,
        grad_weight,
        square_weight,
        l2_decay,
        decay,
        eps,
    )
    if end - start == CHUNK:
        param_squares, update_squares = _lamb_moments_chunk(*arguments, EPS_INSIDE_ROOT, False, CHUNK, BLOCK)
    else:
        param_squares, update_squares = _lamb_moments_chunk(*arguments, EPS_INSIDE_ROOT, True, CHUNK, BLOCK)
    tl.store(partial_ptr + 2 * chunk, param_squares)
    tl.store(partial_ptr + 2 * chunk + 1, update_squares)


@triton.jit
def _lamb_apply_chunk(
    weights,
    exp_avgs,
    exp_avg_sqs,
    copies,
    start,
    end,
    inv_bc1,
    inv_bc2,
    step,
    decay,
    eps,
    EPS_INSIDE_ROOT: tl.constexpr,
    WEIGHT: tl.constexpr,
    COPY: tl.constexpr,
    HAS_COPY: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for offset in range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < end
        p = _load(weights + index, inside, MASKED).to(tl.float32)
        m = _load(exp_avgs + index, inside, MASKED)
        v = _load(exp_avg_sqs + index, inside, MASKED, 1.0)
        p = p - step * _lamb_direction(m, v, p, inv_bc1, inv_bc2, eps, decay, EPS_INSIDE_ROOT)
        _store(weights + index, _rounded(p, WEIGHT), inside, MASKED)
        if HAS_COPY:
            _store(copies + index, _rounded(p, COPY), inside, MASKED)


@triton.jit
def _lamb_apply_kernel(
    table_ptr,
    n_tensors,
    bc1_ptr,
    bc2_ptr,
    step_ptr,
    decay,
    eps,
    EPS_INSIDE_ROOT: tl.constexpr,
    WEIGHT: tl.constexpr,
    COPY: tl.constexpr,
    HAS_COPY: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, tensor, start, end = _where_am_i(table_ptr, n_tensors, CHUNK)
    weights = _address(table_ptr, n_tensors, 0, tensor, WEIGHT, ALIGNED)
    exp_avgs = _address(table_ptr, n_tensors, 1, tensor, tl.float32, ALIGNED)
    exp_avg_sqs = _address(table_ptr, n_tensors, 2, tensor, tl.float32, ALIGNED)
    copies = _address(table_ptr, n_tensors, 3 if HAS_COPY else 0, tensor, COPY, ALIGNED)
    inv_bc1 = 1.0 / tl.load(bc1_ptr + tensor)
    inv_bc2 = 1.0 / tl.load(bc2_ptr + tensor)
    step = tl.load(step_ptr + tensor)
    arguments = (weights, exp_avgs, exp_avg_sqs, copies, start, end, inv_bc1, inv_bc2, step, decay, eps)
    if end - start == CHUNK:
        _lamb_apply_chunk(*arguments, EPS_INSIDE_ROOT, WEIGHT, COPY, HAS_COPY, False, CHUNK, BLOCK)
    else:
        _lamb_apply_chunk(*arguments, EPS_INSIDE_ROOT, WEIGHT, COPY, HAS_COPY, True, CHUNK, BLOCK)


@triton.jit
def _lars_squares_chunk(
    weights, grads, start, end, decay, MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    param_squares = tl.zeros([BLOCK], dtype=tl.float32)
    direction_squares = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < end
        p = _load(weights + index, inside, MASKED).to(tl.float32)
        d = _load(grads + index, inside, MASKED).to(tl.float32) + decay * p
        param_squares += p * p
        direction_squares += d * d
    return tl.sum(param_squares, axis=0), tl.sum(direction_squares, axis=0)


@triton.jit
def _lars_squares_kernel(
    table_ptr,
    n_tensors,
    partial_ptr,
    decay,
    WEIGHT: tl.constexpr,
    GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk, tensor, start, end = _where_am_i(table_ptr, n_tensors, CHUNK)
    weights = _address(table_ptr, n_tensors, 0, tensor, WEIGHT, ALIGNED)
    grads = _address(table_ptr, n_tensors, 1, tensor, GRAD, ALIGNED)
    if end - start == CHUNK:
        param_squares, direction_squares = _lars_squares_chunk(weights, grads, start, end, decay, False, CHUNK, BLOCK)
    else:
        param_squares, direction_squares = _lars_squares_chunk(weights, grads, start, end, decay, True, CHUNK, BLOCK)
    tl.store(partial_ptr + 2 * chunk, param_squares)
    tl.store(partial_ptr + 2 * chunk + 1, direction_squares)


@triton.jit
def _lars_apply_chunk(
    weights,
    grads,
    buffers,
    copies,
    start,
    end,
    decay,
    into,
    out,
    momentum,
    WEIGHT: tl.constexpr,
    COPY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_COPY: tl.constexpr,
    MASKED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for offset in range(0, CHUNK, BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        inside = index < end
        p = _load(weights + index, inside, MASKED).to(tl.float32)
        d = _load(grads + index, inside, MASKED).to(tl.float32) + decay * p
        if HAS_MOMENTUM:
            buffer = momentum * _load(buffers + index, inside, MASKED) + into * d
            _store(buffers + index, buffer, inside, MASKED)
            if NESTEROV:
                step = into * d + momentum * buffer
            else:
                step = buffer
        else:
            step = into * d
        p = p - out * step
        _store(weights + index, _rounded(p, WEIGHT), inside, MASKED)
        if HAS_COPY:
            _store(copies + index, _rounded(p, COPY), inside, MASKED)


@triton.jit
def _lars_apply_kernel(
    table_ptr,
    n_tensors,
    decay_ptr,
    into_ptr,
    out_ptr,
    momentum,
    WEIGHT: tl.constexpr,
    GRAD: tl.constexpr,
    COPY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_COPY: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, tensor, start, end = _where_am_i(table_ptr, n_tensors, CHUNK)
    weights = _address(table_ptr, n_tensors, 0, tensor, WEIGHT, ALIGNED)
    grads = _address(table_ptr, n_tensors, 1, tensor, GRAD, ALIGNED)
    buffers = _address(table_ptr, n_tensors, 2, tensor, tl.float32, ALIGNED)
    copies = _address(table_ptr, n_tensors, 3 if HAS_COPY else 0, tensor, COPY, ALIGNED)
    decay = tl.load(decay_ptr + tensor)
    into = tl.load(into_ptr + tensor)
    out = tl.load(out_ptr + tensor)
    arguments = (weights, grads, buffers, copies, start, end, decay, into, out, momentum)
    if end - start == CHUNK:
        _lars_apply_chunk(*arguments, WEIGHT, COPY, HAS_MOMENTUM, NESTEROV, HAS_COPY, False, CHUNK, BLOCK)
    else:
        _lars_apply_chunk(*arguments, WEIGHT, COPY, HAS_MOMENTUM, NESTEROV, HAS_COPY, True, CHUNK, BLOCK)


@triton.jit
def _sum_per_tensor_kernel(table_ptr, n_tensors, n_chunks, partial_ptr, out_ptr, BLOCK: tl.constexpr):
    """Per tensor (one program each), the sums of its chunks' two partial squares, in a fixed order."""
    tensor = tl.program_id(0)
    firsts = table_ptr + n_tensors + 2 * n_chunks
    first = tl.load(firsts + tensor)
    last = tl.load(firsts + tensor + 1)
    for column in tl.static_range(2):
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for begin in range(first, last, BLOCK):
            index = begin + tl.arange(0, BLOCK)
            total += tl.load(partial_ptr + 2 * index + column, mask=index < last, other=0.0)
        tl.store(out_ptr + 2 * tensor + column, tl.sum(total, axis=0))


# ------------------------------------------------------------------------------------------------ tables
class _Table:
    """One launch's int64 table on the tensors' device, and the numbers its launches need."""

    def __init__(self, columns: Sequence[Sequence[Tensor]], chunk: int) -> None:
        tensors = columns[0]
        numels = [t.numel() for t in tensors]
        chunk_tensor, chunk_start, firsts = [], [], [0]
        for index, numel in enumerate(numels):
            starts = range(0, numel, chunk)
            chunk_tensor += [index] * len(starts)
            chunk_start += starts
            firsts.append(len(chunk_tensor))
        addresses = [t.data_ptr() for column in columns for t in column]
        device = tensors[0].device
        host = torch.tensor(
            numels + chunk_tensor + chunk_start + firsts + addresses,
            dtype=torch.int64,
            pin_memory=device.type == "cuda",
        )
        self.values = host.to(device, non_blocking=True)
        self.aligned = all(address % 16 == 0 for address in addresses)
        self.n_tensors = len(tensors)
        self.n_chunks = len(chunk_tensor)


_tables: OrderedDict[tuple, _Table] = OrderedDict()


def _table(columns: Sequence[Sequence[Tensor]], chunk: int) -> _Table:
    """The table of these tensors, from a small cache keyed by what it holds (built afresh when a gradient has
    moved; building copies it to the device without waiting)."""
    key = (chunk, tuple((t.data_ptr(), t.numel()) for column in columns for t in column))
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _Table(columns, chunk)
        if len(_tables) > TABLE_CACHE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return table


def _sums(table: _Table, partial: Tensor) -> Tensor:
    squares = torch.empty((table.n_tensors, 2), dtype=torch.float32, device=partial.device)
    _sum_per_tensor_kernel[(table.n_tensors,)](
        table.values, table.n_tensors, table.n_chunks, partial, squares, BLOCK=256
    )
    return squares


def _dtype(tensors: Sequence[Tensor]) -> tl.dtype:
    return DTYPES[tensors[0].dtype]


def _vector(values: Tensor, count: int, device: torch.device) -> Tensor:
    return values.to(device=device, dtype=torch.float32).reshape(-1).expand(count).contiguous()


# ------------------------------------------------------------------------------------------------ LAMB
def moments_and_squared_norms(
    weights: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bc1: Tensor,
    bc2: Tensor,
    grad_divisor: Tensor,
    beta1: float,
    beta2: float,
    grad_weight: float,
    eps: float,
    l2_decay: float,
    decoupled_decay: float,
    eps_inside_root: bool,
) -> Tensor:
    """LAMB pass 1 (same arguments as the CPU kernel's): moments in place; an ``(n, 2)`` fp32 tensor of
    ``‖p‖²`` and ``‖u‖²`` per tensor, on the tensors' device."""
    device = weights[0].device
    table = _table((weights, grads, exp_avgs, exp_avg_sqs), CHUNK)
    partial = torch.empty((table.n_chunks, 2), dtype=torch.float32, device=device)
    _lamb_moments_kernel[(table.n_chunks,)](
        table.values,
        table.n_tensors,
        _vector(bc1, table.n_tensors, device),
        _vector(bc2, table.n_tensors, device),
        _vector(grad_divisor, 1, device),
        partial,
        beta1,
        beta2,
        grad_weight,
        1.0 - beta2,
        l2_decay,
        decoupled_decay,
        eps,
        EPS_INSIDE_ROOT=eps_inside_root,
        WEIGHT=_dtype(weights),
        GRAD=_dtype(grads),
        ALIGNED=table.aligned,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
    )
    return _sums(table, partial)


def apply_updates(
    weights: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bc1: Tensor,
    bc2: Tensor,
    steps: Tensor,
    eps: float,
    decoupled_decay: float,
    eps_inside_root: bool,
    copies: list[Tensor] | None = None,
) -> None:
    """LAMB pass 2: ``p -= steps[t]·u``, u recomputed from the moments pass 1 left; with ``copies`` (the
    fp16/bf16 parameters of fp32 master ``weights``) also writes the rounded result there."""
    device = weights[0].device
    columns = (weights, exp_avgs, exp_avg_sqs) + ((copies,) if copies else ())
    table = _table(columns, CHUNK)
    _lamb_apply_kernel[(table.n_chunks,)](
        table.values,
        table.n_tensors,
        _vector(bc1, table.n_tensors, device),
        _vector(bc2, table.n_tensors, device),
        _vector(steps, table.n_tensors, device),
        decoupled_decay,
        eps,
        EPS_INSIDE_ROOT=eps_inside_root,
        WEIGHT=_dtype(weights),
        COPY=_dtype(copies) if copies else tl.float32,
        HAS_COPY=bool(copies),
        ALIGNED=table.aligned,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
    )


# ------------------------------------------------------------------------------------------------ LARS
def lars_squared_norms(weights: list[Tensor], grads: list[Tensor], decay: float) -> Tensor:
    """LARS pass 1: an ``(n, 2)`` fp32 tensor of ``‖p‖²`` and ``‖g + decay·p‖²`` per tensor."""
    table = _table((weights, grads), CHUNK)
    partial = torch.empty((table.n_chunks, 2), dtype=torch.float32, device=weights[0].device)
    _lars_squares_kernel[(table.n_chunks,)](
        table.values,
        table.n_tensors,
        partial,
        decay,
        WEIGHT=_dtype(weights),
        GRAD=_dtype(grads),
        ALIGNED=table.aligned,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
    )
    return _sums(table, partial)


def lars_apply_updates(
    weights: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor] | None,
    decays: Tensor,
    into: Tensor,
    out: Tensor,
    momentum: float,
    nesterov: bool,
    copies: list[Tensor] | None = None,
) -> None:
    """LARS pass 2, per tensor t with ``d = g + decays[t]·p``: ``buf ← μ·buf + into[t]·d`` and
    ``p -= out[t]·buf`` (Nesterov: ``p -= out[t]·(into[t]·d + μ·buf)``); without ``buffers``
    ``p -= out[t]·into[t]·d``. ``decays``, ``into`` and ``out`` are device vectors (or one-element tensors)."""
    device = weights[0].device
    has_momentum = buffers is not None
    columns = [weights, grads, buffers if has_momentum else weights]
    if copies:
        columns.append(copies)
    table = _table(columns, CHUNK)
    n = table.n_tensors
    _lars_apply_kernel[(table.n_chunks,)](
        table.values,
        n,
        _vector(decays, n, device),
        _vector(into, n, device),
        _vector(out, n, device),
        momentum,
        WEIGHT=_dtype(weights),
        GRAD=_dtype(grads),
        COPY=_dtype(copies) if copies else tl.float32,
        HAS_MOMENTUM=has_momentum,
        NESTEROV=nesterov,
        HAS_COPY=bool(copies),
        ALIGNED=table.aligned,
        CHUNK=CHUNK,
        BLOCK=BLOCK,
    )
