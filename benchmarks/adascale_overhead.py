"""The cost of AdaScale's gradient statistics: time per optimizer update with and without them, in the same run.

Usage::

    python benchmarks/adascale_overhead.py            # BERT-mini MLM, ~2 minutes on 2 cores
    python benchmarks/adascale_overhead.py --quick    # fewer rounds

An update is ``--accumulation`` micro-batches of ``--micro-batch`` sequences of ``--seq-len`` tokens through
``BertForMaskedLM`` (forward, backward) and one optimizer step. Variants, each timed in turn within every round:

* ``plain``: AdamW, no statistics;
* ``statistics``: + :class:`legw_hf.GradientStatistics` (a hook per parameter per micro-batch, one fold per
  micro-batch, one reduction and one host read per update), as ``--legw_adascale diagnostics`` / ``gain`` run;
* ``preconditioned``: the same on Adam-preconditioned gradients (``sqrt_gain``).

A round times the median of ``--updates`` updates per variant; the table shows each variant's median round (with the
fastest and slowest) and the median (and range) over rounds of its ratio to the ``plain`` block timed just before it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, median_and_range

from legw_hf import GradientNoise, GradientStatistics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args()


def bert_mini() -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    return BertForMaskedLM(config)


class Variant:
    def __init__(self, name: str, args: argparse.Namespace, statistics_on: bool, preconditioned: bool) -> None:
        torch.manual_seed(0)
        self.name, self.args = name, args
        self.model = bert_mini()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.statistics = None
        if statistics_on:
            batch = args.micro_batch * args.accumulation
            noise = GradientNoise(micro_batch=args.micro_batch, base_batch=args.micro_batch, global_batch=batch)
            self.statistics = GradientStatistics(
                self.model.parameters(), noise, preconditioner=self.optimizer if preconditioned else None
            ).attach()
        generator = torch.Generator().manual_seed(1)
        shape = (args.accumulation, args.micro_batch, args.seq_len)
        self.ids = torch.randint(5, 8192, shape, generator=generator)
        self.labels = torch.where(torch.rand(shape, generator=generator) < 0.15, self.ids, -100)

    def update(self) -> None:
        for ids, labels in zip(self.ids, self.labels, strict=True):
            loss = self.model(input_ids=ids, labels=labels).loss / self.args.accumulation
            loss.backward()
            if self.statistics is not None:
                self.statistics.micro_step_done(1 / self.args.accumulation)
        if self.statistics is not None:
            self.statistics.update_done()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def time_block(self, updates: int) -> float:
        times = []
        for _ in range(updates):
            start = time.perf_counter()
            self.update()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def main() -> None:
    args = parse_args()
    if args.quick:
        args.rounds, args.updates = 3, 3
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    variants = [
        Variant("plain", args, False, False),
        Variant("statistics", args, True, False),
        Variant("preconditioned", args, True, True),
    ]
    for variant in variants:  # warm-up: optimizer state, allocator
        variant.update()
    times = {v.name: [] for v in variants}
    ratios = {v.name: [] for v in variants}
    for _ in range(args.rounds):
        times["plain"].append(variants[0].time_block(args.updates))
        ratios["plain"].append(1.0)
        for variant in variants[1:]:
            baseline = variants[0].time_block(args.updates)
            elapsed = variant.time_block(args.updates)
            times[variant.name].append(elapsed)
            ratios[variant.name].append(elapsed / baseline)
    parameters = sum(p.numel() for p in variants[0].model.parameters())
    tensors = sum(1 for _ in variants[0].model.parameters())
    print(f"- date: {datetime.date.today()}")
    print(f"- machine: {cpu_model()}, {torch.get_num_threads()} threads")
    print(f"- torch {torch.__version__}, Python {platform.python_version()}")
    print(
        f"- BERT-mini MLM, {parameters / 1e6:.1f}M parameters in {tensors} tensors; update = {args.accumulation} x "
        f"{args.micro_batch} sequences of {args.seq_len} tokens + AdamW step"
    )
    print()
    print(f"| variant | ms/update, median (min–max) of {args.rounds} rounds | × plain, median (min–max) |")
    print("|---|---:|---:|")
    for variant in variants:
        ms = median_and_range([t * 1e3 for t in times[variant.name]], ".1f")
        print(f"| {variant.name} | {ms} | {median_and_range(ratios[variant.name], '.3f')} |")


if __name__ == "__main__":
    main()
