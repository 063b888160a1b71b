"""Does a batch ramp reach the base run's quality in fewer updates? Fixed batches vs a scheduled ramp vs AutoRamp.

Two tasks of the large-batch reproduction (``large_batch.py``, same data, models, optimizers and tuned base
settings): the word-level LSTM language model on WikiText-2 (Adam) and the tiny BERT of the main job (LAMB). Every
run is an accelerate loop exactly as a user writes one (``create_legw_scheduler(batch_ramp=...)`` and
``ramped_updates``, one process), for the base run's number of epochs, with LEGW's LR for the batch of every update:

- ``fixed B0``: the base batch, the tuned base run;
- ``fixed k·B0``: a larger batch for the whole run (a one-stage ramp: the LEGW plan at that batch);
- ``scheduled``: a ramp written by hand before any run (:data:`SCHEDULED`);
- ``auto``: :class:`~legw_hf.ramp.AutoRamp`, starting at B0 and doubling while doubling is at least 80% efficient
  by the measured noise scale, up to the largest fixed batch.

Each run is evaluated every :data:`EVALUATIONS_PER_EPOCH`-th of an epoch. The target is the base run's final quality
(the worst of its seeds, so that every base seed reaches it); a run's cost to target is the updates and samples it
had taken at its first evaluation that reached it. Output: ``results/batch_ramp.{json,md}`` and a plot of the batch
and the metric against samples.

    python benchmarks/batch_ramp.py                            # the recorded run (benchmarks/RESULTS.md)
    python benchmarks/batch_ramp.py --smoke --out /tmp/smoke   # seconds: every task and arm, tiny
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from large_batch import (
    TASKS,
    check_runner_arguments,
    environment,
    make_optimizer,
    prepare_tasks,
    run_cells,
    runner_parser,
    task_data,
)

from legw_hf import LegwConfig

#: Evaluations per epoch of training data (the resolution of "updates to target").
EVALUATIONS_PER_EPOCH = 16
#: AutoRamp's threshold (its default); the cap is the largest fixed batch, the patience the task's.
AUTO_EFFICIENCY = 0.8


@dataclass(frozen=True)
class RampTask:
    """A task of large_batch.py run with ramps: its optimizer family, micro-batch, fixed batches and the scheduled
    ramp (written down before any run, from the noise scales large_batch.py measured at the base LR)."""

    name: str
    family: str
    micro_batch: int
    fixed: tuple[int, ...]  # the first is the base batch
    scheduled: str
    patience: int = 20  # AutoRamp's default

    @property
    def base_batch(self) -> int:
        return self.fixed[0]


RAMP_TASKS = {
    # B_simple measured 68-137 at batches 16-256 (large_batch.md): batch 16 early is cheap, 64 only late.
    "wikitext2_lm": RampTask("wikitext2_lm", "adam", 2, (4, 16, 64), "4@0,16@0.25,64@1.5"),
    # Fixed batches >= 32 end near the unigram level in 2 epochs (large_batch.md): a slow ramp, no higher than 32.
    "bert_tiny": RampTask("bert_tiny", "lamb", 4, (8, 32, 128), "8@0,16@0.5,32@1.25"),
}
SMOKE_TASKS = {
    "wikitext2_lm": RampTask("wikitext2_lm", "adam", 2, (4, 8), "4@0,8@0.5", patience=2),
    "bert_tiny": RampTask("bert_tiny", "lamb", 2, (4, 8), "4@0,8@0.5", patience=2),
}


def ramp_task(name: str, smoke: bool) -> RampTask:
    return (SMOKE_TASKS if smoke else RAMP_TASKS)[name]


@dataclass(frozen=True)
class Cell:
    task: str
    arm: str  # "fixed" | "scheduled" | "auto"
    seed: int
    smoke: bool
    cache: str
    batch: int = 0  # fixed arms

    @property
    def k(self) -> int:  # large_batch.run_cells orders by it: the base batch's runs are the slowest
        return self.batch or 2

    @property
    def label(self) -> str:
        return f"fixed {self.batch}" if self.arm == "fixed" else self.arm


class _Examples(torch.utils.data.Dataset):
    def __init__(self, fields: dict[str, torch.Tensor]) -> None:
        self.fields = fields

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.fields.items()}


def train_cell(cell: Cell) -> dict[str, Any]:
    """One run: an accelerate loop over the task's data at a fixed batch, a scheduled ramp or an automatic one."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from legw_hf.integrations.accelerate import create_legw_scheduler, ramped_updates
    from legw_hf.ramp import AutoRamp

    torch.set_num_threads(1)
    task, ramp = TASKS[cell.task], ramp_task(cell.task, cell.smoke)
    family, size = task.families[ramp.family], task.size(cell.smoke)
    data = task_data(cell.task, cell.smoke, cell.cache)
    set_seed(cell.seed)
    accelerator = Accelerator(cpu=True)
    model = data.new_model()
    optimizer = make_optimizer(family.optimizer, model)
    loader = torch.utils.data.DataLoader(
        _Examples(data.train),
        batch_size=ramp.micro_batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cell.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    config = LegwConfig(
        base_batch_size=ramp.base_batch,
        base_lr=family.base_lr,
        base_warmup_epochs=family.base_warmup_epochs,
        decay=task.decay,
    )
    if cell.arm == "auto":
        batch_ramp: Any = AutoRamp(
            max_batch=ramp.fixed[-1], efficiency=AUTO_EFFICIENCY, patience=ramp.patience, start_batch=ramp.base_batch
        )
    else:
        batch_ramp = f"{cell.batch}@0" if cell.arm == "fixed" else ramp.scheduled
    scheduler = create_legw_scheduler(
        accelerator, optimizer, config, loader, num_epochs=size.epochs, batch_ramp=batch_ramp
    )
    epoch_samples = scheduler.plan.dataset_size
    masks = torch.Generator().manual_seed(cell.seed)
    evaluations: list[dict[str, Any]] = []
    batches: list[list[float]] = []  # [epoch at which a batch starts, batch]
    samples = updates = 0
    next_evaluation = 1
    diverged = False
    started = time.perf_counter()
    model.train()
    for update in ramped_updates(accelerator, scheduler, loader, model):
        if not batches or batches[-1][1] != update.batch_size:
            batches.append([samples / epoch_samples, update.batch_size])
        losses = []
        for micro_batch in update.micro_batches():
            summed, count = data.loss(model, data.prepare_batch(micro_batch, masks))
            loss = summed / count
            update.backward(loss)
            losses.append(float(loss.detach()))
        if task.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), task.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples += update.batch_size
        updates += 1
        if not all(math.isfinite(loss) for loss in losses):
            diverged = True
            break
        while samples * EVALUATIONS_PER_EPOCH >= next_evaluation * epoch_samples:
            model.eval()
            metric = data.evaluate(model)
            model.train()
            evaluations.append(
                {"epoch": samples / epoch_samples, "samples": samples, "updates": updates, "metric": metric}
            )
            next_evaluation = math.floor(samples * EVALUATIONS_PER_EPOCH / epoch_samples) + 1
    if diverged or not evaluations or not math.isfinite(evaluations[-1]["metric"]):
        diverged = True
    record = {
        **{k: v for k, v in asdict(cell).items() if k not in ("smoke", "cache")},
        "label": cell.label,
        "metric": None if diverged else evaluations[-1]["metric"],
        "diverged": diverged,
        "updates": updates,
        "samples": samples,
        "epochs": samples / epoch_samples,
        "dataset_size": epoch_samples,
        "micro_batch": ramp.micro_batch,
        "ramp": scheduler.plan.ramp.to_text(),
        "batches": batches,
        "evaluations": evaluations,
        "seconds": time.perf_counter() - started,
    }
    if cell.arm == "auto":
        record["decisions"] = [decision.to_dict() for decision in scheduler.decisions]
    accelerator.free_memory()
    return record


def _describe_run(r: dict[str, Any]) -> str:
    metric = "diverged" if r["diverged"] else f"{r['metric']:.4g}"
    return (
        f"{r['task']:>12} {r['label']:>10} seed {r['seed']}: {metric:>9}, {r['updates']} updates, ramp {r['ramp']}, "
        f"{r['seconds']:.0f} s"
    )


def experiment_cells(tasks: list[str], seeds: int, smoke: bool, cache: str) -> list[Cell]:
    cells = []
    for name in tasks:
        ramp = ramp_task(name, smoke)
        for seed in range(seeds):
            cells += [Cell(name, "fixed", seed, smoke, cache, batch) for batch in ramp.fixed]
            cells += [Cell(name, "scheduled", seed, smoke, cache), Cell(name, "auto", seed, smoke, cache)]
    return cells


# -------------------------------------------------------------------------------------------------------- report
def target_of(runs: list[dict[str, Any]], task: dict[str, Any]) -> float | None:
    """The base run's final quality: the worst final metric of its seeds (each base seed reaches it)."""
    finals = [
        r["metric"] for r in runs if r["arm"] == "fixed" and r["batch"] == task["base_batch"] and not r["diverged"]
    ]
    if not finals:
        return None
    return min(finals) if task["higher_is_better"] else max(finals)


def reached(run: dict[str, Any], target: float, higher_is_better: bool) -> dict[str, Any] | None:
    """The run's first evaluation at the target quality, or None."""
    for evaluation in run["evaluations"]:
        metric = evaluation["metric"]
        if math.isfinite(metric) and (metric >= target if higher_is_better else metric <= target):
            return evaluation
    return None


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.4g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")


def summarise(runs: list[dict[str, Any]], tasks: dict[str, Any]) -> dict[str, Any]:
    """Per task and arm: final metric over seeds, updates, and the updates/samples to the base run's target."""
    summary: dict[str, Any] = {}
    for name, task in tasks.items():
        mine = [r for r in runs if r["task"] == name]
        target = target_of(mine, task)
        rows: dict[str, Any] = {}
        for label in dict.fromkeys(r["label"] for r in mine):
            group = [r for r in mine if r["label"] == label]
            hits = [reached(r, target, task["higher_is_better"]) for r in group] if target is not None else []
            hits = [hit for hit in hits if hit is not None]
            rows[label] = {
                "seeds": len(group),
                "diverged": sum(r["diverged"] for r in group),
                "finals": [r["metric"] for r in group],
                "updates": [r["updates"] for r in group],
                "ramps": [r["ramp"] for r in group],
                "reached": len(hits),
                "updates_to_target": [hit["updates"] for hit in hits],
                "epochs_to_target": [hit["epoch"] for hit in hits],
            }
        summary[name] = {"target": target, "rows": rows}
    return summary


def _rounded(ramp: str) -> str:
    """A ramp as the table shows it: stage starts to 3 significant digits (an automatic ramp's are exact ratios)."""
    return ",".join(f"{batch}@{float(start):.3g}" for batch, start in (part.split("@") for part in ramp.split(",")))


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    lines = ["# Batch ramps: fixed batches, a scheduled ramp and AutoRamp", ""]
    lines += [f"- {k}: {v}" for k, v in result["environment"].items()]
    lines += [f"- command: `{result['command']}`", f"- wall time: {result['seconds'] / 60:.1f} min", ""]
    for name, task in result["tasks"].items():
        summary = result["summary"][name]
        target = summary["target"]
        direction = "higher" if task["higher_is_better"] else "lower"
        lines += [
            f"## {name}: {task['title']}",
            "",
            f"Data: {task['data']}. {task['epochs']:g} epochs, micro-batch {task['micro_batch']}, base batch "
            f"{task['base_batch']}, base peak LR {task['base_lr']:g}, base warmup {task['base_warmup_epochs']:g} "
            f"epochs; LEGW's LR for the batch of every update. Scheduled ramp: `{task['scheduled']}`. AutoRamp: "
            f"efficiency {result['auto_ramp']['efficiency']}, patience {task['patience']}, cap {task['fixed'][-1]}.",
            "",
            f"{task['metric']} ({direction} is better). Trivial baseline on the same data: {task['baseline']['name']}: "
            f"{task['baseline']['value']:.4g}. Target: the base run's final quality, "
            + (f"{target:.4g} (its worst seed)." if target is not None else "none (the base run diverged)."),
            "",
            "| arm | final metric | updates | reached target | updates to target | epochs to target | ramps taken |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for label, row in summary["rows"].items():
            finals = [m for m in row["finals"] if m is not None]
            final = _mean_spread(finals)
            if row["diverged"]:
                final += f" ({row['diverged']}/{row['seeds']} diverged)"
            ramps = "<br>".join(f"`{_rounded(ramp)}`" for ramp in dict.fromkeys(row["ramps"]))
            lines.append(
                f"| {label} | {final} | {_mean_spread(row['updates'])} | {row['reached']}/{row['seeds']} | "
                f"{_mean_spread(row['updates_to_target'])} | {_mean_spread(row['epochs_to_target'])} | {ramps} |"
            )
        lines += ["", f"![batch and {task['metric']} against samples and updates]({path.stem}_{name}.png)", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(out: Path, stem: str, result: dict[str, Any]) -> list[str]:
    """Per task: the batch against samples, the metric against samples (mean over seeds) and the metric against
    updates (every seed: an automatic ramp's updates differ by seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, task in result["tasks"].items():
        runs = [r for r in result["runs"] if r["task"] == name]
        labels = list(dict.fromkeys(r["label"] for r in runs))
        figure, (batch_axis, metric_axis, update_axis) = plt.subplots(1, 3, figsize=(17, 4.4))
        for color, label in enumerate(labels):
            group = [r for r in runs if r["label"] == label and not r["diverged"]]
            if not group:
                continue
            for r in group:
                shown = dict(color=f"C{color}", alpha=0.9 if r["seed"] == 0 else 0.35)
                legend = label if r["seed"] == 0 else None
                xs = [epoch for epoch, _ in r["batches"]] + [r["epochs"]]
                ys = [batch for _, batch in r["batches"]] + [r["batches"][-1][1]]
                batch_axis.step(xs, ys, where="post", label=legend, **shown)
                update_axis.plot(
                    [e["updates"] for e in r["evaluations"]], [e["metric"] for e in r["evaluations"]],
                    label=legend, **shown,
                )  # fmt: skip
            points = min(len(r["evaluations"]) for r in group)
            epochs = [group[0]["evaluations"][i]["epoch"] for i in range(points)]
            means = [statistics.fmean(r["evaluations"][i]["metric"] for r in group) for i in range(points)]
            metric_axis.plot(epochs, means, color=f"C{color}", label=label)
        target = result["summary"][name]["target"]
        for axis in (metric_axis, update_axis):
            if target is not None:
                axis.axhline(target, color="grey", linestyle=":", label="target (base run's final)")
            axis.axhline(task["baseline"]["value"], color="black", linestyle="--", label="trivial baseline")
            if "perplexity" in task["metric"]:
                axis.set_yscale("log")
            values = [e["metric"] for r in runs for e in r["evaluations"] if math.isfinite(e["metric"])]
            if values:  # the first evaluations sit far above the rest: show the part the arms differ in
                low = min(values)
                axis.set_ylim(low * 0.98 if low > 0 else low, max(task["baseline"]["value"], target or low) * 1.1)
        batch_axis.set(xlabel="epochs of samples", ylabel="global batch", title=f"{name}: batch (each seed)")
        batch_axis.set_yscale("log", base=2)
        metric_axis.set(xlabel="epochs of samples", ylabel=task["metric"], title=f"{name}: mean over seeds")
        update_axis.set(xlabel="updates", ylabel=task["metric"], title=f"{name}: against updates (each seed)")
        update_axis.set_xscale("log")
        for axis in (batch_axis, metric_axis, update_axis):
            axis.legend(fontsize="small")
        figure.tight_layout()
        path = out / f"{stem}_{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path.name)
    return written


def describe_task(name: str, smoke: bool, cache: str) -> dict[str, Any]:
    task, ramp = TASKS[name], ramp_task(name, smoke)
    family, size, data = task.families[ramp.family], task.size(smoke), task_data(name, smoke, cache)
    return {
        "title": task.title,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "data": data.describe,
        "baseline": {"value": data.baseline, "name": data.baseline_name},
        "epochs": size.epochs,
        "micro_batch": ramp.micro_batch,
        "base_batch": ramp.base_batch,
        "fixed": list(ramp.fixed),
        "scheduled": ramp.scheduled,
        "patience": ramp.patience,
        "base_lr": family.base_lr,
        "base_warmup_epochs": family.base_warmup_epochs,
        "decay": task.decay.to_dict(),
    }


def write_report(out: Path, stem: str, result: dict[str, Any]) -> None:
    write_markdown(out / f"{stem}.md", result)
    plot(out, stem, result)


def main(argv: list[str] | None = None) -> int:
    parser = runner_parser(__doc__.split("\n\n")[0], seeds=3)
    parser.add_argument("--tasks", nargs="+", choices=list(RAMP_TASKS), default=list(RAMP_TASKS))
    args = parser.parse_args(argv)
    check_runner_arguments(parser, args)
    if args.report is not None:
        result = json.loads(args.report.read_text(encoding="utf-8"))
        write_report(args.report.parent, args.report.stem, result)
        return 0
    seeds = 1 if args.smoke and args.seeds == 3 else args.seeds
    cache = prepare_tasks(parser, args)
    cells = experiment_cells(args.tasks, seeds, args.smoke, cache)
    print(f"{len(cells)} runs on {args.workers} workers", flush=True)
    started = time.perf_counter()
    runs = run_cells(
        cells, args.workers, lambda line: print(line, flush=True), train=train_cell, describe=_describe_run
    )
    seconds = time.perf_counter() - started
    tasks = {name: describe_task(name, args.smoke, cache) for name in args.tasks}
    result = {
        "environment": environment(),
        "command": "python benchmarks/batch_ramp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": seconds,
        "seeds": seeds,
        "evaluations_per_epoch": EVALUATIONS_PER_EPOCH,
        "auto_ramp": {"efficiency": AUTO_EFFICIENCY},
        "tasks": tasks,
        "summary": summarise(runs, tasks),
        "runs": runs,
    }
    stem = "batch_ramp"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_report(args.out, stem, result)
    print(f"done in {seconds / 60:.1f} min: {args.out / stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
