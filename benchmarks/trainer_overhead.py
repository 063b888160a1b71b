"""End-to-end cost of the plugin in a Trainer run: LEGW + LAMB against Trainer's own AdamW and schedule.

Usage::

    python benchmarks/trainer_overhead.py            # BERT-tiny MLM, ~3 minutes on 2 cores
    python benchmarks/trainer_overhead.py --quick    # fewer rounds and steps

Three Trainer runs on the same model, data and batch, timed in turn within every round:

* ``trainer_adamw``: ``transformers.Trainer`` with its default optimizer (fused AdamW) and a linear schedule;
* ``trainer_lamb``: ``transformers.Trainer`` given legw_hf's ``Lamb`` (preset nvidia) and transformers' linear
  schedule through ``optimizers=``: LAMB's math, none of the plugin. LAMB normalises by the global gradient norm
  itself, so Trainer's clipping is off (``max_grad_norm=0``), as ``LegwTrainer`` turns it off for this preset;
* ``legw_lamb``: ``LegwTrainer`` with ``--legw_optimizer lamb --legw_optimizer_preset nvidia`` and the LEGW plan:
  the whole plugin (plan, scheduler, callback with its trust-ratio log, argument handling).

A step's time is the interval between consecutive ``on_step_end`` callbacks (forward, backward, clipping, optimizer
step, scheduler, callbacks), the median over the steps after ``--warmup-steps``; a round's ratios are taken against
the ``trainer_adamw`` run of the same round (each round starts with another variant), and the table shows the
median over rounds. The two parts: LAMB's math
is ``trainer_lamb / trainer_adamw``, the plugin beyond it ``legw_lamb / trainer_lamb``. Run-to-run noise on a shared
machine is several percent, more than the plugin costs, so the ``legw_lamb`` runs also time the plugin's own per-step
code (its callback's step and log hooks and the LEGW scheduler's step) directly: its share of the step is the
plugin's cost that timing the whole step cannot resolve.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model, median_and_range

VARIANTS = ("trainer_adamw", "trainer_lamb", "legw_lamb")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="sequences per update")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="updates per run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="updates left out of the timing")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 12 steps")
    parser.add_argument(
        "--smoke", action="store_true", help="1 round of 4 tiny steps: checks the script, times nothing"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_steps = 2, 12, 3
    if args.smoke:
        args.rounds, args.steps, args.warmup_steps, args.batch, args.seq_len = 1, 4, 0, 4, 16
    for name in ("batch", "seq_len", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_steps < args.steps - 1:
        parser.error(f"--warmup-steps must be in [0, --steps - 2] = [0, {args.steps - 2}], got {args.warmup_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import BertForMaskedLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from legw_hf import Lamb, LegwCallback, LegwTrainer, LegwTrainingArguments, decay_param_groups
    from legw_hf.pretraining.model import bert_config

    hf_logging.set_verbosity_error()
    config = bert_config("tiny", vocab_size=4096, pad_token_id=0)
    generator = torch.Generator().manual_seed(0)
    sequences = args.batch * args.steps
    ids = torch.randint(5, 4096, (sequences, args.seq_len), generator=generator)
    labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)

    class Sequences(torch.utils.data.Dataset):
        def __len__(self):
            return sequences

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, *_args, **_kwargs):
            self.times.append(time.perf_counter())

    common = dict(
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-3,
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )

    plugin_seconds: list[float] = []  # time inside the plugin's per-step code, legw_lamb runs
    plugin_steps: list[int] = []

    def timed(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                plugin_seconds[-1] += time.perf_counter() - started

        setattr(owner, name, wrapper)

    class TimedLegwTrainer(LegwTrainer):
        """LegwTrainer timing the code the plugin runs every step: its callback's step and log hooks and the
        LEGW scheduler's step (which computes the LR of the next update)."""

        def create_scheduler(self, *args, **kwargs):
            scheduler = super().create_scheduler(*args, **kwargs)
            timed(scheduler, "step")
            return scheduler

        def train(self, *args, **kwargs):
            plugin_seconds.append(0.0)
            callback = next(c for c in self.callback_handler.callbacks if isinstance(c, LegwCallback))
            for hook in ("on_optimizer_step", "on_step_end", "on_log"):
                timed(callback, hook)
            try:
                return super().train(*args, **kwargs)
            finally:
                plugin_steps.append(self.state.global_step)

    def run(variant: str, output_dir: str) -> float:
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
        timer = StepTimes()
        if variant == "trainer_adamw":
            trainer = Trainer(
                model=model,
                args=TrainingArguments(output_dir, warmup_steps=3, **common),
                train_dataset=Sequences(),
                callbacks=[timer],
            )
        elif variant == "trainer_lamb":
            optimizer = Lamb(decay_param_groups(model, 0.01, adapt_no_decay=False), lr=1e-3, preset="nvidia")
            schedule = transformers.get_linear_schedule_with_warmup(optimizer, 3, args.steps)
            trainer = Trainer(
                model=model,
                # LAMB (preset nvidia) normalises by the global gradient norm itself, as LegwTrainer lets it
                args=TrainingArguments(output_dir, **(common | {"max_grad_norm": 0.0})),
                train_dataset=Sequences(),
                optimizers=(optimizer, schedule),
                callbacks=[timer],
            )
        else:
            trainer = TimedLegwTrainer(
                model=model,
                args=LegwTrainingArguments(
                    output_dir,
                    legw_optimizer="lamb",
                    legw_optimizer_preset="nvidia",
                    legw_base_batch_size=max(args.batch // 4, 1),
                    legw_base_warmup_steps=3,
                    **common,
                ),
                train_dataset=Sequences(),
                callbacks=[timer],
            )
        trainer.remove_callback(PrinterCallback)  # keep the logs off stdout, which is the report
        trainer.train()
        intervals = [b - a for a, b in zip(timer.times, timer.times[1:], strict=False)][args.warmup_steps :]
        return statistics.median(intervals)

    machine = f"{cpu_model()}, {torch.get_num_threads()} torch threads"
    command = " ".join(["python benchmarks/trainer_overhead.py", *(sys.argv[1:] if argv is None else argv)])
    print(
        f"# Trainer overhead: LEGW + LAMB vs Trainer's AdamW\n\n- machine: {machine}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n- torch {torch.__version__}, "
        f"transformers {transformers.__version__}\n- command: `{command}`\n- BERT-tiny MLM, batch {args.batch} x seq "
        f"{args.seq_len}, {args.steps} steps per run ({args.warmup_steps} untimed), {args.rounds} rounds\n",
        flush=True,
    )
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.rounds):
            # each round starts with another variant, so no variant always runs first (or right after another)
            order = VARIANTS[index % len(VARIANTS) :] + VARIANTS[: index % len(VARIANTS)]
            timing = {variant: run(variant, f"{scratch}/{variant}") for variant in order}
            timing = {variant: timing[variant] for variant in VARIANTS}
            rounds.append(timing)
            print(f"round {index + 1}: " + ", ".join(f"{v} {t * 1e3:.1f} ms" for v, t in timing.items()), flush=True)

    def ratios(a: str, b: str) -> list[float]:
        return [r[a] / r[b] for r in rounds]

    def ratio(a: str, b: str) -> float:
        return statistics.median(ratios(a, b))

    median = {v: statistics.median(r[v] for r in rounds) for v in VARIANTS}
    plugin_ms = 1e3 * sum(plugin_seconds) / sum(plugin_steps)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "BERT-tiny (2 layers, hidden 128), vocabulary 4096",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "rounds": args.rounds,
        "median_ms": {v: t * 1e3 for v, t in median.items()},
        "range_ms": {v: [min(r[v] for r in rounds) * 1e3, max(r[v] for r in rounds) * 1e3] for v in VARIANTS},
        "lamb_math": ratio("trainer_lamb", "trainer_adamw"),
        "plugin": ratio("legw_lamb", "trainer_lamb"),
        "total": ratio("legw_lamb", "trainer_adamw"),
        "plugin_code_ms_per_step": plugin_ms,
        "plugin_code_share": plugin_ms / (median["legw_lamb"] * 1e3),
    }
    print(
        "\n| run | ms/step, median (min–max) of rounds | × trainer_adamw, median (min–max) |\n|---|---:|---:|\n"
        + "\n".join(
            f"| {v} | {median_and_range([r[v] * 1e3 for r in rounds], '.1f')} | "
            f"{median_and_range(ratios(v, 'trainer_adamw'), '.3f')} |"
            for v in VARIANTS
        )
        + f"\n\nLAMB math (trainer_lamb / trainer_adamw): {result['lamb_math']:.3f}×; the plugin beyond it "
        f"(legw_lamb / trainer_lamb): {result['plugin']:.3f}×; in all {result['total']:.3f}×.\n\n"
        f"Time inside the plugin's per-step code (LegwCallback's step and log hooks, the LEGW scheduler's step), "
        f"measured in the legw_lamb runs: {plugin_ms:.3f} ms per step, {100 * result['plugin_code_share']:.2f}% of "
        "its median step time."
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
