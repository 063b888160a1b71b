"""The plan a run used, kept with its outputs: ``legw_plan.json`` in the output directory.

The file is a JSON list with one entry per plan the run followed, oldest first. Each entry holds the keys of
``legw-hf plan --json`` (``batch``, ``k``, ``rule``, ``peak_lr``, ``warmup_epochs``, ``warmup_steps``,
``steps_per_epoch``, ``total_steps``, ``epochs``, ``decay``), ``from_update`` (the optimizer update at which the run
started to follow it; ``null`` for a plan known only from the checkpoint a run resumed from) and ``plan``, the
whole plan as :meth:`~legw_hf.plan.LegwPlan.to_dict` writes it (``legw_hf.plan_from_dict`` rebuilds it). A batch
ramp's entry (:class:`~legw_hf.ramp.RampedPlan`) holds ``ramp`` (its text), ``stages`` (one row per stage: batch, k,
accumulation, first update, updates, start epoch, peak LR, warmup epochs), ``total_steps`` and ``epochs`` instead of
the one batch's keys.

A run that resumes with the plan it saved adds nothing; one that resumes with another plan (say, a new batch
size) adds an entry, after the checkpoint's own plan if the file does not end with it. Entries already in the
file are never changed or dropped, and the file is replaced in one rename, so a crash leaves the old file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .plan import LegwPlan, plan_from_dict
from .ramp import RampedPlan

PLAN_FILE = "legw_plan.json"


def replace_file(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and one rename: readers see the old file or
    the new one, never half of one, and a crash leaves the old file."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as handle:
        handle.write(text)
    os.replace(handle.name, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON, written whole (:func:`replace_file`)."""
    replace_file(path, json.dumps(data, indent=2) + "\n")


def plan_entry(plan: LegwPlan | RampedPlan, from_update: int | None) -> dict[str, Any]:
    if isinstance(plan, RampedPlan):
        summary = {"ramp": plan.ramp.to_text(), "stages": plan.summary(), "total_steps": plan.total_steps}
        return {**summary, "epochs": plan.epochs, "from_update": from_update, "plan": plan.to_dict()}
    return {**plan.summary(), "from_update": from_update, "plan": plan.to_dict()}


def read_plan_record(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``directory``'s plan file, or ``[]`` when there is none."""
    path = Path(directory) / PLAN_FILE
    if not path.exists():
        return []
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "plan" in e for e in entries):
        raise ValueError(f"{path} is not a legw_hf plan record (a JSON list of plan entries)")
    return entries


def record_plan(
    directory: str | os.PathLike,
    plan: LegwPlan | RampedPlan,
    *,
    from_update: int,
    checkpoint_plan: dict[str, Any] | None = None,
) -> Path:
    """Add ``plan`` to ``directory``'s plan file unless it already ends with it; returns the file's path.

    ``checkpoint_plan`` is the plan (as a dict) of the checkpoint the run resumed from, when it differs from
    ``plan``: it is recorded first if the file does not already end with it.
    """
    directory = Path(directory)
    entries = read_plan_record(directory)
    current = plan.to_dict()
    if (
        checkpoint_plan is not None
        and checkpoint_plan != current
        and (not entries or entries[-1]["plan"] != checkpoint_plan)
    ):
        entries.append(plan_entry(plan_from_dict(checkpoint_plan), None))
    path = directory / PLAN_FILE
    if entries and entries[-1]["plan"] == current:
        return path
    entries.append(plan_entry(plan, from_update))
    directory.mkdir(parents=True, exist_ok=True)
    write_json(path, entries)
    return path
