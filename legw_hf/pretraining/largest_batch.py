"""The largest per-device micro-batch that fits (Popel & Bojar: use the largest batch that fits, with headroom).

The search tries the micro-batches that divide the per-process share of the global batch, smallest first, each with
one forward and backward pass on a batch of full-length sequences (the longest a batch can be), and stops at the
first that does not fit. A micro-batch fits when the pass raises no out-of-memory error and its peak memory stays
within ``1 - margin`` of the device's: on a GPU the allocator's peak (``torch.cuda.max_memory_allocated``) against
the device's memory; on a CPU the process's peak resident size (``getrusage``), which only grows, so the ascending
search reads each pass's peak, against the machine's memory (or its cgroup limit). Gradient accumulation then makes
up the rest of the global batch.
"""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SettingError


@dataclass(frozen=True)
class MicroBatchFit:
    micro_batch: int
    accumulation: int
    peak_bytes: int
    limit_bytes: int
    tried: tuple[int, ...]

    def describe(self) -> str:
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.accumulation}, peak {self.peak_bytes / 2**30:.2f} "
            f"of {self.limit_bytes / 2**30:.2f} GiB allowed; tried {', '.join(map(str, self.tried))}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_fitting(candidates: list[int], fits: Callable[[int], tuple[bool, int]]) -> tuple[int, int, list[int]]:
    """(largest candidate that fits, its peak bytes, candidates tried), trying in ascending order until one fails."""
    best, best_peak, tried = 0, 0, []
    for candidate in sorted(candidates):
        tried.append(candidate)
        ok, peak = fits(candidate)
        if not ok:
            break
        best, best_peak = candidate, peak
    return best, best_peak, tried


def memory_limit(device: torch.device, margin: float) -> int:
    """Bytes a step may peak at: ``1 - margin`` of the device's memory."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cgroup = Path("/sys/fs/cgroup/memory.max")
        if cgroup.is_file() and cgroup.read_text().strip().isdigit():
            total = min(total, int(cgroup.read_text()))
    return int(total * (1 - margin))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error) or "can't allocate" in str(error)


def step_peak(model: torch.nn.Module, micro_batch: int, seq_len: int, vocab_size: int, device: torch.device) -> int:
    """Peak bytes of one forward and backward pass on ``micro_batch`` random full-length sequences (15% predicted)."""
    generator = torch.Generator().manual_seed(micro_batch)
    ids = torch.randint(5, vocab_size, (micro_batch, seq_len), generator=generator)
    labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
    loss.backward()
    del loss
    model.zero_grad(set_to_none=False)  # gradients stay allocated, as they are during training
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fit_micro_batch(
    make_model: Callable[[], torch.nn.Module],
    *,
    seq_len: int,
    vocab_size: int,
    per_process_batch: int,
    device: torch.device,
    margin: float,
    field: str = "global_batch_size",
    limit_bytes: int | None = None,
) -> MicroBatchFit:
    """The largest micro-batch dividing ``per_process_batch`` whose training pass fits in ``limit_bytes`` (default:
    :func:`memory_limit` with ``margin``). Raises :class:`SettingError` naming ``field`` when not even 1 fits."""
    limit = memory_limit(device, margin) if limit_bytes is None else limit_bytes
    model = make_model().to(device).train()

    def fits(micro_batch: int) -> tuple[bool, int]:
        try:
            peak = step_peak(model, micro_batch, seq_len, vocab_size, device)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not _is_out_of_memory(error):
                raise
            return False, 0
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return peak <= limit, peak

    best, peak, tried = largest_fitting(divisors(per_process_batch), fits)
    gc.collect()
    if best == 0:
        raise SettingError(
            field,
            f"cannot be reached: not even a micro-batch of 1 sequence of {seq_len} tokens fits in "
            f"{limit / 2**30:.2f} GiB on {device}",
            per_process_batch,
        )
    return MicroBatchFit(best, per_process_batch // best, peak, limit, tuple(tried))
