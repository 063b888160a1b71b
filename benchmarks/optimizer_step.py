"""Time one optimizer step on BERT-shaped parameter sets, next to torch's AdamW and SGD and torch-optimizer's Lamb.

Usage::

    python benchmarks/optimizer_step.py            # BERT-small and BERT-base, ~5 minutes on 2 cores
    python benchmarks/optimizer_step.py --quick    # BERT-small only, fewer steps

Parameter shapes come from ``transformers.BertForMaskedLM`` built on the meta device (tied embeddings counted
once). Every optimizer gets its own fp32 copy of the parameters and the same fixed gradients; a round times the
median of ``--steps`` calls to ``step()`` after ``--warmup`` calls (the first one creates the state), every
optimizer in turn, each right after a block of the fused AdamW baseline. The table shows each optimizer's median
round of ``--rounds`` with the fastest and slowest in brackets, and the median (and range) over rounds of its ratio
to the baseline block just before it, which keeps a busy neighbour process on a shared machine from deciding a
ratio.

Memory columns: bytes held in ``optimizer.state``; bytes of scratch a legw_hf optimizer keeps between steps
(``workspace_bytes``); and the peak of bytes allocated during one ``step()`` and alive at the same time (tracked
per storage with a dispatch mode, in a separate untimed step). The scratch a step needs is the larger of the last
two.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, median_and_range

from legw_hf import Lamb, Lars

MODELS = {
    "BERT-small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048},
    "BERT-base": {},
}

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def torch_optimizer_lamb(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    import torch_optimizer

    return torch_optimizer.Lamb(params, lr=1e-3, weight_decay=0.01)


class CompiledLamb(torch.optim.Optimizer):
    """LAMB (bias correction inside, decoupled decay, ratio ‖p‖/‖u‖) as one ``torch.compile``d function over the
    tensor lists: what a generated fused kernel reaches. Only for ``--compile``; compiling takes about a minute."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.compiled = torch.compile(self._lamb)

    @staticmethod
    def _lamb(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, decay):
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
            step += 1
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            u = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps) + decay * p
            p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
            ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
            p.sub_(lr * ratio * u)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        params = group["params"]
        for p in params:
            if not self.state[p]:
                self.state[p] = {
                    "step": torch.zeros(()),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
        states = [self.state[p] for p in params]
        self.compiled(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            group["lr"],
            *group["betas"],
            group["eps"],
            group["weight_decay"],
        )


# (name, factory, baseline the ratio is taken against)
OPTIMIZERS: list[tuple[str, Factory]] = [
    ("torch AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True)),
    ("torch AdamW foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True)),
    ("torch-optimizer Lamb", torch_optimizer_lamb),
    ("legw_hf Lamb (default: impl='cpu', two-pass CPU kernel)", lambda p: Lamb(p, lr=1e-3, weight_decay=0.01)),
    ("legw_hf Lamb preset=nvidia (impl='cpu')", lambda p: Lamb(p, lr=1e-3, preset="nvidia")),
    (
        "legw_hf Lamb impl='fused_adam' (torch fused Adam kernel)",
        lambda p: Lamb(p, lr=1e-3, weight_decay=0.01, impl="fused_adam"),
    ),
    (
        "legw_hf Lamb impl='fused_adam' keep_workspace=False",
        lambda p: Lamb(p, lr=1e-3, weight_decay=0.01, impl="fused_adam", keep_workspace=False),
    ),
    ("legw_hf Lamb impl='foreach' (_foreach_ ops)", lambda p: Lamb(p, lr=1e-3, weight_decay=0.01, impl="foreach")),
    ("legw_hf Lamb impl='reference'", lambda p: Lamb(p, lr=1e-3, weight_decay=0.01, impl="reference")),
    ("torch SGD momentum foreach", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)),
    ("legw_hf Lars (default: impl='foreach')", lambda p: Lars(p, lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("legw_hf Lars preset=optax (impl='foreach')", lambda p: Lars(p, lr=0.1, preset="optax", weight_decay=1e-4)),
    ("legw_hf Lars impl='reference'", lambda p: Lars(p, lr=0.1, momentum=0.9, weight_decay=1e-4, impl="reference")),
]


def bert_shapes(name: str) -> list[torch.Size]:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=30522, **MODELS[name])
    with torch.device("meta"):
        model = BertForMaskedLM(config)
    return [p.shape for p in model.parameters()]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and alive at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self._tracked:
                self._tracked.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._release, key, nbytes)
        return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def fresh_params(shapes: list[torch.Size], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator)) for shape in shapes]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    return params


def timed_block(optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Median milliseconds of ``steps`` calls to ``optimizer.step()``."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(
    factory: Factory, shapes: list[torch.Size], grads: list[torch.Tensor], warmup: int, steps: int, track_memory: bool
) -> dict[str, float]:
    params = fresh_params(shapes, grads)
    optimizer = factory(params)
    for _ in range(warmup):
        optimizer.step()
    result = {
        "ms": timed_block(optimizer, steps),
        "params": sum(p.nbytes for p in params),
        "state": state_bytes(optimizer),
        "kept": getattr(optimizer, "workspace_bytes", 0),
        "scratch": 0,
    }
    if track_memory:
        tracker = LiveBytes()
        with tracker:
            optimizer.step()
        result["scratch"] = tracker.peak
    del optimizer, params
    gc.collect()
    return result


def machine() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def memory(nbytes: float, params: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB ({nbytes / params:.2f}×)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="BERT-small only, 3 timed steps")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per optimizer (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state creation)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all optimizers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time a torch.compile'd LAMB step (its "
        "compilation, about a minute per model, is left out of the timing)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: run only matching optimizers (the fused AdamW baseline always runs)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = ["BERT-small"] if args.quick else list(MODELS)
    steps = 3 if args.quick else args.steps
    candidates = OPTIMIZERS + (
        [
            (
                "torch.compile'd LAMB (reference for a generated kernel)",
                lambda p: CompiledLamb(p, lr=1e-3, weight_decay=0.01),
            )
        ]
        if args.compile
        else []
    )
    selected = [
        (n, f)
        for n, f in candidates
        if n == OPTIMIZERS[0][0] or not args.only or any(part in n for part in args.only.split(","))
    ]

    command = " ".join(["python benchmarks/optimizer_step.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"# Optimizer step benchmark\n\n- machine: {machine()}\n- date: {datetime.date.today()}\n"
        f"- torch {torch.__version__}, Python {platform.python_version()}\n"
        f"- command: `{command}`"
        f"\n- fp32; ms/step: median over {args.rounds} rounds (min–max in brackets), each round the median of {steps} "
        f"steps after {args.warmup} warm-up steps; × fused AdamW: median (min–max) over the rounds of the ratio to a "
        "fused-AdamW block timed just before\n"
    )
    for model in models:
        shapes = bert_shapes(model)
        generator = torch.Generator().manual_seed(1)
        grads = [1e-3 * torch.randn(shape, generator=generator) for shape in shapes]
        count = sum(s.numel() for s in shapes)
        print(
            f"## {model}: {count / 1e6:.1f}M parameters in {len(shapes)} tensors ({4 * count / 2**20:,.0f} MiB "
            "fp32)\n\nMemory as MiB (× parameter bytes).\n"
        )
        print("| optimizer | ms/step | × fused AdamW | state | workspace kept | peak allocated in step |")
        print("|---|---:|---:|---:|---:|---:|")
        # The fused AdamW baseline stays alive and runs a block right before every other optimizer's block, so
        # each ratio compares two measurements taken under the same machine load.
        baseline_name, baseline_factory = selected[0]
        baseline = baseline_factory(fresh_params(shapes, grads))
        for _ in range(args.warmup):
            baseline.step()
        baseline_blocks: list[float] = []
        results: dict[str, dict[str, float]] = {}  # memory, from the first round
        times: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            for name, factory in selected[1:]:
                baseline_blocks.append(timed_block(baseline, steps))
                result = measure(factory, shapes, grads, args.warmup, steps, track_memory=round_index == 0)
                times.setdefault(name, []).append(result["ms"])
                ratios.setdefault(name, []).append(result["ms"] / baseline_blocks[-1])
                results.setdefault(name, result)
        params_bytes = sum(p.nbytes for p in baseline.param_groups[0]["params"])
        baseline_memory = {"state": state_bytes(baseline), "kept": 0, "scratch": 0}
        rows = [(baseline_name, median_and_range(baseline_blocks, ".1f"), "1.00", baseline_memory)]
        rows += [
            (name, median_and_range(times[name], ".1f"), median_and_range(ratios[name], ".2f"), results[name])
            for name in results
        ]
        del baseline
        gc.collect()
        for name, ms, ratio, result in rows:
            columns = [memory(result[key], params_bytes) for key in ("state", "kept", "scratch")]
            print(f"| {name} | {ms} | {ratio} | {' | '.join(columns)} |", flush=True)
        print()


if __name__ == "__main__":
    main()
