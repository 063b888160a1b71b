"""Resuming a Trainer run: the LEGW plan a checkpoint was saved under. (A DeepSpeed checkpoint re-sharded for
another world size: :func:`legw_hf.integrations.deepspeed.checkpoints.reshard_checkpoint`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...scheduler import STATE_FORMAT as SCHEDULER_STATE_FORMAT


def checkpoint_scheduler_state(checkpoint: str) -> dict[str, Any] | None:
    """The LEGW scheduler state of a Trainer checkpoint (its ``scheduler.pt``: the plan it was saved under, the
    progress, an automatic ramp's decisions), or None."""
    path = Path(checkpoint) / "scheduler.pt"
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    return state if isinstance(state, dict) and state.get("format") == SCHEDULER_STATE_FORMAT else None
