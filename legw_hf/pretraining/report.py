"""The end of a pretraining run: validation metrics of the last and the averaged model, plots, and a short report."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from transformers import BertForMaskedLM, Trainer

from ..plan import PhasedPlan
from .evaluation import masked_lm_metrics, token_scores
from .masking import stack_masked


def evaluate_models(models: dict[str, Path], runs: list[Any], training_args: Any) -> dict[str, dict[str, dict]]:
    """``{model name: {phase name: metrics}}`` on each phase's validation sequences (masked once, the same for all)."""
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        args = dataclasses.replace(training_args, output_dir=scratch, report_to="none", eval_strategy="no")
        for name, path in models.items():
            model = BertForMaskedLM.from_pretrained(path)
            trainer = Trainer(
                model=model,
                args=args,
                data_collator=stack_masked,
                compute_metrics=masked_lm_metrics,
                preprocess_logits_for_metrics=token_scores,
            )
            results[name] = {}
            for run in runs:
                metrics = trainer.evaluate(run.validation, metric_key_prefix="validation")
                results[name][f"{run.settings.name} (seq {run.settings.seq_len})"] = {
                    key: metrics[f"validation_{key}"] for key in ("mlm_loss", "accuracy", "perplexity", "masked_tokens")
                }
    return results


def _global_points(plan: PhasedPlan, history: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for start, logs in zip(plan.phase_starts, history, strict=False):
        for entry in logs:
            if key in entry and "step" in entry:
                xs.append(start + entry["step"])
                ys.append(entry[key])
    return xs, ys


def write_plots(output_dir: Path, plan: PhasedPlan, history: list[list[dict]]) -> list[str]:
    """``lr_schedule.png`` (the plan's LR of every update, both phases, with the LR Trainer logged) and
    ``loss.png`` (train and validation MLM loss against updates of the whole run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = range(plan.total_steps)
    boundaries = plan.phase_starts[1:]
    written = []

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([u + 1 for u in updates], [plan.lr_for_update(u) for u in updates], label="LEGW plan")
    xs, ys = _global_points(plan, history, "learning_rate")
    ax.plot(xs, ys, ".", label="logged by Trainer")
    for boundary in boundaries:
        ax.axvline(boundary + 0.5, color="grey", linestyle=":")
    ax.set(
        xlabel="update (whole run)",
        ylabel="learning rate",
        title="LR schedule: "
        + " | ".join(f"{p.name}: batch {p.plan.batch_size}, peak {p.plan.peak_lr:.3g}" for p in plan.phases),
    )
    ax.legend()
    fig.tight_layout()
    path = output_dir / "lr_schedule.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(*_global_points(plan, history, "loss"), label="train loss")
    ax.plot(*_global_points(plan, history, "eval_mlm_loss"), "o-", label="validation MLM loss")
    for boundary in boundaries:
        ax.axvline(boundary + 0.5, color="grey", linestyle=":")
    ax.set(xlabel="update (whole run)", ylabel="loss (nats per masked token)", title="MLM loss")
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))
    return written


def render_report(summary: dict[str, Any], output_dir: Path) -> str:
    lines = [
        "",
        "***** Pretraining report *****",
        f"{'model':<44} {'validation':<20} {'MLM loss':>9} {'accuracy':>9} {'perplexity':>11}",
    ]
    for model, phases in summary["validation"].items():
        for phase, m in phases.items():
            lines.append(
                f"{model:<44} {phase:<20} {m['mlm_loss']:>9.4f} {m['accuracy']:>9.4f} {m['perplexity']:>11.2f}"
            )
    seconds = summary["seconds"]
    lines.append("time: " + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
    lines.append(
        f"outputs in {output_dir}: "
        + ", ".join(
            [
                *(f"{name}: {path}" for name, path in summary["models"].items()),
                "report.json",
                *(Path(p).name for p in summary.get("plots", [])),
            ]
        )
    )
    return "\n".join(lines)
