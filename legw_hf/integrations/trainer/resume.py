"""Resuming a Trainer run: the LEGW plan a checkpoint was saved under, and a DeepSpeed checkpoint re-sharded for
another world size."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ...errors import SettingError
from ...scheduler import STATE_FORMAT as SCHEDULER_STATE_FORMAT
from .. import deepspeed as deepspeed_config

logger = logging.getLogger(__name__)


def checkpoint_plan(checkpoint: str) -> dict[str, Any] | None:
    """The LEGW plan a Trainer checkpoint was saved under (its ``scheduler.pt``), or None."""
    path = Path(checkpoint) / "scheduler.pt"
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    return state.get("plan") if isinstance(state, dict) and state.get("format") == SCHEDULER_STATE_FORMAT else None


def reshard_deepspeed_checkpoint(
    checkpoint: str, ds_config: dict[str, Any], *, world_size: int, main_process: bool
) -> None:
    """Resuming a ZeRO checkpoint at another data-parallel world size: DeepSpeed refuses its own checkpoint
    then, so convert it to DeepSpeed's universal form (once, on the main process) and have the engine load that
    (``ds_config``, the engine's config, is told to), which re-partitions the weights and optimizer moments for
    this world."""
    saved = deepspeed_config.checkpoint_data_parallel_size(checkpoint)
    world = world_size
    if saved is None or saved == world:
        return
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2):
        raise SettingError(
            "resume_from_checkpoint",
            f"was saved by {saved} DeepSpeed ranks and this run has {world}: legw_hf re-shards ZeRO-1/2 "
            f"checkpoints (through DeepSpeed's universal checkpoint), not ZeRO stage {stage}. Resume at {saved} "
            "processes, or convert it with deepspeed.checkpoint.ds_to_universal and set "
            '"checkpoint": {"load_universal": true}',
            checkpoint,
        )
    if main_process:  # the others wait for its files
        deepspeed_config.convert_to_universal(checkpoint)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    universal = Path(checkpoint) / (Path(checkpoint) / "latest_universal").read_text().strip()
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    logger.warning(
        "The checkpoint %s was saved by %d DeepSpeed ranks and this run has %d: resuming from its universal form "
        "%s, which DeepSpeed re-partitions for %d ranks.",
        checkpoint,
        saved,
        world,
        universal,
        world,
    )
