"""Checkpoint averaging (Popel & Bojar, "Training Tips for the Transformer Model", 2018): the element-wise mean of
the weights of a run's last N Trainer checkpoints, written as a model directory ``from_pretrained`` loads.

The checkpoints are read, never changed. Weights come from the checkpoint's safetensors files (one file, or shards
with ``model.safetensors.index.json``), or, for a DeepSpeed checkpoint without them (ZeRO-3 not gathering 16-bit
weights at save), from DeepSpeed's own consolidation of its partitions (fp32); each floating tensor is averaged in
float64 and stored in its own dtype, and any other tensor must be equal in every checkpoint. The configuration and
tokenizer files of the newest checkpoint are copied beside the averaged weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .errors import SettingError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: What a Trainer checkpoint holds besides the model: never copied into the averaged model.
_TRAINING_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|rng_state|trainer_state|training_args|legw_plan|latest|zero_to_|global_step)"
)


def trainer_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's ``checkpoint-N`` folders, oldest first (by N)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise SettingError("run_dir", "must be a Trainer output directory", str(run_dir))
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights a Trainer checkpoint saved, as one state dict."""
    from safetensors.torch import load_file

    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (checkpoint / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (checkpoint / "latest").is_file():
        return deepspeed_checkpoint_weights(checkpoint)
    else:
        raise SettingError(
            "checkpoint",
            "must hold safetensors model weights (model.safetensors or its shards) or a DeepSpeed checkpoint "
            "(its 'latest' file and global_step folder)",
            str(checkpoint),
        )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(checkpoint / name))
    return weights


def deepspeed_checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed ZeRO checkpoint without model files (ZeRO-3 saving no 16-bit weights),
    consolidated from its partitions by DeepSpeed itself (``zero_to_fp32``)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise SettingError(
            "checkpoint",
            "is a DeepSpeed checkpoint: reading it needs pip install 'legw_hf[deepspeed]'",
            str(checkpoint),
        ) from None
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    return {key: value.detach().contiguous() for key, value in weights.items()}


def average_checkpoints(run_dir: str | Path, last: int, output: str | Path | None = None) -> Path:
    """Average the weights of the ``last`` newest checkpoints of ``run_dir`` into ``output`` (default
    ``run_dir/averaged-last-N``), which must not exist. Returns the output directory.

    Refused, before anything is written: ``last`` < 1, fewer than ``last`` checkpoints, checkpoints whose tensor
    names, shapes or dtypes differ, non-floating tensors that differ, an existing output directory.
    """
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise SettingError("last", "must be an integer >= 1", last)
    checkpoints = trainer_checkpoints(run_dir)
    if len(checkpoints) < last:
        raise SettingError(
            "last",
            f"must not exceed the checkpoints in {run_dir} ({len(checkpoints)}: "
            f"{', '.join(p.name for p in checkpoints) or 'none'})",
            last,
        )
    target = Path(output) if output is not None else Path(run_dir) / f"averaged-last-{last}"
    if target.exists():
        raise SettingError("output", "must not exist already (averaging never replaces a directory)", str(target))
    chosen = checkpoints[-last:]
    first = checkpoint_weights(chosen[0])
    sums = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in first.items()}
    for checkpoint in chosen[1:]:
        weights = checkpoint_weights(checkpoint)
        _check_same_tensors(first, weights, chosen[0], checkpoint)
        for key, value in weights.items():
            if value.is_floating_point():
                sums[key] += value.to(torch.float64)
            elif not torch.equal(value, first[key]):
                raise SettingError(
                    "checkpoints",
                    f"must agree on non-floating tensors, which are not averaged ({chosen[0].name} and "
                    f"{checkpoint.name} differ)",
                    key,
                )
    averaged = {k: (v / last).to(first[k].dtype) if first[k].is_floating_point() else v for k, v in sums.items()}
    _write_model(averaged, chosen[-1], target)
    return target


def _check_same_tensors(reference: dict, other: dict, reference_path: Path, other_path: Path) -> None:
    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        raise SettingError(
            "checkpoints",
            f"must hold the same tensors: {other_path.name} lacks {missing[:5]} and adds {extra[:5]} "
            f"compared with {reference_path.name}",
            other_path.name,
        )
    for key, value in reference.items():
        if other[key].shape != value.shape or other[key].dtype != value.dtype:
            raise SettingError(
                "checkpoints",
                f"must have the same shape and dtype for {key!r}: {tuple(value.shape)} {value.dtype} in "
                f"{reference_path.name}, {tuple(other[key].shape)} {other[key].dtype} in {other_path.name}",
                key,
            )


def _write_model(weights: dict[str, torch.Tensor], newest: Path, target: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        raise SettingError("output", "has a leftover .partial directory beside it; remove it first", str(partial))
    partial.mkdir(parents=True)
    for path in newest.iterdir():
        weight_file = path.name.startswith("model") and path.name.endswith((".safetensors", ".safetensors.index.json"))
        if path.is_file() and not weight_file and not _TRAINING_STATE.match(path.name):
            shutil.copy2(path, partial / path.name)
    save_torch_state_dict(weights, partial, metadata={"format": "pt"})
    partial.rename(target)  # the output appears whole or not at all
