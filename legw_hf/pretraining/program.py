"""``legw-hf pretrain``: two-phase BERT pretraining with LEGW and LAMB, from raw text to an evaluated, averaged model.

    legw-hf pretrain                                   # tiny BERT on the embedded corpus, 2 CPU cores, < 10 min
    legw-hf pretrain --train_file a.txt --validation_file b.txt --model_size mini --output_dir runs/mini
    torchrun --nproc_per_node 8 -m legw_hf.pretraining --recipe bert-large --deepspeed zero1-bf16.json --bf16 ...

The same program runs as ``python -m legw_hf.pretraining`` and ``python examples/pretrain_bert.py``. Every Trainer
flag works, except those a phase owns (its batch, LR, warmup and length), which are the ``--phase1_*`` /
``--phase2_*`` flags; their defaults are the recipe's (:mod:`legw_hf.recipes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, make_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import datasets
import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..averaging import average_checkpoints
from ..errors import SettingError, non_negative, positive, positive_int
from ..integrations.trainer import LegwTrainingArguments, changed_fields
from ..integrations.trainer.flags import TRAINER_SCHEDULE_FLAGS
from ..plan import Phase, PhasedPlan
from ..recipes import RECIPES, PretrainingPhase, phase as recipe_phase
from ..record import write_json
from ..shutdown import leave_process_group
from .console import setup_logging, use_console
from .data import MaskedLmData, PreparedText, load_text, train_wordpiece
from .evaluation import MaskedLmMetrics, UnigramBaseline, token_scores
from .masking import MaskingCollator, MaskingRule
from .model import MAX_POSITIONS, MODEL_SIZES, BertForMaskedPositions, bert_config, bert_from_checkpoint
from .phases import (
    PhaseTrainer,
    SaveAtPhaseEnd,
    completed_checkpoint,
    mark_complete,
    trainer_steps_per_epoch,
)

logger = logging.getLogger("legw_hf.pretraining")

RUN_RECORD = "pretraining_run.json"

#: Trainer flags a phase sets from its own settings: giving one is an error that names the phase flag to use
#: (``--phase1_<suffix>`` / ``--phase2_<suffix>``) and why.
PHASE_OWNED = {
    "learning_rate": ("base_lr", "the peak LR at the phase's base batch"),
    "per_device_train_batch_size": ("per_device_batch_size", "the micro-batch per process"),
    "gradient_accumulation_steps": ("global_batch_size", "the accumulation follows from it"),
    "num_train_epochs": ("epochs", "the phase's length"),
    "max_steps": ("epochs", "the phase's length"),
    "legw_base_steps": ("epochs", "the phase's length"),
    "legw_base_batch_size": ("base_batch_size", "the batch the phase's base settings were tuned at"),
    "legw_base_warmup_epochs": ("base_warmup_steps", "the warmup at the base batch"),
    "legw_base_warmup_steps": ("base_warmup_steps", "the warmup at the base batch"),
    "legw_global_batch_size": ("global_batch_size", "the phase's global batch"),
    "legw_decay": ("power", "the decay is NVIDIA's polynomial of the phase's progress"),
    "legw_power": ("power", "the exponent of that decay"),
}

#: Trainer defaults this program changes (still overridable on the command line).
PROGRAM_DEFAULTS = {
    "output_dir": "runs/pretrain",
    "legw_optimizer": "lamb",
    "legw_optimizer_preset": "nvidia",
    "weight_decay": 0.01,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass
class PretrainingArguments:
    recipe: Literal[tuple(RECIPES)] = field(
        default="tiny", metadata={"help": "Phase settings: tiny (CPU, minutes) or bert-large (NVIDIA's LAMB recipe)."}
    )
    model_size: Literal[tuple(MODEL_SIZES)] | None = field(
        default=None, metadata={"help": "BERT size (default: the recipe's, tiny or large)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Text file: one document per line, or blank-line separated. Default: the embedded offline corpus."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Text file of validation documents."})
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets dataset (needs its hub or cache)."})
    dataset_config_name: str | None = field(default=None)
    text_column: str = field(default="text", metadata={"help": "Text column of --dataset_name."})
    documents: Literal["auto", "line", "paragraph"] = field(
        default="auto", metadata={"help": "How text files hold documents (auto: paragraphs if blank lines)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Validation share of the training documents when no validation split is given."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "A local tokenizer directory (default: train WordPiece on the training text)."}
    )
    vocab_size: int | None = field(default=None, metadata={"help": "WordPiece vocabulary (tiny 4096, large 30522)."})
    max_document_tokens: int | None = field(
        default=None, metadata={"help": "Drop documents longer than this, once (Popel & Bojar)."}
    )
    whole_word_mask: bool = field(default=True, metadata={"help": "Mask whole words, not single WordPieces."})
    mlm_probability: float = field(default=0.15)
    preprocessing_cache_dir: str | None = field(
        default=None, metadata={"help": "Where preprocessing results are cached (default: datasets' cache)."}
    )
    min_validation_sequences: int = field(default=8, metadata={"help": "Fewest validation sequences per phase."})
    average_last: int = field(default=4, metadata={"help": "Average the last N phase-2 checkpoints (0: none)."})
    average_interval: int | None = field(
        default=None, metadata={"help": "Phase-2 updates between the checkpoints kept for averaging."}
    )
    auto_micro_batch: bool = field(
        default=False, metadata={"help": "Find the largest per-device micro-batch that fits, per phase."}
    )
    auto_micro_batch_margin: float = field(
        default=0.1, metadata={"help": "Memory kept free by --auto_micro_batch, as a fraction of the device's."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir holding another run (its files are moved aside)."},
    )
    plots: bool | None = field(
        default=None,
        metadata={"help": "Write PNG plots of the LR and the losses (default: when matplotlib is installed)."},
    )


_PHASE_FIELDS = (
    ("seq_len", int, "sequence length"),
    ("max_predictions", int, "most masked tokens per sequence"),
    ("global_batch_size", int, "sequences per update, all processes"),
    ("per_device_batch_size", int, "micro-batch per process"),
    ("base_batch_size", int, "LEGW base batch"),
    ("base_lr", float, "peak LR at the base batch"),
    ("base_warmup_steps", float, "warmup at the base batch, in its steps"),
    ("epochs", float, "epochs of the phase's packed data"),
    ("power", float, "exponent of the polynomial decay"),
)

PhaseArguments = make_dataclass(
    "PhaseArguments",
    [
        (f"phase{n}_{name}", kind | None, field(default=None, metadata={"help": f"Phase {n}: {text} (recipe's)."}))
        for n in (1, 2)
        for name, kind, text in _PHASE_FIELDS
    ],
)
PhaseArguments.__doc__ = "Per-phase overrides of the recipe's settings: --phase1_* and --phase2_*."


#: Phase flag suffix -> the recipe field it overrides.
_RECIPE_FIELD = {
    "seq_len": "seq_len",
    "max_predictions": "max_predictions_per_seq",
    "base_batch_size": "base_batch_size",
    "base_lr": "base_lr",
    "base_warmup_steps": "base_warmup_steps",
    "power": "power",
}


#: A phase's setting (or plan setting) -> its flag suffix, so an error names the flag to change.
_FLAG_SUFFIX = {recipe: flag for flag, recipe in _RECIPE_FIELD.items()} | {
    "batch_size": "global_batch_size",
    "decay": "power",
}


@contextlib.contextmanager
def _named_by_flags(label: str) -> Iterator[None]:
    """A phase's setting errors named by that phase's flag (``global_batch_size`` of phase1:
    ``phase1_global_batch_size``)."""
    try:
        yield
    except SettingError as error:
        raise error.renamed_by(lambda name: f"{label}_{_FLAG_SUFFIX.get(name, name)}") from None


def _recipe_phases(recipe: str, overrides: Any) -> dict[str, PretrainingPhase]:
    """The recipe's phases with the command line's overrides, by the name this program gives them (``phase1``)."""
    phases = {}
    for n, name in enumerate(RECIPES[recipe], start=1):
        base = recipe_phase(name)
        given = {key: getattr(overrides, f"phase{n}_{key}") for key, _, _ in _PHASE_FIELDS}
        changes = {_RECIPE_FIELD.get(key, key): value for key, value in given.items() if value is not None}
        if given["epochs"] is not None:
            changes.update(base_steps=None, epochs=positive(f"phase{n}_epochs", given["epochs"]))
        label = f"phase{n}"
        phases[label] = dataclasses.replace(base, **changes)
        _check_phase(label, phases[label])
    return phases


def _check_phase(label: str, phase: PretrainingPhase) -> None:
    """The phase's settings in range, each named by its flag."""
    with _named_by_flags(label):
        for key in ("global_batch_size", "per_device_batch_size", "seq_len", "max_predictions_per_seq"):
            positive_int(key, getattr(phase, key))
        positive_int("base_batch_size", phase.base_batch_size)
        for key in ("base_lr", "power"):
            positive(key, getattr(phase, key))
        non_negative("base_warmup_steps", phase.base_warmup_steps)
        if phase.seq_len > MAX_POSITIONS:
            raise SettingError("seq_len", f"must be at most the model's {MAX_POSITIONS} positions", phase.seq_len)
        if phase.seq_len < 8:
            raise SettingError("seq_len", "must be at least 8", phase.seq_len)
        if phase.max_predictions_per_seq >= phase.seq_len:
            raise SettingError(
                "max_predictions_per_seq",
                f"must be below {label}_seq_len ({phase.seq_len})",
                phase.max_predictions_per_seq,
            )


def _refuse_phase_owned(training_args: LegwTrainingArguments) -> None:
    defaults = {**{f.name: f.default for f in dataclasses.fields(LegwTrainingArguments)}, **PROGRAM_DEFAULTS}
    for name in changed_fields(training_args, tuple(PHASE_OWNED), defaults):
        suffix, why = PHASE_OWNED[name]
        raise SettingError(
            name,
            f"is set per phase by this program: use --phase1_{suffix} / --phase2_{suffix} ({why})",
            getattr(training_args, name),
        )
    for name in changed_fields(training_args, tuple(TRAINER_SCHEDULE_FLAGS), defaults):
        raise SettingError(
            name,
            "is not used by this program: each phase's LR schedule is its recipe's LEGW plan (change it with the "
            "--phase1_* / --phase2_* flags)",
            getattr(getattr(training_args, name), "value", getattr(training_args, name)),
        )
    if training_args.resume_from_checkpoint:
        raise SettingError(
            "resume_from_checkpoint",
            "is not needed: run again with the same --output_dir and the run resumes from its last checkpoint",
            training_args.resume_from_checkpoint,
        )


# ---------------------------------------------------------------------------------------------- output directory
def _run_identity(run_args: PretrainingArguments, phases: dict[str, PretrainingPhase], training_args: Any) -> dict:
    """What makes two invocations the same run (so the second may resume the first)."""
    kept = {
        k: v
        for k, v in dataclasses.asdict(run_args).items()
        if k not in ("overwrite_output_dir", "plots", "preprocessing_cache_dir", "auto_micro_batch_margin")
    }
    return {
        "program": "legw-hf pretrain",
        "arguments": kept,
        "phases": [
            {
                k: v
                for k, v in dataclasses.asdict(phase).items()
                if k not in ("micro_batch", "source", "per_device_batch_size")
            }
            for phase in phases.values()
        ],
        "seed": training_args.seed,
        "optimizer": [training_args.legw_optimizer, training_args.legw_optimizer_preset, training_args.weight_decay],
    }


def _claim_output_dir(output_dir: Path, identity: dict, overwrite: bool) -> bool:
    """Whether ``output_dir`` holds this same run (True: resume it). Refuses another run or foreign files unless
    ``overwrite``, which moves them into ``replaced-<UTC time>/`` rather than deleting anything."""
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return False
    try:
        saved = json.loads((output_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        saved = None
    if saved == json.loads(json.dumps(identity)):
        return True
    if not overwrite:
        if saved is None:
            why = f"holds files that are not a legw-hf pretrain run (no {RUN_RECORD})"
        else:
            diff = sorted(
                k for k in set(saved) | set(identity) if saved.get(k) != json.loads(json.dumps(identity)).get(k)
            )
            why = f"holds a different pretraining run (differs in: {', '.join(diff)})"
        raise SettingError(
            "output_dir",
            f"{why}; choose another --output_dir, or pass --overwrite_output_dir to move its contents aside "
            "(nothing is deleted)",
            str(output_dir),
        )
    aside = output_dir / f"replaced-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    aside.mkdir()
    for entry in list(output_dir.iterdir()):
        if entry != aside and not entry.name.startswith("replaced-"):
            shutil.move(str(entry), aside / entry.name)
    logger.warning("Moved the previous contents of %s into %s", output_dir, aside)
    return False


# ---------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class ProgramTrainingArguments(LegwTrainingArguments):
    """Trainer's arguments as this program takes them."""

    legw_adascale_refused: ClassVar[str | None] = (
        "is not offered by the pretraining program, whose phases follow the recipes' LEGW plans: use LegwTrainer "
        "with --legw_adascale in a script of your own (examples/run_mlm.py takes it)"
    )

    def __post_init__(self) -> None:
        # TrainingArguments replaces an unset eval_steps with logging_steps (1 here): remember whether it was given,
        # so an unset one becomes every eighth of a phase.
        self.eval_steps_given = self.eval_steps is not None
        super().__post_init__()


PROG = "legw-hf pretrain"


class _ArgumentError(Exception):
    """argparse's own complaint (an unknown choice, a value of the wrong type), as one line."""


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage (every Trainer flag) and exit
        raise _ArgumentError(message)


def parse(argv: list[str] | None) -> tuple[PretrainingArguments, Any, LegwTrainingArguments]:
    parser = _Parser((PretrainingArguments, PhaseArguments, ProgramTrainingArguments), prog=PROG)
    parser.set_defaults(**PROGRAM_DEFAULTS)
    # Known flags first, so an unknown one is named before Trainer's arguments are built (and log anything).
    _, unknown = parser.parse_known_args(args=argv)
    flags = [item for item in unknown if item.startswith("-")]
    if unknown:
        raise SettingError(
            "flags",
            f"must be flags of {PROG} or of Trainer (see {PROG} --help): unknown {' '.join(flags) or unknown[0]}",
            " ".join(unknown),
        )
    return parser.parse_args_into_dataclasses(args=argv)


def _named_as_flags(error: SettingError) -> SettingError:
    """The error naming each setting as this command line takes it, ``--phase1_global_batch_size``, as the other
    ``legw-hf`` subcommands name theirs (the Python API and Trainer's arguments name the field)."""
    fields = {
        field.name
        for arguments in (PretrainingArguments, PhaseArguments, ProgramTrainingArguments)
        for field in dataclasses.fields(arguments)
    }
    return error.renamed_by(lambda name: f"--{name}" if name in fields else name)


def main(argv: list[str] | None = None) -> int:
    try:
        run_args, phase_args, training_args = parse(argv)
        status = pretrain(run_args, phase_args, training_args)
    except SettingError as error:
        print(f"{PROG}: error: {_named_as_flags(error)}", file=sys.stderr)
        return 2
    except _ArgumentError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    leave_process_group()
    return status


def pretrain(run_args: PretrainingArguments, phase_args: Any, training_args: LegwTrainingArguments) -> int:
    """The whole job; every setting is checked (and the data prepared) before the output directory is touched."""
    started = time.perf_counter()
    setup_logging(training_args)
    if training_args.dataloader_pin_memory and not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin for; torch would warn at every evaluation
    phases = _check_settings(run_args, phase_args, training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    tokenizer, data, baseline = _prepare_data(run_args, training_args, phases)
    model_size = run_args.model_size or ("tiny" if run_args.recipe == "tiny" else "large")
    config = bert_config(model_size, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    identity = _run_identity(run_args, phases, training_args)
    notes = dict.fromkeys(phases, "")
    if run_args.auto_micro_batch:
        phases, notes = _fit_micro_batches(phases, config, run_args, training_args)
    plan = _phased_plan(phases, data, training_args.world_size)
    interval = _averaging_interval(run_args, plan)
    for (label, phase), planned in zip(phases.items(), plan.phases, strict=True):
        line = _describe(label, phase, data[label], training_args.world_size, notes[label])
        logger.info("%s; %s", line, planned.plan.describe())

    with training_args.main_process_first(local=False, desc="claiming the output directory"):
        if training_args.should_save:
            if _claim_output_dir(output_dir, identity, run_args.overwrite_output_dir):
                logger.info("%s holds this run: resuming it", output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json(output_dir / RUN_RECORD, identity)
            write_json(output_dir / "pretraining_plan.json", plan.to_dict())

    final, history, timings = _train_phases(
        phases, data, plan, config, tokenizer, baseline, training_args, run_args, interval
    )
    validation = {f"{label} (seq {phase.seq_len})": data[label].validation for label, phase in phases.items()}
    report = _evaluate_and_report(
        training_args,
        run_args,
        validation,
        baseline,
        final,
        output_dir,
        config,
        plan,
        history,
        timings,
        started,
        interval,
    )
    if training_args.should_save:
        print(report)
    return 0


def _check_settings(run_args: PretrainingArguments, phase_args: Any, training_args: Any) -> dict[str, PretrainingPhase]:
    _refuse_phase_owned(training_args)
    phases = _recipe_phases(run_args.recipe, phase_args)
    world = training_args.world_size
    for label, phase in phases.items():
        if run_args.auto_micro_batch and phase.global_batch_size % world:
            raise SettingError(
                f"{label}_global_batch_size",
                f"must be a multiple of the {world} processes",
                phase.global_batch_size,
            )
        if not run_args.auto_micro_batch:
            with _named_by_flags(label):
                phase.gradient_accumulation(world)
    if run_args.average_last < 0:
        raise SettingError("average_last", "must be >= 0", run_args.average_last)
    if run_args.average_interval is not None and run_args.average_interval < 1:
        raise SettingError("average_interval", "must be an integer >= 1", run_args.average_interval)
    if not 0 <= run_args.auto_micro_batch_margin < 1:
        raise SettingError("auto_micro_batch_margin", "must be in [0, 1)", run_args.auto_micro_batch_margin)
    if run_args.plots and not _has_matplotlib():
        raise SettingError("plots", "needs matplotlib (pip install 'legw_hf[plot]'), or pass --plots false", True)
    _check_writable(Path(training_args.output_dir))
    return phases


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _check_writable(output_dir: Path) -> None:
    """The output directory, or the nearest folder above it that exists, must be writable: found before the data is
    prepared, not when the first file is written."""
    existing = output_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError("output_dir", f"must be a directory, and {existing} is a file", str(output_dir))
    try:  # os.access says yes to root everywhere: make (and remove) an empty folder where the run will write
        os.rmdir(tempfile.mkdtemp(prefix=".legw-hf-write-check-", dir=existing))
    except OSError as error:
        raise SettingError(
            "output_dir", f"must be a folder this process can write in ({existing}: {error.strerror})", str(output_dir)
        ) from None


def _prepare_data(
    run_args: PretrainingArguments, training_args: Any, phases: dict[str, PretrainingPhase]
) -> tuple[PreTrainedTokenizerFast, dict[str, MaskedLmData], UnigramBaseline]:
    """Text, tokenizer, each phase's packed sequences and the unigram baseline of the training documents; the main
    process prepares (and caches) them first."""
    cache_root = Path(
        run_args.preprocessing_cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "legw_hf_pretraining"
    )
    with training_args.main_process_first(local=False, desc="preprocessing"):
        text = load_text(
            train_file=run_args.train_file,
            validation_file=run_args.validation_file,
            dataset_name=run_args.dataset_name,
            dataset_config_name=run_args.dataset_config_name,
            text_column=run_args.text_column,
            validation_split_percentage=run_args.validation_split_percentage,
            documents=run_args.documents,
            corpus_dir=cache_root / "embedded-corpus",
        )
        if run_args.tokenizer_name is not None:
            if not Path(run_args.tokenizer_name).is_dir():
                raise SettingError("tokenizer_name", "must be a local tokenizer directory", run_args.tokenizer_name)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(run_args.tokenizer_name)
        else:
            vocab_size = run_args.vocab_size or (4096 if run_args.recipe == "tiny" else 30522)
            tokenizer = train_wordpiece(text.train, vocab_size, cache_root / f"wordpiece-{text.identity}-{vocab_size}")
        prepared = {
            split: PreparedText(
                documents,
                tokenizer,
                split=split,
                max_document_tokens=run_args.max_document_tokens,
                cache_dir=cache_root,
            )
            for split, documents in (("train", text.train), ("validation", text.validation))
        }
        data = {
            label: _phase_data(label, phase, prepared, run_args, training_args, text.description)
            for label, phase in phases.items()
        }
    reused = sorted({f"{split}:{step}" for split, p in prepared.items() for step in p.reused})
    dropped = run_args.max_document_tokens
    logger.info(
        "Data: %s; %s",
        text.description,
        ", ".join(
            f"{split} {p.documents} documents / {p.tokens} tokens"
            + (f" ({p.dropped_documents} over {dropped} tokens dropped)" if dropped else "")
            for split, p in prepared.items()
        ),
    )
    logger.info("Preprocessing reused from the cache in %s: %s", cache_root, ", ".join(reused) or "nothing")
    return tokenizer, data, UnigramBaseline(prepared["train"].token_counts(len(tokenizer)))


def _phase_data(
    label: str,
    phase: PretrainingPhase,
    prepared: dict[str, PreparedText],
    run_args: Any,
    training_args: Any,
    source: str,
) -> MaskedLmData:
    seq_len = phase.seq_len
    rule = MaskingRule(run_args.mlm_probability, phase.max_predictions_per_seq, run_args.whole_word_mask)
    train = prepared["train"].packed(seq_len)
    validation = prepared["validation"].masked(seq_len, rule, training_args.seed)
    if len(train) == 0:
        raise SettingError("train_file", f"gives no sequence of {seq_len} tokens for {label}", source)
    if len(validation) < run_args.min_validation_sequences:
        raise SettingError(
            "validation_file" if run_args.validation_file else "validation_split_percentage",
            f"gives {len(validation)} validation sequences of {seq_len} tokens for {label}, "
            f"fewer than --min_validation_sequences {run_args.min_validation_sequences}: too small to "
            "evaluate; give more validation text",
            run_args.validation_file or run_args.validation_split_percentage,
        )
    return MaskedLmData(train, validation, rule)


def _fit_micro_batches(
    phases: dict[str, PretrainingPhase], config: Any, run_args: Any, training_args: Any
) -> tuple[dict[str, PretrainingPhase], dict[str, str]]:
    """``--auto_micro_batch``: each phase's largest micro-batch that fits, the smallest any process found; the phases
    with it, and a note per phase of what was tried."""
    import torch.distributed as dist

    from .largest_batch import fit_micro_batch

    world = training_args.world_size
    fitted, notes = {}, {}
    for label, phase in phases.items():
        found = fit_micro_batch(
            lambda: BertForMaskedPositions(config),
            seq_len=phase.seq_len,
            vocab_size=config.vocab_size,
            per_process_batch=phase.global_batch_size // world,
            device=training_args.device,
            margin=run_args.auto_micro_batch_margin,
            field=f"{label}_global_batch_size",
        )
        micro_batch = found.micro_batch
        if dist.is_available() and dist.is_initialized():
            agreed = torch.tensor([micro_batch], device=training_args.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # every process must accumulate alike
            micro_batch = int(agreed.item())
        fitted[label] = dataclasses.replace(phase, per_device_batch_size=micro_batch)
        notes[label] = f" (--auto_micro_batch: {found.describe()})"
    return fitted, notes


def _describe(label: str, phase: PretrainingPhase, data: MaskedLmData, world: int, note: str) -> str:
    return (
        f"{label}: seq {phase.seq_len} ({phase.max_predictions_per_seq} predictions), {len(data.train)} "
        f"sequences; global batch {phase.global_batch_size} = {phase.per_device_batch_size} per device x "
        f"{phase.gradient_accumulation(world)} accumulation x {world} processes{note}"
    )


def _phased_plan(phases: dict[str, PretrainingPhase], data: dict[str, MaskedLmData], world: int) -> PhasedPlan:
    """The run's plan, phase by phase, from the packed data and Trainer's way of counting updates per epoch."""
    planned = []
    for label, phase in phases.items():
        size = len(data[label].train)
        with _named_by_flags(label):
            per_epoch = trainer_steps_per_epoch(
                size, phase.per_device_batch_size, phase.gradient_accumulation(world), world
            )
            planned.append(Phase(label, phase.plan(dataset_size=size, steps_per_epoch=per_epoch)))
    return PhasedPlan(tuple(planned))


def _averaging_interval(run_args: PretrainingArguments, plan: PhasedPlan) -> int:
    """Phase-2 updates between the checkpoints kept for averaging (default: the last N spread over its second half)."""
    steps = plan.phases[-1].plan.total_steps
    last = run_args.average_last
    if last > steps:
        raise SettingError("average_last", f"must be at most phase 2's {steps} updates", last)
    interval = run_args.average_interval or max(1, steps // (2 * max(last, 1)))
    if last and (last - 1) * interval >= steps:
        raise SettingError(
            "average_interval",
            f"leaves fewer than --average_last {last} checkpoints in phase 2's {steps} updates",
            interval,
        )
    return interval


def _train_phases(
    phases, data, plan, config, tokenizer, baseline, training_args, run_args, interval
) -> tuple[Path, list, dict]:
    """Each phase a Trainer run in ``OUTPUT_DIR/<phase>``, the next starting from the last one's final checkpoint; a
    finished phase is skipped and an unfinished one resumed. Returns the final checkpoint, the logs and times."""
    output_dir = Path(training_args.output_dir)
    history, timings = [], {}
    model: BertForMaskedPositions | None = None
    carry: str | None = None
    for index, ((label, phase), planned) in enumerate(zip(phases.items(), plan.phases, strict=True)):
        phase_dir = output_dir / label
        done = completed_checkpoint(phase_dir)
        if done is not None:
            logger.info("%s already finished (%s)", label, done)
            carry, model = str(done), None
            history.append(_saved_history(done))
            continue
        if model is None:
            model = bert_from_checkpoint(carry, config) if carry else BertForMaskedPositions(config)
        trainer = PhaseTrainer(
            model=model,
            args=_phase_arguments(
                training_args, phase, planned, phase_dir, index == len(phases) - 1, run_args, interval
            ),
            train_dataset=data[label].train,
            eval_dataset=data[label].validation,
            data_collator=MaskingCollator(tokenizer, data[label].rule, training_args.seed + index),
            processing_class=tokenizer,
            compute_metrics=MaskedLmMetrics(baseline),
            preprocess_logits_for_metrics=token_scores,
            callbacks=[SaveAtPhaseEnd()],
            carry_from=carry,
            legw_config=phase.config(),
            planned=planned.plan,
        )
        use_console(trainer, label)
        began = time.perf_counter()
        trainer.train(resume_from_checkpoint=get_last_checkpoint(str(phase_dir)) if phase_dir.is_dir() else None)
        timings[label] = time.perf_counter() - began
        last = phase_dir / f"checkpoint-{trainer.state.global_step}"
        if trainer.is_world_process_zero():
            mark_complete(phase_dir, last, planned.plan)
        history.append(trainer.state.log_history)
        carry, model = str(last), trainer.model
    return Path(carry), history, timings


def _phase_arguments(training_args, phase, planned, phase_dir, is_last, run_args, interval):
    """Trainer's arguments for one phase: the run's shape from the same phase object whose config the trainer plans
    with (``legw_config=``); no ``--legw_*`` plan field, so the plan has one source."""
    total = planned.plan.total_steps
    changes = {
        "output_dir": str(phase_dir),
        "per_device_train_batch_size": phase.per_device_batch_size,
        "gradient_accumulation_steps": phase.gradient_accumulation(training_args.world_size),
        "num_train_epochs": planned.plan.epochs,
    }
    if training_args.eval_strategy.value == "steps" and not training_args.eval_steps_given:
        changes["eval_steps"] = max(1, total // 8)
    if is_last and run_args.average_last:
        changes.update(save_strategy="steps", save_steps=interval, save_total_limit=run_args.average_last)
    return dataclasses.replace(training_args, **changes)


def _saved_history(checkpoint: Path) -> list[dict]:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    except (OSError, ValueError, KeyError):
        return []


def _evaluate_and_report(
    training_args, run_args, validation, baseline, final, output_dir, config, plan, history, timings, started, interval
) -> str:
    from .report import evaluate_models, render_report, write_plots

    models = {"last": final}
    if run_args.average_last:
        averaged = output_dir / "averaged"
        with training_args.main_process_first(local=False, desc="averaging checkpoints"):
            if training_args.should_save and not averaged.exists():
                average_checkpoints(final.parent, run_args.average_last, averaged)
        models[f"averaged (last {run_args.average_last}, every {interval} updates)"] = averaged
    results, baselines = evaluate_models(models, validation, baseline, training_args, config)
    evaluations = [entry["eval_mlm_loss"] for logs in history for entry in logs if "eval_mlm_loss" in entry]
    summary = {
        "models": {name: str(path) for name, path in models.items()},
        "validation_loss_during_training": {"first": evaluations[0], "last": evaluations[-1]} if evaluations else None,
        "baselines": baselines,
        "validation": results,
        "seconds": {**timings, "total": time.perf_counter() - started},
        "plan": plan.to_dict(),
    }
    if training_args.should_save:
        write_json(output_dir / "report.json", summary)
        if run_args.plots is None and not _has_matplotlib():
            logger.info("No plots: matplotlib is not installed (pip install 'legw_hf[plot]')")
        elif run_args.plots is not False:
            unigram = [level["unigram_loss"] for level in baselines.values()]
            summary["plots"] = write_plots(output_dir, plan, history, unigram)
    return render_report(summary, output_dir)
