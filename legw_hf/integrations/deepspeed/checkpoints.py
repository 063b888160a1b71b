"""DeepSpeed checkpoints: how many ranks saved one, and its universal form, which loads at any world size.

Plain Python at import (``legw-hf`` imports the package); DeepSpeed and torch load inside the functions that use
them. :func:`reshard_checkpoint` is what ``LegwTrainer`` runs when it resumes a ZeRO checkpoint at another world
size; other loops can call it before ``deepspeed.initialize`` (or :func:`convert_to_universal` themselves).
:func:`universal_state_view` does it for accelerate's ``save_state`` folders
(:func:`legw_hf.integrations.accelerate.load_state`).
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


def _convert_for_world(
    checkpoint: str | Path, *, stage: int, world_size: int, main_process: bool, field: str
) -> int | None:
    """The ranks that saved ``checkpoint`` when they are not ``world_size`` (None: nothing to re-shard), its
    universal form written by then (on the main process; the others wait for it); ``field`` names the checkpoint in
    a refusal. Call it on every process."""
    import torch.distributed as dist

    saved = checkpoint_data_parallel_size(checkpoint)
    if saved is None or saved == world_size:
        return None
    if stage not in (1, 2):
        raise SettingError(
            field,
            f"was saved by {saved} DeepSpeed ranks and this run has {world_size}: legw_hf re-shards ZeRO-1/2 "
            f"checkpoints (through DeepSpeed's universal checkpoint), not ZeRO stage {stage}. Resume at {saved} "
            "processes, or convert it with deepspeed.checkpoint.ds_to_universal and set "
            '"checkpoint": {"load_universal": true}',
            str(checkpoint),
        )
    if main_process:
        convert_to_universal(checkpoint)
    if dist.is_initialized():
        dist.barrier()
    return saved


def _warn_resharded(checkpoint: str | Path, saved: int, world_size: int) -> None:
    import logging  # here, not at the top: legw-hf imports this module and needs no logging

    universal = Path(checkpoint) / (Path(checkpoint) / "latest_universal").read_text().strip()
    logging.getLogger(__name__).warning(
        "The checkpoint %s was saved by %d DeepSpeed ranks and this run has %d: resuming from its universal form "
        "%s, which DeepSpeed re-partitions for %d ranks.",
        checkpoint,
        saved,
        world_size,
        universal,
        world_size,
    )


def reshard_checkpoint(checkpoint: str, ds_config: dict[str, Any], *, world_size: int, main_process: bool) -> None:
    """Resuming a ZeRO checkpoint at another data-parallel world size: DeepSpeed refuses its own checkpoint
    then, so convert it to DeepSpeed's universal form (once, on the main process) and have the engine load that
    (``ds_config``, the engine's config, is told to), which re-partitions the weights and optimizer moments for
    this world. Call it on every process."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    saved = _convert_for_world(
        checkpoint, stage=stage, world_size=world_size, main_process=main_process, field="resume_from_checkpoint"
    )
    if saved is None:
        return
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    _warn_resharded(checkpoint, saved, world_size)


#: The folder inside an accelerate state saved at another world size where :func:`universal_state_view` lays the
#: state out for DeepSpeed's universal loader.
UNIVERSAL_VIEW = "universal_view"
#: accelerate's name for the (first) model's DeepSpeed checkpoint in a ``save_state`` folder.
ACCELERATE_MODEL_TAG = "pytorch_model"


def universal_state_view(state_dir: str | Path, *, stage: int, world_size: int, main_process: bool) -> Path | None:
    """accelerate's ``save_state`` folder laid out for a run of ``world_size`` data-parallel ranks, or None when it
    was saved by as many (or holds no ZeRO checkpoint): the model's ZeRO checkpoint is converted to its universal
    form beside it (:func:`convert_to_universal`), and :data:`UNIVERSAL_VIEW` inside the folder links every saved
    file, with ``pytorch_model`` linking the universal form instead. accelerate's ``load_state`` loads the model's
    checkpoint by that name, so a DeepSpeed engine told to load universal checkpoints reads it from the view.
    Nothing saved is changed. Call it on every process."""
    import torch.distributed as dist

    root = Path(state_dir)
    if (root / f"{ACCELERATE_MODEL_TAG}_1").exists():
        raise SettingError(
            "input_dir",
            "holds the DeepSpeed checkpoints of several models: loading them at another world size is not supported "
            "(one model only)",
            str(state_dir),
        )
    saved = _convert_for_world(root, stage=stage, world_size=world_size, main_process=main_process, field="input_dir")
    if saved is None:
        return None
    view = root / UNIVERSAL_VIEW
    if main_process and not view.is_dir():
        view.mkdir()
        universal = (root / "latest_universal").read_text().strip()
        for entry in root.iterdir():
            if entry.name not in (ACCELERATE_MODEL_TAG, universal, UNIVERSAL_VIEW, "latest", "latest_universal"):
                (view / entry.name).symlink_to(Path("..") / entry.name)
        (view / ACCELERATE_MODEL_TAG).symlink_to(Path("..") / universal, target_is_directory=True)
    if dist.is_initialized():
        dist.barrier()
    _warn_resharded(root, saved, world_size)
    return view
