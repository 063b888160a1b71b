"""Elastic resume: a run checkpointed at world size 2 resumed at 1, and 1 → 2, for plain DDP (Trainer), DeepSpeed
ZeRO-2 (Trainer; re-sharded through DeepSpeed's universal checkpoint) and FSDP2 (a loop; torch.distributed.checkpoint),
all three in one DeepSpeed launch per world size.

With the same per-device batch the global batch changes: the LEGW plan is re-derived for it, progress carries over in
epochs, and the change is logged with both plans. With the global batch kept by changing the accumulation, the plan is
unchanged and the resumed run ends where the uninterrupted one does. Scripts: ``tests/scripts/elastic*.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from launch import launch
from legw_oracle import legw_poly_lr
from procs import REPO, python_env

pytestmark = pytest.mark.multiprocess

SCRIPTS = REPO / "tests" / "scripts"
# engine: (dataset size, base batch, base LR, base warmup epochs) of its runs in tests/scripts/elastic_*.py
ENGINES = {
    "ddp": (96, 4, 0.05, 0.1),
    "zero2": (96, 4, 0.05, 0.1),
    "fsdp2": (64, 4, 0.02, 0.25),
}
EPOCHS = 2


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """Every engine's runs (tests/scripts/elastic.py): DeepSpeed's launcher with 1, 2, then 1 processes."""
    output = tmp_path_factory.mktemp("elastic")
    env = {"PYTHONPATH": f"{SCRIPTS}:{REPO / 'tests'}:{python_env()['PYTHONPATH']}"}
    for world, phase in ((1, "first"), (2, "second"), (1, "third")):
        launch("deepspeed", SCRIPTS / "elastic.py", phase, output, processes=world, env=env, cwd=REPO)
    return output


@pytest.fixture(params=list(ENGINES))
def runs(request, output):
    engine = request.param
    folder = output / engine / engine

    def load(name: str, rank: int = 0) -> dict:
        return json.loads((folder / f"{name}.rank{rank}.json").read_text())

    return engine, load


def legw_lrs(engine: str, batch: int, updates: range) -> list[float]:
    """LEGW for the toy runs (tests/legw_oracle.py): poly power 1 decay to 0 at EPOCHS epochs."""
    dataset, base_batch, base_lr, base_warmup = ENGINES[engine]
    schedule = dict(base_lr=base_lr, base_warmup_epochs=base_warmup, epochs=EPOCHS)
    spe = math.ceil(dataset / batch)
    return [legw_poly_lr(u, base_batch=base_batch, batch=batch, steps_per_epoch=spe, **schedule) for u in updates]


def relative(actual: list[float], expected: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(actual, expected, strict=True)) / max(abs(b) for b in expected)


@pytest.mark.parametrize(
    ("name", "old_batch", "new_batch", "saved_update", "first_update"),
    [
        # 1 → 2 processes, 4 per device: batch 4 → 8; 6 updates at 4 are 3 at 8 (the same epochs)
        ("r2-changing", 4, 8, 6, 3),
        # 2 → 1: batch 8 → 4; 5 updates at 8 are 10 at 4
        ("r1-changing", 8, 4, 5, 10),
    ],
)
def test_a_new_world_size_re_derives_the_plan_and_carries_progress_in_epochs(
    runs, name, old_batch, new_batch, saved_update, first_update
):
    engine, load = runs
    run = load(name)
    dataset = ENGINES[engine][0]
    total = EPOCHS * math.ceil(dataset / new_batch)
    assert run["plan"]["batch"] == new_batch and run["plan"]["k"] == new_batch / ENGINES[engine][1]
    assert run["updates"] == total and run.get("global_step", total) == total
    assert run["applied_lrs"] == pytest.approx(legw_lrs(engine, new_batch, range(first_update, total)), rel=1e-9)
    (note,) = [w for w in run["warnings"] if "The LEGW plan changed since the checkpoint" in w]
    assert f"update {saved_update} of the checkpoint's plan is update {first_update} of the current plan" in note
    assert (
        f"checkpoint: LEGW plan (legw): batch {old_batch} " in note
        and f"now:        LEGW plan (legw): batch {new_batch} " in note
    )
    if engine != "fsdp2":  # Trainer's own step count follows
        (step_note,) = [w for w in run["warnings"] if w.startswith("Resuming at another global batch")]
        assert f"({new_batch}, was {old_batch})" in step_note and f"becomes step {first_update} of" in step_note
    if engine == "zero2":  # DeepSpeed refuses a checkpoint of another world size; its universal form re-shards
        assert any("resuming from its universal form" in w for w in run["warnings"])
    if engine == "fsdp2":  # LAMB's moments, gathered whole, are the ones saved
        assert run["moment_error"] == 0.0
    if run["world_size"] == 2:
        other = load(name, rank=1)
        assert other["params"] == run["params"] and other["applied_lrs"] == run["applied_lrs"]


@pytest.mark.parametrize(
    ("name", "uninterrupted", "resumed_at"),
    [
        ("r2-fixed", "u1-fixed", 6),  # 1 process x accumulation 2 -> 2 processes x 1: batch 8 kept
        ("r1-fixed", "u2", 5),  # 2 processes x 1 -> 1 process x accumulation 2
    ],
)
def test_the_same_global_batch_by_accumulation_continues_the_schedule_exactly(runs, name, uninterrupted, resumed_at):
    _, load = runs
    run, reference = load(name), load(uninterrupted)
    assert run["plan"] == reference["plan"] and run["plan"]["batch"] == 8
    assert not [w for w in run["warnings"] if "plan changed" in w or "another global batch" in w]
    assert run["applied_lrs"] == reference["applied_lrs"][resumed_at:]
    # the optimizer state was re-sharded, not restarted: the resumed run ends where the uninterrupted one does
    assert relative(run["params"], reference["params"]) < 1e-5
