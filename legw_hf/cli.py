"""``legw-hf``: see a LEGW plan before training.

    legw-hf plan --base-batch 1024 --base-lr 5.657 --base-warmup-epochs 0.3125 --epochs 90 \\
        --dataset-size 1281167 --batch 4096 --batch 32768 [--rule legw] [--decay poly --power 2] [--json]

Bad settings print one line, ``legw-hf plan: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import SettingError
from .plan import RULES, LegwConfig, LegwPlan
from .schedules import DECAY_OPTIONS, DECAYS, make_decay

# Core setting name -> the flag that sets it, so errors name what the user typed.
_FLAG_FOR_SETTING = {
    "base_batch_size": "--base-batch",
    "base_lr": "--base-lr",
    "base_warmup_epochs": "--base-warmup-epochs",
    "base_warmup_steps": "--base-warmup-steps",
    "epochs": "--epochs",
    "base_steps": "--base-steps",
    "dataset_size": "--dataset-size",
    "batch_size": "--batch",
    "rule": "--rule",
    "decay": "--decay",
    "power": "--power",
    "end_lr": "--end-lr",
    "milestones": "--milestones",
    "gamma": "--gamma",
    "period": "--decay-period",
    "staircase": "--staircase",
}

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


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="legw-hf", description="Large-batch training helpers for HuggingFace.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    plan = commands.add_parser("plan", help="print the LEGW plan for one or more target batch sizes")
    plan.add_argument("--base-batch", type=int, required=True, help="global batch B0 the base run was tuned at")
    plan.add_argument("--base-lr", type=float, required=True, help="peak LR at B0")
    warmup = plan.add_mutually_exclusive_group(required=True)
    warmup.add_argument("--base-warmup-epochs", type=float, help="warmup at B0, in epochs")
    warmup.add_argument("--base-warmup-steps", type=float, help="warmup at B0, in optimizer steps")
    length = plan.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=float, help="training length in epochs (the same at every batch)")
    length.add_argument("--base-steps", type=int, help="training length in optimizer steps at B0")
    plan.add_argument("--dataset-size", type=int, required=True, help="examples per epoch N")
    plan.add_argument("--batch", type=int, action="append", required=True, help="target global batch (repeatable)")
    plan.add_argument("--rule", choices=tuple(RULES), default="legw")
    plan.add_argument("--drop-last", action="store_true", help="drop the last partial batch of an epoch")
    plan.add_argument("--decay", choices=tuple(DECAYS), default="poly")
    plan.add_argument("--power", type=float, help="poly: exponent (default 1)")
    plan.add_argument("--end-lr", type=float, help="poly, cosine: final LR (default 0)")
    plan.add_argument("--milestones", type=float, nargs="+", help="multistep: epochs where the LR is times --gamma")
    plan.add_argument("--gamma", type=float, help="multistep, exp: decay factor")
    plan.add_argument("--decay-period", type=float, help="exp: epochs per factor of gamma (default 1)")
    plan.add_argument("--staircase", action="store_true", default=None, help="exp: decay in whole periods")
    plan.add_argument("--json", action="store_true", help="print a JSON list, one object per batch")
    plan.add_argument("--plot", metavar="FILE.png", help="write a PNG of LR against epochs and steps")
    return parser


def _plans(args: argparse.Namespace) -> list[LegwPlan]:
    decay = make_decay(
        args.decay,
        **{option: getattr(args, _FLAG_FOR_SETTING[option][2:].replace("-", "_")) for option in DECAY_OPTIONS},
    )
    config = LegwConfig(
        base_batch_size=args.base_batch,
        base_lr=args.base_lr,
        base_warmup_epochs=args.base_warmup_epochs,
        base_warmup_steps=args.base_warmup_steps,
        rule=args.rule,
        decay=decay,
    )
    return [
        config.plan(
            batch_size=batch,
            dataset_size=args.dataset_size,
            epochs=args.epochs,
            base_steps=args.base_steps,
            drop_last=args.drop_last,
        )
        for batch in args.batch
    ]


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
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        plans = _plans(args)
        if args.plot:
            _plot(plans, args.plot)
    except SettingError as error:
        flag = _FLAG_FOR_SETTING.get(error.field, error.field)
        parser.exit(2, f"legw-hf {args.command}: error: {error.renamed(flag)}\n")
    if args.json:
        print(json.dumps([plan.summary() for plan in plans], indent=2))
    else:
        print(_table(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
