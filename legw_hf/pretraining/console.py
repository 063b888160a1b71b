"""The pretraining program's console: what a person follows a run by.

By default (``--log_level`` left at Trainer's ``passive``) the console holds the program's own lines (data, plan,
report), one progress bar per phase and one line per evaluation; Trainer's INFO stream (argument and config dumps,
every checkpoint save, a dict per logged update) stays out, though every logged value is still recorded in each
checkpoint's ``trainer_state.json``. ``--log_level info`` (or ``debug``) brings Trainer's stream back, as in
transformers' example scripts; ``warning`` or above leaves the program's lines out too.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import datasets
import transformers
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.training_args import trainer_log_levels

from ..integrations.trainer import follow_trainer_log_level

#: The program's own lines (data, plan, phases, report) come from this logger and the ones under it.
PROGRAM_LOGGER = "legw_hf.pretraining"


def reads_as_console(training_args: Any) -> bool:
    """Whether the run shows the person-readable console: ``--log_level`` not chosen."""
    return training_args.log_level == "passive"


def setup_logging(training_args: Any) -> None:
    """Logging as transformers' example scripts set it up (``basicConfig()`` with no level, transformers and
    datasets following ``--log_level``), or, by default, the program's INFO lines with Trainer's kept to warnings."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    if reads_as_console(training_args):
        transformers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.disable_progress_bar()  # saving and loading weights: a bar each
        datasets.utils.logging.set_verbosity_warning()
        replica = trainer_log_levels[training_args.log_level_replica]
        level = logging.INFO if training_args.should_log else (logging.WARNING if replica == -1 else replica)
        follow_trainer_log_level(training_args)  # the library's other loggers: Trainer's level (warning)
        logging.getLogger(PROGRAM_LOGGER).setLevel(level)  # LegwTrainer re-applies the line above; not this one
        return
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    follow_trainer_log_level(training_args)


def evaluation_line(phase: str, step: int, total: int, logs: dict[str, float]) -> str:
    line = f"{phase} update {step}/{total}: validation MLM loss {logs['eval_mlm_loss']:.3f}"
    if "eval_below_unigram" in logs:
        margin = logs["eval_below_unigram"]
        where = "below" if margin > 0 else "ABOVE"
        line += f" ({abs(margin):.3f} {where} the unigram level {logs['eval_unigram_loss']:.3f})"
    line += f", accuracy {logs['eval_accuracy']:.3f}"
    if "eval_most_frequent_accuracy" in logs:
        line += f" (most frequent token: {logs['eval_most_frequent_accuracy']:.3f})"
    return line


class _EvaluationLines:
    """Prints one line per evaluation in place of the dict Trainer prints for every log."""

    phase: str

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "eval_mlm_loss" in logs:
            self.write(evaluation_line(self.phase, state.global_step, state.max_steps, logs))

    def write(self, line: str) -> None:
        print(line, flush=True)


class PhaseProgress(_EvaluationLines, ProgressCallback):
    """Trainer's progress bar, named after the phase, with the evaluation lines printed above it."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.phase)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # one bar per phase: an evaluation shows as its line

    def write(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            super().write(line)


class PhaseLines(_EvaluationLines, TrainerCallback):
    """With ``--disable_tqdm``: the evaluation lines alone."""

    def __init__(self, phase: str) -> None:
        self.phase = phase


def use_console(trainer: Trainer, phase: str) -> None:
    """Give ``trainer`` the program's console for ``phase`` (see the module docstring), unless Trainer's own stream
    was asked for."""
    if not reads_as_console(trainer.args):
        return
    if trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(PhaseLines(phase))
    else:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(PhaseProgress(phase))
