"""DeepSpeed checkpoints: how many ranks saved one, and its universal form, which loads at any world size.

Plain Python at import (``legw-hf`` imports the package); DeepSpeed and torch load inside the functions that use
them. :func:`reshard_checkpoint` is what ``LegwTrainer`` runs when it resumes a ZeRO checkpoint at another world
size; other loops can call it before ``deepspeed.initialize`` (or :func:`convert_to_universal` themselves).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from ...errors import SettingError

_OPTIMIZER_STATES = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def checkpoint_data_parallel_size(checkpoint: str | Path) -> int | None:
    """How many data-parallel ranks saved a DeepSpeed checkpoint (one optimizer-state file each), or None when the
    folder holds no DeepSpeed ZeRO checkpoint. ``checkpoint`` is the folder with the ``latest`` file (Trainer's
    ``checkpoint-N``)."""
    root = Path(checkpoint)
    latest = root / "latest"
    if not latest.is_file():
        return None
    folder = root / latest.read_text().strip()
    ranks = {m.group(1) for f in folder.glob("*optim_states.pt") if (m := _OPTIMIZER_STATES.search(f.name))}
    return len(ranks) or None


def convert_to_universal(checkpoint: str | Path) -> Path:
    """Write DeepSpeed's universal form of a ZeRO checkpoint beside it (``<tag>_universal`` and
    ``latest_universal``), which DeepSpeed loads at any data-parallel world size with ``"checkpoint":
    {"load_universal": true}``: its loader re-partitions the fp32 weights and the optimizer moments. Nothing in
    the checkpoint is changed; a conversion already there is reused. Call it on one process."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = Path(checkpoint)
    tag = (root / "latest").read_text().strip()
    output = root / f"{tag}_universal"
    if (root / "latest_universal").is_file() and output.is_dir():
        return output
    options = dict(num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True)
    # legw_hf's optimizers keep no "universal_checkpoint_info" (a Megatron addition): DeepSpeed injects defaults
    ds_to_universal(
        argparse.Namespace(
            input_folder=str(root / tag), output_folder=str(output), inject_missing_state=True, **options
        )
    )
    return output


def reshard_checkpoint(checkpoint: str, ds_config: dict[str, Any], *, world_size: int, main_process: bool) -> None:
    """Resuming a ZeRO checkpoint at another data-parallel world size: DeepSpeed refuses its own checkpoint
    then, so convert it to DeepSpeed's universal form (once, on the main process) and have the engine load that
    (``ds_config``, the engine's config, is told to), which re-partitions the weights and optimizer moments for
    this world. Call it on every process."""
    import logging  # here, not at the top: legw-hf imports this module and needs no logging

    import torch.distributed as dist

    saved = checkpoint_data_parallel_size(checkpoint)
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
        convert_to_universal(checkpoint)
    if dist.is_initialized():
        dist.barrier()
    universal = Path(checkpoint) / (Path(checkpoint) / "latest_universal").read_text().strip()
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    logging.getLogger(__name__).warning(
        "The checkpoint %s was saved by %d DeepSpeed ranks and this run has %d: resuming from its universal form "
        "%s, which DeepSpeed re-partitions for %d ranks.",
        checkpoint,
        saved,
        world,
        universal,
        world,
    )
