"""Every user-facing setting of legw_hf, declared once.

A :class:`Setting` names a value by its Python keyword (``base_batch_size``, ``power``, ``trust_clamp``) and says
what it is (type, choices, help), where it lands (:attr:`Setting.kind`: the tuned :class:`~legw_hf.plan.LegwConfig`,
the decay shape, the run's shape, an optimizer keyword, or a Trainer-only switch), which optimizers take it, and how
each host spells it: the Trainer argument (``--legw_base_batch_size``) and the ``legw-hf plan`` flag
(``--base-batch``). From this table come :class:`~legw_hf.LegwArguments`' fields, the ``legw-hf plan`` flags,
:func:`~legw_hf.get_scheduler`'s keyword check, the optimizer keywords each ``--legw_optimizer`` takes, every error's
renaming into the spelling the user typed, and the flag tables of the documentation. A new setting is one entry here
(plus the code that uses its value).

Plain Python without torch: the ``legw-hf`` command imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .plan import RULES
from .ramp import AutoRamp
from .schedules import DECAYS

Kind = Literal["config", "decay", "run", "optimizer", "trainer"]

#: Names of :data:`legw_hf.optim.choice.OPTIMIZERS` (kept here as data so this module needs no torch; a test
#: checks that the two agree).
OPTIMIZER_NAMES = ("adamw", "sgd", "lamb", "lars")
#: Names of :data:`legw_hf.adascale.MODES` (same arrangement).
ADASCALE_MODES = ("gain", "sqrt_gain", "diagnostics")
#: Preset names of LAMB and LARS (same arrangement; they feed the help text only).
PRESET_NAMES = {"lamb": ("nvidia", "deepspeed", "optax", "paper"), "lars": ("larc", "larc_scale", "optax")}


@dataclass(frozen=True)
class Setting:
    """One setting.

    ``trainer`` is the ``TrainingArguments`` field that carries it (``None``: Trainer does not take it); a name
    without the ``legw_`` prefix is Trainer's own argument (``learning_rate``), which legw_hf reads rather than
    declares. ``cli`` is the ``legw-hf plan`` / ``ds-config`` flag (``None``: not offered there), ``cli_group`` a
    group of those flags of which at most one may be given. ``nargs`` is argparse's (``"+"``, or a count), with
    ``type`` the type of each value; ``metavar`` the value's form in the tables when a type name says too little.
    """

    name: str
    kind: Kind
    type: type
    help: str
    choices: tuple[str, ...] | None = None
    nargs: int | str | None = None
    default: Any = None
    optimizers: tuple[str, ...] = ()
    trainer: str | None = ""
    cli: str | None = None
    cli_group: str | None = None
    cli_repeat: bool = False
    deprecated: str | None = None
    metavar: str | None = None

    @property
    def trainer_argument(self) -> str | None:
        """The Trainer argument: ``trainer`` when declared, else ``legw_<name>``."""
        return f"legw_{self.name}" if self.trainer == "" else self.trainer

    @property
    def declared_by_legw(self) -> bool:
        """Whether :class:`~legw_hf.LegwArguments` declares the Trainer argument (not one of Trainer's own)."""
        return bool(self.trainer_argument and self.trainer_argument.startswith("legw_"))

    def values(self, host: Literal["trainer", "cli"] = "trainer") -> str:
        """The accepted values for a table: ``a|b|c``, a type name, or ``X Y`` for pairs (nothing for an on/off flag
        of the ``legw-hf`` command line)."""
        if self.type is bool and host == "cli":
            return ""
        if self.metavar:
            return self.metavar
        if self.choices:
            return "|".join(self.choices)
        word = {int: "N", float: "X", bool: "true|false", str: "NAME"}[self.type]
        if self.nargs == "+":
            return f"{word} [{word} ...]"
        if isinstance(self.nargs, int):
            return " ".join([word] * self.nargs)
        return word


def _optimizer(name: str, type_: type, help_: str, optimizers: tuple[str, ...], **rest: Any) -> Setting:
    return Setting(name, "optimizer", type_, help_, optimizers=optimizers, **rest)


_LAMB, _LARS, _LAYERWISE = ("lamb",), ("lars",), ("lamb", "lars")

SETTINGS: tuple[Setting, ...] = (
    # ---------------------------------------------------------------- the tuned base run (LegwConfig)
    Setting(
        "base_batch_size",
        "config",
        int,
        "Global batch B0 at which the base LR and the base warmup were tuned; turns LEGW on in Trainer.",
        cli="--base-batch",
    ),
    Setting("base_lr", "config", float, "Peak LR at the base batch.", trainer="learning_rate", cli="--base-lr"),
    Setting(
        "rule",
        "config",
        str,
        "Scaling rule: legw (default: sqrt(k) x LR, k x warmup epochs), sqrt (sqrt(k) x LR), linear (k x LR), none. "
        "AdaScale's gain modes replace it.",
        choices=tuple(RULES),
        cli="--rule",
    ),
    Setting(
        "base_warmup_epochs",
        "config",
        float,
        "Warmup at the base batch, in epochs (or give the base warmup in steps).",
        cli="--base-warmup-epochs",
        cli_group="warmup",
    ),
    Setting(
        "base_warmup_steps",
        "config",
        float,
        "Warmup at the base batch, in optimizer steps at that batch.",
        cli="--base-warmup-steps",
        cli_group="warmup",
    ),
    # ---------------------------------------------------------------- the decay shape (legw_hf.schedules)
    Setting(
        "decay",
        "decay",
        str,
        "Decay shape after warmup (default poly).",
        choices=tuple(DECAYS),
        default="poly",
        cli="--decay",
    ),
    Setting("power", "decay", float, "poly: exponent (default 1); poly_run: exponent (default 0.5).", cli="--power"),
    Setting("end_lr", "decay", float, "poly, cosine: final LR (default 0).", cli="--end-lr"),
    Setting(
        "milestones",
        "decay",
        float,
        "multistep: epochs at which the LR is multiplied by gamma.",
        nargs="+",
        cli="--milestones",
    ),
    Setting("gamma", "decay", float, "multistep (default 0.1), exp (default 0.9): decay factor.", cli="--gamma"),
    Setting(
        "period",
        "decay",
        float,
        "exp: epochs per factor of gamma (default 1).",
        trainer="legw_decay_period",
        cli="--decay-period",
    ),
    Setting("staircase", "decay", bool, "exp: decay in whole periods.", cli="--staircase"),
    # ---------------------------------------------------------------- the run's shape (LegwConfig.plan)
    Setting(
        "batch_size",
        "run",
        int,
        "Global batch of the run: samples per optimizer update, all processes. Trainer forms it from per-device "
        "batch x accumulation x processes; given, it is checked against that.",
        trainer="legw_global_batch_size",
        cli="--batch",
        cli_repeat=True,
    ),
    Setting(
        "dataset_size",
        "run",
        int,
        "Examples per epoch (in Trainer: only for train datasets without a length, e.g. streaming).",
        cli="--dataset-size",
    ),
    Setting(
        "epochs",
        "run",
        float,
        "Training length in epochs, the same at every batch.",
        trainer="num_train_epochs",
        cli="--epochs",
        cli_group="length",
    ),
    Setting(
        "base_steps",
        "run",
        int,
        "Training length in optimizer steps at the base batch (the base run's length; the same epochs at every "
        "batch). In Trainer it sets the run's steps, so leave --num_train_epochs and --max_steps unset.",
        cli="--base-steps",
        cli_group="length",
    ),
    Setting(
        "steps",
        "run",
        int,
        "Training length in optimizer steps at the run's batch (Trainer's --max_steps).",
        trainer="max_steps",
        cli="--steps",
        cli_group="length",
    ),
    Setting(
        "drop_last",
        "run",
        bool,
        "Drop the last partial batch of an epoch.",
        trainer="dataloader_drop_last",
        cli="--drop-last",
    ),
    Setting("steps_per_epoch", "run", int, "Updates per epoch of the real dataloader.", trainer=None),
    Setting(
        "batch_ramp",
        "run",
        str,
        "A global batch that grows during the run: comma-separated batch@epoch stages (8@0,16@1,32@2: batch 8 from "
        "the start, 16 from epoch 1, 32 from epoch 2). Each update takes the batch of the stage its progress starts "
        "in and LEGW's LR for that batch; the per-device batch stays fixed and the accumulation follows the stage. "
        "The length is --num_train_epochs. In Trainer also auto: the batch doubles during the run while the measured "
        "gradient noise scale says doubling is efficient (--legw_ramp_max_batch and the other --legw_ramp_* flags).",
        trainer="legw_batch_ramp",
        cli="--batch-ramp",
        metavar="B@EPOCH[,B@EPOCH...]",
    ),
    Setting(
        "micro_step_samples",
        "run",
        int,
        "A ramp's micro-batch step over all processes (per-device batch x processes), in samples: each stage "
        "accumulates batch / this many (default: the greatest common divisor of the stage batches).",
        trainer=None,
        cli="--micro-step",
    ),
    # ---------------------------------------------------------------- the optimizer (legw_hf.optim.choice)
    Setting(
        "optimizer",
        "trainer",
        str,
        "Optimizer to build instead of --optim's: adamw, sgd, lamb or lars.",
        choices=OPTIMIZER_NAMES,
    ),
    _optimizer(
        "preset",
        str,
        f"Reference implementation to follow: lamb {', '.join(PRESET_NAMES['lamb'])}; lars "
        f"{', '.join(PRESET_NAMES['lars'])} (see legw_hf.Lamb, legw_hf.Lars).",
        _LAYERWISE,
        trainer="legw_optimizer_preset",
    ),
    # adamw takes these from Trainer's own --adam_beta1/--adam_beta2/--adam_epsilon in a Trainer run
    _optimizer("betas", float, "lamb: Adam's beta1 beta2 (the preset's).", ("adamw", "lamb"), nargs=2),
    _optimizer("eps", float, "lamb, lars: epsilon (the preset's).", ("adamw", *_LAYERWISE)),
    _optimizer("momentum", float, "Momentum (sgd 0.9; lars the preset's).", ("sgd", "lars")),
    _optimizer("nesterov", bool, "Nesterov momentum.", ("sgd", "lars")),
    _optimizer(
        "bias_correction",
        str,
        "Where Adam's bias correction goes: inside the update, on the step size after the trust ratio "
        "(DeepSpeed), or off.",
        _LAMB,
        choices=("inside", "step_size", "off"),
    ),
    _optimizer("eps_inside_sqrt", bool, "Epsilon inside the square root of the second moment.", _LAMB),
    _optimizer(
        "weight_decay_mode",
        str,
        "decoupled (u = r + wd x p) or l2 (wd x p added to the gradient before the moments).",
        _LAMB,
        choices=("decoupled", "l2"),
    ),
    _optimizer("grad_averaging", bool, "The first moment takes (1 - beta1) x g; false adds g itself.", _LAMB),
    _optimizer(
        "max_grad_norm",
        float,
        "Global gradient pre-normalisation max norm, 0 = off (the preset's; nvidia 1.0). When it is on, Trainer's "
        "--max_grad_norm clipping (and DeepSpeed's) is turned off.",
        _LAMB,
        trainer="legw_lamb_max_grad_norm",
    ),
    _optimizer(
        "trust_clamp", float, "min max bounds of the trust ratio (the preset's; deepspeed 0.01 10).", _LAMB, nargs=2
    ),
    _optimizer("trust_coefficient", float, "LARS trust coefficient (the preset's).", _LARS),
    _optimizer(
        "trust_denominator",
        str,
        "The trust ratio's denominator: norm_sum (LARC: |g| + wd|p| + eps) or update_norm (optax: |g + wd p| + eps).",
        _LARS,
        choices=("norm_sum", "update_norm"),
    ),
    _optimizer("local_lr_clip", bool, "LARC's clip mode: the local LR never exceeds the global one.", _LARS),
    _optimizer("lr_before_momentum", bool, "optax's order: the momentum buffer holds LR-scaled steps.", _LARS),
    _optimizer(
        "adapt", str, "Trust ratio for every tensor, or only for decayed ones.", _LAYERWISE, choices=("all", "decayed")
    ),
    _optimizer("master_weights", bool, "fp32 master copies of fp16/bf16 parameters.", _LAYERWISE),
    _optimizer(
        "impl",
        str,
        "The implementation of the step (default: chosen from the tensors): lamb reference, foreach, fused_adam, "
        "cpu (legw_hf's kernel, fp32 CPU tensors), triton (CUDA; pip install 'legw_hf[gpu]'); lars reference, "
        "foreach, triton.",
        _LAYERWISE,
        choices=("reference", "foreach", "fused_adam", "cpu", "triton"),
        trainer="legw_optimizer_impl",
    ),
    _optimizer(
        "fused",
        str,
        "legw_hf's fused kernels: cpu (lamb), triton, off (torch ops only).",
        _LAYERWISE,
        choices=("cpu", "triton", "off"),
        deprecated="use --legw_optimizer_impl (cpu, triton; off: leave it unset or pick foreach / fused_adam).",
    ),
    # ---------------------------------------------------------------- Trainer-only switches
    Setting(
        "trust_log",
        "trainer",
        str,
        "lamb, lars: trust ratios in the logs: min/median/max, per layer, or none.",
        choices=("summary", "per_layer", "off"),
        default="summary",
    ),
    Setting(
        "adascale",
        "trainer",
        str,
        "gain: AdaScale's LR (r x the base run's schedule at the scale-invariant progress; SGD, LARS); sqrt_gain: "
        "sqrt(r) on Adam-preconditioned statistics (AdamW, LAMB); both replace the LEGW rule and need "
        "--legw_base_batch_size, the batch the schedule was tuned at. diagnostics: log noise_scale/b_simple, "
        "adascale/gain and adascale/efficiency beside any schedule.",
        choices=ADASCALE_MODES,
    ),
    Setting(
        "adascale_scale",
        "trainer",
        float,
        "Expected scale S = global batch / --legw_base_batch_size, checked against the run.",
    ),
    # the automatic batch ramp (--legw_batch_ramp auto): legw_hf.ramp.AutoRamp's keywords
    Setting(
        "max_batch",
        "trainer",
        int,
        "--legw_batch_ramp auto: the largest batch the ramp may reach, the start batch times a power of 2 (required).",
        trainer="legw_ramp_max_batch",
    ),
    Setting(
        "start_batch",
        "trainer",
        int,
        "--legw_batch_ramp auto: the first batch (default per-device batch x processes); it must give at least 2 "
        "gradient estimates per update (start batch / per-device batch >= 2).",
        trainer="legw_ramp_start_batch",
    ),
    Setting(
        "efficiency",
        "trainer",
        float,
        "--legw_batch_ramp auto: the batch B doubles while doubling is at least this efficient by the measured noise "
        "scale, (B + B_simple) / (2B + B_simple) >= X; in (0.5, 1).",
        default=AutoRamp.efficiency,
        trainer="legw_ramp_efficiency",
    ),
    Setting(
        "patience",
        "trainer",
        int,
        "--legw_batch_ramp auto: updates at a batch, from the start and after each change, before the next decision.",
        default=AutoRamp.patience,
        trainer="legw_ramp_patience",
    ),
    Setting(
        "log",
        "trainer",
        str,
        "--legw_batch_ramp auto: the file each change is written to as a JSON line, by the main process (default "
        "output_dir/legw_ramp_decisions.jsonl; a resumed run starts it again from the checkpoint's changes).",
        trainer="legw_ramp_log",
        metavar="FILE",
    ),
)

SETTING: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def settings_of(*kinds: Kind) -> tuple[Setting, ...]:
    """The settings of the given kinds, in declaration order."""
    return tuple(setting for setting in SETTINGS if setting.kind in kinds)


def names_of(*kinds: Kind) -> tuple[str, ...]:
    return tuple(setting.name for setting in settings_of(*kinds))


def optimizer_keywords(optimizer: str) -> tuple[str, ...]:
    """The keywords optimizer ``optimizer`` takes from a caller (besides ``lr`` and weight decay)."""
    return tuple(s.name for s in settings_of("optimizer") if optimizer in s.optimizers)


def trainer_argument(name: str) -> str:
    """How Trainer's arguments spell setting ``name`` (the name itself for anything else, e.g. ``betas[0]``)."""
    setting = SETTING.get(name.split("[")[0])
    return setting.trainer_argument if setting is not None and setting.trainer_argument else name


def cli_flag(name: str) -> str:
    """How ``legw-hf``'s flags spell setting ``name``: its declared flag, else ``--name-with-dashes``."""
    setting = SETTING.get(name)
    if setting is not None and setting.cli:
        return setting.cli
    return "--" + name.replace("_", "-")


#: The LEGW settings that shape a plan (config, decay and run kinds).
PLAN_SETTINGS = settings_of("config", "decay", "run")


def markdown_table(host: Literal["trainer", "cli"], selectors: tuple[str, ...]) -> str:
    """The documentation's table of the settings ``selectors`` pick (kinds or setting names), in declaration order,
    as ``host`` spells them: flag and values, default, the optimizers that take it (when any does), meaning."""
    chosen = [s for s in SETTINGS if s.kind in selectors or s.name in selectors]
    if host == "trainer":
        chosen = [s for s in chosen if s.declared_by_legw]
    else:
        chosen = [s for s in chosen if s.cli]
    with_optimizers = any(s.optimizers for s in chosen)
    header = ["flag", "default", *(["optimizers"] if with_optimizers else []), "meaning"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in chosen:
        flag = f"--{setting.trainer_argument}" if host == "trainer" else setting.cli
        cells = [
            "`" + f"{flag} {setting.values(host)}".strip().replace("|", "\\|") + "`",
            "—" if setting.default is None else f"`{setting.default}`",
        ]
        if with_optimizers:
            cells.append(", ".join(setting.optimizers) or "—")
        note = f" Deprecated: {setting.deprecated}" if setting.deprecated else ""
        cells.append((setting.help + note).replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


__all__ = [
    "PLAN_SETTINGS",
    "SETTING",
    "SETTINGS",
    "Setting",
    "cli_flag",
    "markdown_table",
    "names_of",
    "optimizer_keywords",
    "settings_of",
    "trainer_argument",
]
