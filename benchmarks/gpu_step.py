"""GPU mode: the optimizer step on BERT-base and BERT-large shapes on CUDA, and an end-to-end Trainer step.

Usage::

    python benchmarks/gpu_step.py                    # on a CUDA machine: both parts, a few minutes
    python benchmarks/gpu_step.py --json out.json    # also write the numbers
    python benchmarks/gpu_step.py --smoke            # any machine: tiny shapes, 2 steps, checks the script only

Part 1, per model shape and parameter dtype (fp32; bf16 with fp32 masters and fp32 state for legw_hf), every
optimizer gets its own parameters and the same fixed gradients, a block of steps of torch's fused AdamW is timed
right before each one, and the table shows milliseconds per step (CUDA events, median over the block), the ratio to
that AdamW block, the state bytes and the peak of extra memory allocated during a step. Peers: torch AdamW fused,
legw_hf Lamb on the Triton kernels (``impl="triton"``) and on torch ops (``impl=None``, the automatic choice: torch's
fused Adam kernel for fp32, ``_foreach_`` ops with masters), legw_hf Lars both ways,
DeepSpeed ``FusedLamb`` where its CUDA extension builds, apex ``FusedLAMB`` where apex is installed. A peer that
cannot run says why in its row.

Part 2: ``LegwTrainer`` with LEGW + LAMB (preset nvidia, ``--legw_optimizer_impl triton``) against ``Trainer`` with its
fused AdamW, on a BERT-base-sized masked LM from a config (random tokens, bf16 autocast), median step time between
``on_step_end`` callbacks after a warm-up.

With ``--smoke`` on a machine without CUDA, the kernels run in Triton's interpreter (set ``TRITON_INTERPRET=1``
before starting Python; the script does it when it can), and the timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model
from optimizer_step import state_bytes

from legw_hf import Lamb, Lars

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def model_config(size: str):
    """BERT-base or -large as the main job builds them (vocabulary 30522), or ``"smoke"``: a 1-layer, 32-wide BERT
    small enough for Triton's interpreter."""
    from transformers import BertConfig

    from legw_hf.pretraining.model import bert_config

    if size == "smoke":
        return BertConfig(
            vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    return bert_config(size, vocab_size=30522, pad_token_id=0)


#: Parameters of the smoke model an optimizer table steps: its embeddings and first attention projection (matrices
#: and vectors both), few enough that Triton's interpreter takes seconds, not minutes, per table.
SMOKE_PARAMETERS = 6


def bert_shapes(size: str) -> list[torch.Size]:
    from transformers import BertForMaskedLM

    with torch.device("meta"):
        model = BertForMaskedLM(model_config(size))
    shapes = [p.shape for p in model.parameters()]
    return shapes[:SMOKE_PARAMETERS] if size == "smoke" else shapes


def deepspeed_fused_lamb(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from deepspeed.ops.lamb import FusedLamb

    return FusedLamb(params, lr=1e-3, weight_decay=0.01)


def apex_fused_lamb(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from apex.optimizers import FusedLAMB

    return FusedLAMB(params, lr=1e-3, weight_decay=0.01)


def peers(masters: bool) -> list[tuple[str, Factory]]:
    """The optimizers of one table. With ``masters`` the parameters are bf16: legw_hf keeps fp32 masters and state;
    torch's fused AdamW runs on the bf16 parameters with bf16 state, the cheapest peer there is."""
    rows: list[tuple[str, Factory]] = [
        ("torch AdamW fused", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=True)),
        ("legw_hf Lamb impl='triton'", lambda p: Lamb(p, lr=1e-3, impl="triton", master_weights=masters)),
        (
            "legw_hf Lamb preset=nvidia impl='triton'",
            lambda p: Lamb(p, lr=1e-3, preset="nvidia", impl="triton", master_weights=masters),
        ),
        ("legw_hf Lamb impl=None (torch ops)", lambda p: Lamb(p, lr=1e-3, master_weights=masters)),
        (
            "legw_hf Lars impl='triton'",
            lambda p: Lars(p, lr=0.1, weight_decay=1e-4, impl="triton", master_weights=masters),
        ),
        ("legw_hf Lars (torch ops)", lambda p: Lars(p, lr=0.1, weight_decay=1e-4, master_weights=masters)),
    ]
    if not masters:  # neither reference takes bf16 parameters with fp32 masters
        rows += [("DeepSpeed FusedLamb", deepspeed_fused_lamb), ("apex FusedLAMB", apex_fused_lamb)]
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    """Median milliseconds of ``steps`` calls to ``step()``, each timed on the device."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            optimizer.step()
            times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def measure(
    factory: Factory, shapes: list[torch.Size], dtype: torch.dtype, device: torch.device, warmup: int, steps: int
) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter((0.02 * torch.randn(shape, generator=generator)).to(device, dtype))
        param.grad = (1e-3 * torch.randn(shape, generator=generator)).to(device, dtype)
        params.append(param)
    optimizer = factory(params)
    for _ in range(warmup):
        optimizer.step()
    synchronize(device)
    result = {"ms": timed_steps(optimizer, steps, device)}
    result["state_bytes"] = state_bytes(optimizer)
    result["param_bytes"] = sum(p.nbytes for p in params)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        optimizer.step()
        synchronize(device)
        result["step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    del optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def optimizer_tables(args: argparse.Namespace, device: torch.device) -> list[dict]:
    sizes = ["smoke"] if args.smoke else ["base", "large"]
    tables = []
    for size in sizes:
        shapes = bert_shapes(size)
        for dtype in (torch.float32, torch.bfloat16):
            rows = []
            for name, factory in peers(masters=dtype == torch.bfloat16):
                try:
                    baseline = measure(peers(False)[0][1], shapes, dtype, device, args.warmup, args.steps)
                    numbers = measure(factory, shapes, dtype, device, args.warmup, args.steps)
                except Exception as error:  # a reference that does not build or run here says why
                    rows.append({"optimizer": name, "not_run": f"{type(error).__name__}: {str(error)[:160]}"})
                    continue
                rows.append({"optimizer": name, **numbers, "x_adamw": numbers["ms"] / baseline["ms"]})
            tables.append({"model": f"BERT-{size}", "dtype": str(dtype).removeprefix("torch."), "rows": rows})
    return tables


def trainer_step(args: argparse.Namespace, device: torch.device) -> dict:
    """Median ms per Trainer step: Trainer + fused AdamW against LegwTrainer + LEGW + LAMB on the Triton kernels."""
    from transformers import BertForMaskedLM, Trainer, TrainerCallback, TrainingArguments

    from legw_hf import LegwTrainer, LegwTrainingArguments

    size, batch, seq = ("smoke", 4, 16) if args.smoke else ("base", args.batch, args.seq_len)
    steps = 4 if args.smoke else args.trainer_steps
    generator = torch.Generator().manual_seed(0)
    config = model_config(size)
    tokens = torch.randint(5, config.vocab_size, (batch * steps, seq), generator=generator)
    data = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t} for t in tokens]

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, *_args, **_kwargs):
            synchronize(device)
            self.times.append(time.perf_counter())

    results = {}
    common = dict(
        per_device_train_batch_size=batch,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        dataloader_num_workers=0,
    )
    for name in ("trainer_adamw", "legw_lamb_triton"):
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
        timer = StepTimes()
        with tempfile.TemporaryDirectory() as output:
            if name == "trainer_adamw":
                training = TrainingArguments(output, learning_rate=1e-4, optim="adamw_torch_fused", **common)
                trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[timer])
            else:
                training = LegwTrainingArguments(
                    output,
                    learning_rate=1e-4,
                    legw_base_batch_size=batch,
                    legw_base_warmup_epochs=0.1,
                    legw_optimizer="lamb",
                    legw_optimizer_preset="nvidia",
                    legw_optimizer_impl="triton",
                    **common,
                )
                trainer = LegwTrainer(model=model, args=training, train_dataset=data, callbacks=[timer])
            trainer.train()
        gaps = [1e3 * (b - a) for a, b in zip(timer.times, timer.times[1:], strict=False)]
        results[name] = statistics.median(gaps[args.trainer_warmup :] if not args.smoke else gaps)
        del trainer, model
        gc.collect()
    results["ratio"] = results["legw_lamb_triton"] / results["trainer_adamw"]
    results.update(model=f"BERT-{size}", batch=batch, seq_len=seq)
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} (no CUDA: Triton interpreted, timings meaningless)"


def render(report: dict) -> str:
    lines = [
        f"- device: {report['device']}",
        f"- date: {report['date']}",
        f"- torch {report['torch']}, triton {report['triton']}, Python {report['python']}",
        "",
    ]
    for table in report["tables"]:
        lines += [
            f"### {table['model']}, {table['dtype']} parameters",
            "",
            "| optimizer | ms/step | × fused AdamW | state | step peak |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in table["rows"]:
            if "not_run" in row:
                lines.append(f"| {row['optimizer']} | not run: {row['not_run']} | | | |")
                continue
            peak = row.get("step_peak_bytes")
            state = f"{row['state_bytes'] / 2**20:,.0f} MiB ({row['state_bytes'] / row['param_bytes']:.2f}×)"
            peak_text = "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB"
            lines.append(f"| {row['optimizer']} | {row['ms']:.2f} | {row['x_adamw']:.2f} | {state} | {peak_text} |")
        lines.append("")
    step = report.get("trainer_step")
    if step:
        lines += [
            f"### Trainer step, {step['model']}, batch {step['batch']} × {step['seq_len']}",
            "",
            f"Trainer + fused AdamW {step['trainer_adamw']:.1f} ms, LegwTrainer + LEGW + LAMB (Triton) "
            f"{step['legw_lamb_triton']:.1f} ms: {step['ratio']:.3f}×",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (state, compiles)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--trainer-steps", type=int, default=30)
    parser.add_argument("--trainer-warmup", type=int, default=5)
    parser.add_argument("--no-trainer", action="store_true", help="skip part 2")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 steps, on any machine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "trainer_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.trainer_warmup < args.trainer_steps - 1:
        parser.error(f"--trainer-warmup must be in [0, {args.trainer_steps - 2}], got {args.trainer_warmup}")
    if args.smoke:
        args.steps, args.warmup = 1, 0  # one timed step; its first call creates the state
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke to check the script without one)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/gpu_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "tables": optimizer_tables(args, device),
    }
    if not args.no_trainer:
        report["trainer_step"] = trainer_step(args, device)
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
