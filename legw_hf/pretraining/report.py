"""The end of a pretraining run: validation metrics of the last and the averaged model beside the unigram baseline
on the same masked tokens, plots, and a short report."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers import Trainer

from ..plan import PhasedPlan
from .console import use_console
from .evaluation import MaskedLmMetrics, UnigramBaseline, token_scores
from .masking import stack_masked
from .model import bert_from_checkpoint

#: Per phase, what the unigram baseline scores on its validation masks.
BASELINE_KEYS = ("unigram_loss", "unigram_perplexity", "most_frequent_accuracy")
MODEL_KEYS = ("mlm_loss", "accuracy", "perplexity", "masked_tokens", "below_unigram")


def evaluate_models(
    models: dict[str, Path], validation: dict[str, Any], baseline: UnigramBaseline, training_args: Any, config: Any
) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """``{model name: {phase name: metrics}}`` on each phase's validation sequences (``validation``: by phase name,
    masked once, the same for all), and ``{phase name: unigram baseline}`` on the same masked tokens."""
    results: dict[str, dict[str, dict]] = {}
    baselines: dict[str, dict] = {}
    if training_args.deepspeed:
        _leave_deepspeed()
    with tempfile.TemporaryDirectory() as scratch:
        args = dataclasses.replace(
            training_args, output_dir=scratch, report_to="none", eval_strategy="no", deepspeed=None
        )
        for name, path in models.items():
            model = bert_from_checkpoint(path, config)
            trainer = Trainer(
                model=model,
                args=args,
                data_collator=stack_masked,
                compute_metrics=MaskedLmMetrics(baseline),
                preprocess_logits_for_metrics=token_scores,
            )
            use_console(trainer, name)  # no metrics dict per evaluation: the report prints them
            results[name] = {}
            for phase, sequences in validation.items():
                metrics = trainer.evaluate(sequences, metric_key_prefix="validation")
                results[name][phase] = {key: metrics[f"validation_{key}"] for key in MODEL_KEYS}
                baselines[phase] = {key: metrics[f"validation_{key}"] for key in (*BASELINE_KEYS, "masked_tokens")}
    return results, baselines


def _leave_deepspeed() -> None:
    """The saved models are evaluated without DeepSpeed (which evaluates only under ZeRO-3): forget the training
    runs' DeepSpeed state, as a new process would not have it."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # set by TrainingArguments for --deepspeed
    AcceleratorState._reset_state(reset_partial_state=False)


def _global_points(plan: PhasedPlan, history: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for start, logs in zip(plan.phase_starts, history, strict=False):
        for entry in logs:
            if key in entry and "step" in entry:
                xs.append(start + entry["step"])
                ys.append(entry[key])
    return xs, ys


def write_plots(output_dir: Path, plan: PhasedPlan, history: list[list[dict]], unigram: list[float]) -> list[str]:
    """``lr_schedule.png`` (the plan's LR of every update, both phases, with the LR Trainer logged) and
    ``loss.png`` (train and validation MLM loss against updates of the whole run, and each phase's ``unigram``
    baseline loss as a line over its updates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(name: str, ylabel: str, title: str, *series: tuple) -> str:
        fig, ax = plt.subplots(figsize=(8, 4))
        for xs, ys, style, label in series:
            ax.plot(xs, ys, style, label=label)
        for boundary in plan.phase_starts[1:]:
            ax.axvline(boundary + 0.5, color="grey", linestyle=":")
        ax.set(xlabel="update (whole run)", ylabel=ylabel, title=title)
        ax.legend()
        fig.tight_layout()
        path = output_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return str(path)

    updates = range(plan.total_steps)
    levels: tuple[list, list] = ([], [])
    for start, phase, level in zip(plan.phase_starts, plan.phases, unigram, strict=True):
        levels[0].extend((start + 1, start + phase.plan.total_steps, None))
        levels[1].extend((level, level, None))
    peaks = " | ".join(f"{p.name}: batch {p.plan.batch_size}, peak {p.plan.peak_lr:.3g}" for p in plan.phases)
    return [
        figure(
            "lr_schedule.png",
            "learning rate",
            f"LR schedule: {peaks}",
            ([u + 1 for u in updates], [plan.lr_for_update(u) for u in updates], "-", "LEGW plan"),
            (*_global_points(plan, history, "learning_rate"), ".", "logged by Trainer"),
        ),
        figure(
            "loss.png",
            "loss (nats per masked token)",
            "MLM loss",
            (*_global_points(plan, history, "loss"), "-", "train loss"),
            (*_global_points(plan, history, "eval_mlm_loss"), "o-", "validation MLM loss"),
            (*levels, "k--", "unigram baseline (validation)"),
        ),
    ]


def render_report(summary: dict[str, Any], output_dir: Path) -> str:
    lines = [
        "",
        "***** Pretraining report *****",
        f"{'model':<44} {'validation':<20} {'MLM loss':>9} {'accuracy':>9} {'perplexity':>11} {'below unigram':>14}",
    ]
    for phase, b in summary["baselines"].items():
        lines.append(
            f"{'unigram baseline (training frequencies)':<44} {phase:<20} {b['unigram_loss']:>9.4f} "
            f"{b['most_frequent_accuracy']:>9.4f} {b['unigram_perplexity']:>11.2f} {'':>14}"
        )
    for model, phases in summary["validation"].items():
        for phase, m in phases.items():
            lines.append(
                f"{model:<44} {phase:<20} {m['mlm_loss']:>9.4f} {m['accuracy']:>9.4f} {m['perplexity']:>11.2f} "
                f"{m['below_unigram']:>+14.4f}"
            )
    lines.append(
        "(unigram baseline: each masked token predicted by its frequency in the training text, on the same masked "
        "tokens; its accuracy is always predicting the most frequent token)"
    )
    for model, phases in summary["validation"].items():
        phase, m = list(phases.items())[-1]
        b = summary["baselines"][phase]
        margin = m["below_unigram"]
        where = f"{margin:.2f} nats below" if margin > 0 else f"{-margin:.2f} nats ABOVE"
        lines.append(
            f"{model}, {phase}: {where} the unigram level {b['unigram_loss']:.2f}; accuracy {m['accuracy']:.3f} "
            f"against {b['most_frequent_accuracy']:.3f} for the most frequent token"
        )
    during = summary.get("validation_loss_during_training")
    if during:
        lines.append(
            f"validation MLM loss during training: {during['first']:.4f} after the first evaluation, "
            f"{during['last']:.4f} at the last"
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
