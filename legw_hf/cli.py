"""``legw-hf``: see a LEGW plan before training, and write the DeepSpeed config and launch files of a cluster.

    legw-hf plan --base-batch 1024 --base-lr 5.657 --base-warmup-epochs 0.3125 --epochs 90 \\
        --dataset-size 1281167 --batch 4096 --batch 32768 [--rule legw] [--decay poly --power 2] [--json]
    legw-hf plan --recipe bert-large-phase1              # a shipped recipe's base settings and batches
    legw-hf ds-config --global-batch 65536 --nodes 64 --gpus-per-node 8 --micro-batch 64 [--zero 1] \\
        [--precision fp16|bf16] [--offload-optimizer none|cpu] [--output ds.json] [--recipe bert-large-phase1]
    legw-hf batch-flags --global-batch 65536 --nodes 64 --gpus-per-node 8 --micro-batch 64   # Trainer's flags
    legw-hf launch-check [--hostfile hostfile] [--accelerate-config node.yaml] [--nodes N --gpus-per-node G]
    legw-hf recipes [--copy DIR]                         # list (or copy) the shipped configs and launch files
    legw-hf average-checkpoints RUN_DIR --last N [--output DIR]   # Popel & Bojar's checkpoint averaging
    legw-hf pretrain [Trainer and program flags]         # two-phase BERT pretraining (legw_hf.pretraining)

Bad settings print one line, ``legw-hf <command>: error: ...``, and exit with status 2, before any file is written.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import SettingError
from .integrations import deepspeed as ds  # plain Python: writing a config needs no DeepSpeed
from .launch import LaunchWorld, agreed_world, read_accelerate_config, read_hostfile, world_of
from .plan import LegwConfig, LegwPlan
from .ramp import BatchRamp, RampedPlan, ramped_plan
from .recipes import PHASES, PretrainingPhase, phase, recipe_files
from .schedules import DECAY_OPTIONS, make_decay
from .settings import PLAN_SETTINGS, SETTING, Setting, cli_flag

# Fields of errors that are not a flag's destination, and the flag to name instead.
_FLAG_EXCEPTIONS = {"processes_per_node": "--gpus-per-node"}


def _flag_namer(parser: argparse.ArgumentParser, command: str) -> Callable[[str], str]:
    """How ``command``'s command line spells each field, so errors name what the user typed: the flag (or the
    positional's metavar) whose destination the field is; other names as they are."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = dict(_FLAG_EXCEPTIONS)
    for action in commands.choices[command]._actions:
        flags[action.dest] = action.option_strings[0] if action.option_strings else action.dest.upper()
    return lambda field: flags.get(field, field)


# (summary key, column width, number format)
_TABLE_COLUMNS = (
    ("batch", 8, "d"),
    ("k", 8, "g"),
    ("peak_lr", 12, ".6g"),
    ("warmup_epochs", 14, ".6g"),
    ("warmup_steps", 13, "d"),
    ("steps_per_epoch", 16, "d"),
    ("total_steps", 12, "d"),
)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_setting(parser: Any, setting: Setting) -> None:
    if setting.type is bool:
        parser.add_argument(setting.cli, dest=setting.name, action="store_true", default=None, help=setting.help)
        return
    parser.add_argument(
        setting.cli,
        dest=setting.name,
        type=setting.type,
        choices=setting.choices,
        nargs=setting.nargs,
        action="append" if setting.cli_repeat else None,
        help=setting.help + (" (repeatable)" if setting.cli_repeat else ""),
    )


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """The LEGW settings (:data:`legw_hf.settings.PLAN_SETTINGS`), shared by ``plan`` and ``ds-config``; a
    ``--recipe`` supplies the ones not given. The run's batch is ``plan``'s ``--batch`` / ``ds-config``'s
    ``--global-batch``."""
    parser.add_argument("--recipe", choices=tuple(PHASES), help="a shipped pretraining phase's base settings")
    groups: dict[str, Any] = {}
    for setting in PLAN_SETTINGS:
        if setting.cli is None or setting.cli_repeat:
            continue
        if setting.cli_group is not None and setting.cli_group not in groups:
            groups[setting.cli_group] = parser.add_mutually_exclusive_group()
        _add_setting(groups.get(setting.cli_group, parser), setting)


def _add_world_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, help="number of nodes (machines)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs (processes) per node")
    parser.add_argument("--hostfile", help="a DeepSpeed hostfile ('host slots=N' lines) to read the nodes from")
    parser.add_argument("--accelerate-config", help="an accelerate launch config to read the machines from")


def _choices(values: Sequence) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` page opens with the summary ``legw-hf --help`` lists for it."""
    return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="legw-hf", description="Large-batch training helpers for HuggingFace.")
    parser.add_argument("--version", action="version", version=f"legw-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    plan = _command(commands, "plan", "print the LEGW plan for one or more target batch sizes")
    _add_plan_flags(plan)
    _add_setting(plan, SETTING["batch_size"])
    plan.add_argument("--json", action="store_true", help="print a JSON list, one object per batch")
    plan.add_argument("--plot", metavar="FILE.png", help="write a PNG of LR against epochs and steps")

    config = _command(
        commands, "ds-config", "write a DeepSpeed config for a global batch on a cluster, with its LEGW plan"
    )
    config.add_argument("--global-batch", type=int, required=True, help="samples per optimizer update, all GPUs")
    _add_world_flags(config)
    config.add_argument("--micro-batch", type=int, required=True, help="samples per GPU per forward/backward")
    # the library checks the values (one line naming the flag); the metavars list them in --help
    config.add_argument("--zero", type=int, default=1, metavar=_choices(ds.ZERO_STAGES), help="ZeRO stage (default 1)")
    config.add_argument(
        "--precision",
        default="fp16",
        metavar=_choices(ds.PRECISIONS),
        help="fp16 (dynamic loss scale, default) or bf16",
    )
    config.add_argument(
        "--offload-optimizer",
        default="none",
        metavar=_choices(ds.OFFLOAD_DEVICES),
        help="cpu: ZeRO-Offload (default none)",
    )
    config.add_argument("--output", help="the config file to write (refused if it exists); default stdout")
    _add_plan_flags(config)

    flags = _command(
        commands,
        "batch-flags",
        "print the Trainer batch flags that form a global batch on a cluster (for launch scripts)",
    )
    flags.add_argument("--global-batch", type=int, required=True, help="samples per optimizer update, all GPUs")
    _add_world_flags(flags)
    flags.add_argument("--micro-batch", type=int, required=True, help="samples per GPU per forward/backward")

    check = _command(commands, "launch-check", "check that hostfile, accelerate config and flags agree")
    _add_world_flags(check)

    average = _command(
        commands, "average-checkpoints", "average the weights of a run's last N checkpoints into a model directory"
    )
    average.add_argument("run_dir", help="the Trainer output directory holding checkpoint-N folders")
    average.add_argument("--last", type=int, required=True, help="how many of the newest checkpoints to average")
    average.add_argument("--output", help="model directory to write (must not exist; default RUN_DIR/averaged-last-N)")

    commands.add_parser(
        "pretrain", add_help=False, help="two-phase BERT pretraining with LEGW + LAMB (legw-hf pretrain --help)"
    )
    recipes = _command(commands, "recipes", "list the shipped DeepSpeed configs and launch files")
    recipes.add_argument("--copy", metavar="DIR", help="copy them into DIR (existing files are left as they are)")
    return parser


def _missing(flags: list[str], recipe_hint: bool = True) -> SettingError:
    hint = " (or pass --recipe)" if recipe_hint else ""
    return SettingError(flags[0], f"is required{hint}", None, detail=f"missing: {', '.join(flags)}")


def _config_and_run(args: argparse.Namespace) -> tuple[LegwConfig, dict, PretrainingPhase | None]:
    """The config and the run's shape (dataset size, length) from the flags, filled in by ``--recipe``."""
    recipe = phase(args.recipe) if args.recipe else None
    base = recipe.config() if recipe else None
    options = {option: getattr(args, option) for option in DECAY_OPTIONS}
    if args.decay is None and base is not None and not any(v is not None for v in options.values()):
        decay = base.decay
    else:
        decay = make_decay(args.decay or "poly", **options)
    warmup_given = args.base_warmup_epochs is not None or args.base_warmup_steps is not None
    settings = {
        name: getattr(args, name) if getattr(args, name) is not None else base and getattr(base, name)
        for name in ("base_batch_size", "base_lr")
    }
    for name in ("base_warmup_epochs", "base_warmup_steps"):
        settings[name] = getattr(args, name) if warmup_given or not base else getattr(base, name)
    missing = [cli_flag(name) for name in ("base_batch_size", "base_lr") if settings[name] is None]
    if not warmup_given and base is None:
        missing.append(f"{cli_flag('base_warmup_epochs')} or {cli_flag('base_warmup_steps')}")
    lengths = ("epochs", "base_steps", "steps")
    length_given = any(getattr(args, name) is not None for name in lengths)
    if not length_given and recipe is None:
        missing.append(" or ".join(map(cli_flag, lengths)))
    if args.dataset_size is None and recipe is None:
        missing.append(cli_flag("dataset_size"))
    if missing:
        raise _missing(missing)
    config = LegwConfig(rule=args.rule or "legw", decay=decay, **settings)
    run: dict = {"drop_last": bool(args.drop_last)}
    if length_given:
        size = args.dataset_size if args.dataset_size is not None else recipe.dataset_size
        run.update(dataset_size=size, **{name: getattr(args, name) for name in lengths})
    else:
        run.update(recipe.length(args.dataset_size))
    return config, run, recipe


def _plans(args: argparse.Namespace) -> list[LegwPlan]:
    config, run, recipe = _config_and_run(args)
    if args.batch_ramp is not None:
        return [_ramped(args, config, run)]
    batches = args.batch_size or (list(recipe.global_batches) if recipe else None)
    if not batches:
        raise _missing([cli_flag("batch_size")])
    return [config.plan(batch_size=batch, **run) for batch in batches]


def _ramped(args: argparse.Namespace, config: LegwConfig, run: dict) -> RampedPlan:
    """``plan --batch-ramp``: the ramped run's plan, every stage (its batch, accumulation, updates, LR range)."""
    for name in ("batch_size", "plot"):
        if getattr(args, name):
            raise SettingError(name, "cannot be combined with --batch-ramp (the ramp gives the run's batches)", True)
    if run.get("epochs") is None:
        raise SettingError("epochs", "is the length a --batch-ramp run takes (its stages start at epochs)", None)
    ramp = BatchRamp.parse(args.batch_ramp)
    micro_step = args.micro_step_samples or math.gcd(*(stage.batch_size for stage in ramp.stages))
    return ramped_plan(
        config, ramp, dataset_size=run["dataset_size"], epochs=run["epochs"], micro_step_samples=micro_step
    )


def _world(args: argparse.Namespace) -> LaunchWorld:
    worlds = []
    if args.hostfile:
        worlds.append(read_hostfile(args.hostfile))
    if args.accelerate_config:
        worlds.append(read_accelerate_config(args.accelerate_config))
    if args.nodes is not None or args.gpus_per_node is not None:
        if args.nodes is None or args.gpus_per_node is None:
            raise _missing(["--nodes" if args.nodes is None else "--gpus-per-node"], recipe_hint=False)
        for flag, value in (("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node)):
            if value < 1:
                raise SettingError(flag, "must be an integer >= 1", value)
        worlds.append(world_of(args.nodes, args.gpus_per_node))
    if not worlds:
        raise _missing(["--nodes and --gpus-per-node", "--hostfile", "--accelerate-config"], recipe_hint=False)
    return agreed_world(worlds)


def _split(args: argparse.Namespace) -> ds.BatchSplit:
    world = _world(args)
    return ds.split_global_batch(
        args.global_batch, nodes=world.nodes, gpus_per_node=world.processes_per_node, micro_batch=args.micro_batch
    )


def _ds_config(args: argparse.Namespace) -> str:
    if args.output and Path(args.output).exists():
        raise SettingError("output", "must not exist already (legw-hf never overwrites a file)", args.output)
    split = _split(args)
    config = ds.deepspeed_config(
        zero=args.zero, precision=args.precision, offload_optimizer=args.offload_optimizer, split=split
    )
    if not args.recipe and args.base_batch_size is None:
        args.recipe = "bert-large-phase1"
    if args.batch_ramp is not None or args.micro_step_samples is not None:
        raise SettingError(
            "batch_ramp" if args.batch_ramp is not None else "micro_step_samples",
            "is not offered by ds-config: the config it writes fixes one global batch; run a batch ramp with a "
            'config that leaves the batch and accumulation "auto", as the shipped ones do (legw_hf/recipes/deepspeed)',
            args.batch_ramp or args.micro_step_samples,
        )
    legw_config, run, _ = _config_and_run(args)
    plan = legw_config.plan(batch_size=split.global_batch, **run)
    text = json.dumps(config, indent=2) + "\n"
    summary = [
        split.describe(),
        f"Trainer flags: {split.trainer_flags()} (world size {split.world_size})",
        f"DeepSpeed: ZeRO-{args.zero}, {args.precision}, optimizer offload {args.offload_optimizer}; no optimizer or "
        "scheduler block: the client LAMB and the LEGW plan; gradient_clipping 0 (LAMB pre-normalises)",
        plan.describe(),
    ]
    if args.output:
        _write_new(Path(args.output), text)
        summary.insert(0, f"wrote {args.output}")
        return "\n".join(summary)
    print("\n".join(summary), file=sys.stderr)
    return text.rstrip("\n")


def _write_new(path: Path, text: str) -> None:
    try:
        with path.open("x") as file:  # "x": fails rather than replace a file that appeared meanwhile
            file.write(text)
    except OSError as error:
        raise SettingError("output", f"must be a new, writable file path ({error.strerror})", str(path)) from None


def _recipes(args: argparse.Namespace) -> str:
    files = recipe_files()
    if not args.copy:
        return "\n".join(str(path) for path in files)
    target = Path(args.copy)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingError("copy", f"must be a directory legw-hf can create ({error.strerror})", args.copy) from None
    lines = []
    for path in files:
        destination = target / path.parent.name / path.name
        destination.parent.mkdir(exist_ok=True)
        if destination.exists():
            lines.append(f"kept   {destination} (exists)")
            continue
        shutil.copy2(path, destination)
        lines.append(f"copied {destination}")
    return "\n".join(lines)


def _table(plans: list[LegwPlan]) -> str:
    header = "".join(f"{name:>{width}}" for name, width, _ in _TABLE_COLUMNS)
    rows = ["".join(f"{plan.summary()[name]:>{width}{spec}}" for name, width, spec in _TABLE_COLUMNS) for plan in plans]
    first = plans[0]
    title = (
        f"rule {first.rule}, base batch {first.base_batch_size}, base LR {first.base_lr:g}, "
        f"base warmup {first.base_warmup_epochs:g} epochs, {first.epochs:g} epochs, {first.decay.name} decay"
    )
    return "\n".join([title, header, *rows])


def _plot(plans: list[LegwPlan], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SettingError("--plot", "needs matplotlib (pip install 'legw_hf[plot]')", path) from None
    fig, (by_epoch, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for plan in plans:
        updates = range(plan.total_steps)
        lrs = [plan.lr_for_update(n) for n in updates]
        label = f"batch {plan.batch_size}"
        by_epoch.plot([(n + 1) / plan.steps_per_epoch for n in updates], lrs, label=label)
        by_step.plot([n + 1 for n in updates], lrs, label=label)
    by_epoch.set(xlabel="epochs", ylabel="learning rate", title="LR against epochs")
    by_step.set(xlabel="optimizer steps", ylabel="learning rate", title="LR against steps", xscale="log")
    by_epoch.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as error:
        raise SettingError("--plot", f"must be a writable file path ({error.strerror})", path) from None
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain"]:  # its own parser: every Trainer flag plus the program's
        from .pretraining.program import main as pretrain

        return pretrain(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            plans = _plans(args)
            if args.plot:
                _plot(plans, args.plot)
            if isinstance(plans[0], RampedPlan):
                output = json.dumps(plans[0].to_dict(), indent=2) if args.json else plans[0].describe()
            else:
                output = json.dumps([p.summary() for p in plans], indent=2) if args.json else _table(plans)
        elif args.command == "ds-config":
            output = _ds_config(args)
        elif args.command == "batch-flags":
            output = _split(args).trainer_flags()
        elif args.command == "launch-check":
            world = _world(args)
            output = f"{world.nodes} nodes, {world.world_size} processes: the sources agree"
        elif args.command == "average-checkpoints":
            from .averaging import average_checkpoints  # needs torch

            output = f"wrote {average_checkpoints(args.run_dir, args.last, args.output)}"
        else:
            output = _recipes(args)
    except SettingError as error:
        flagged = error.renamed_by(_flag_namer(parser, args.command))
        parser.exit(2, f"legw-hf {args.command}: error: {flagged}\n")
    print(output)
    return 0


def run() -> None:
    """The ``legw-hf`` command: :func:`main`, then the process ends through :func:`legw_hf.shutdown.exit_process`
    (``pretrain`` may have run several processes over gloo)."""
    from .shutdown import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
