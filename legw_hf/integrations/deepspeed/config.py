"""DeepSpeed configs for LEGW + LAMB runs: the global batch split over nodes, GPUs and micro-batches, and the JSON.

Every config here leaves the LR to the LEGW plan and the optimizer to the client (legw_hf's shard-aware LAMB):
no ``"scheduler"`` block (a second schedule that would replace the plan) and no ``"optimizer"`` block (DeepSpeed's
own LAMB takes trust ratios over ZeRO's flat partitions). Clipping happens once: LAMB's nvidia preset
pre-normalises by the global gradient norm, so DeepSpeed's clipping is 0 (its default would clip at 1.0 too).

Two forms come from the one function :func:`deepspeed_config`:

* the shipped configs (``legw_hf/recipes/deepspeed``), for Trainer: batch, accumulation and clipping are
  ``"auto"``, which Trainer fills from its arguments (the clipping after :mod:`.clipping`'s rule);
* ``legw-hf ds-config``: the numbers of one cluster shape written out, for Trainer or ``deepspeed.initialize``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import SettingError, one_of, positive_int

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp16", "bf16")
OFFLOAD_DEVICES = ("none", "cpu")

#: Dynamic loss scaling as NVIDIA's and DeepSpeed's BERT recipes run it: start at 2^16, halve on overflow,
#: double after 1000 clean steps.
_FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2}


@dataclass(frozen=True)
class BatchSplit:
    """A global batch formed as nodes × GPUs per node × micro-batch × gradient accumulation."""

    global_batch: int
    nodes: int
    gpus_per_node: int
    micro_batch: int
    accumulation: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.nodes} nodes x {self.gpus_per_node} GPUs x micro-batch "
            f"{self.micro_batch} x gradient accumulation {self.accumulation}"
        )

    def trainer_flags(self) -> str:
        return f"--per_device_train_batch_size {self.micro_batch} --gradient_accumulation_steps {self.accumulation}"


def split_global_batch(global_batch: int, *, nodes: int, gpus_per_node: int, micro_batch: int) -> BatchSplit:
    """The gradient accumulation that forms ``global_batch``; a :class:`SettingError` naming the nearest global
    batches and micro-batches that work when it does not divide evenly."""
    for name, value in (
        ("global_batch", global_batch),
        ("nodes", nodes),
        ("gpus_per_node", gpus_per_node),
        ("micro_batch", micro_batch),
    ):
        positive_int(name, value)
    world = nodes * gpus_per_node
    per_update = world * micro_batch
    if global_batch % per_update == 0:
        return BatchSplit(global_batch, nodes, gpus_per_node, micro_batch, global_batch // per_update)
    lower = global_batch // per_update * per_update
    batches = [b for b in (lower, lower + per_update) if b > 0]
    hint = f"nearest global batches for micro-batch {micro_batch}: {' or '.join(map(str, batches))}"
    micro_batches = _nearest_divisors(global_batch // world, micro_batch) if global_batch % world == 0 else []
    if micro_batches:
        hint += f"; micro-batches that give {global_batch}: {' or '.join(map(str, micro_batches))}"
    else:
        hint += f"; no micro-batch gives {global_batch}: it is not a multiple of the {world} GPUs"
    raise SettingError(
        "global_batch",
        f"must be a multiple of nodes x GPUs per node x micro-batch = {nodes} x {gpus_per_node} x {micro_batch} "
        f"= {per_update} ({hint})",
        global_batch,
    )


def _nearest_divisors(n: int, target: int) -> list[int]:
    below = next((d for d in range(min(target, n), 0, -1) if n % d == 0), None)
    above = next((d for d in range(target + 1, n + 1) if n % d == 0), None)
    return [d for d in (below, above) if d is not None]


def deepspeed_config(
    *, zero: int = 1, precision: str = "fp16", offload_optimizer: str = "none", split: BatchSplit | None = None
) -> dict[str, Any]:
    """A DeepSpeed config for a LEGW run with legw_hf's LAMB as the client optimizer.

    Args:
        zero: ZeRO stage 0–3.
        precision: ``fp16`` (dynamic loss scaling) or ``bf16``.
        offload_optimizer: ``cpu`` keeps the fp32 master weights and moments in host memory (ZeRO ≥ 1). The
            config then sets ``zero_force_ds_cpu_optimizer: false``: otherwise DeepSpeed refuses a client
            optimizer and accelerate swaps it for DeepSpeedCPUAdam; legw_hf's LAMB steps on the host partitions.
        split: the numbers of one cluster shape; None leaves batch, accumulation and clipping ``"auto"`` for
            Trainer to fill.
    """
    if zero not in ZERO_STAGES:
        raise SettingError("zero", f"must be one of {', '.join(map(str, ZERO_STAGES))}", zero)
    one_of("precision", precision, PRECISIONS)
    one_of("offload_optimizer", offload_optimizer, OFFLOAD_DEVICES)
    if offload_optimizer != "none" and zero == 0:
        raise SettingError("offload_optimizer", "needs ZeRO stage 1, 2 or 3 (it offloads ZeRO's partitions)", zero)
    config: dict[str, Any] = {}
    if split is None:
        # train_batch_size stays out: DeepSpeed derives it, and an "auto" one breaks ZeRO-3's zero.Init in Trainer.
        config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
        config["gradient_clipping"] = "auto"  # legw_hf makes it 0 beside LAMB's pre-normalisation
    else:
        config.update(
            train_batch_size=split.global_batch,
            train_micro_batch_size_per_gpu=split.micro_batch,
            gradient_accumulation_steps=split.accumulation,
        )
        config["gradient_clipping"] = 0.0
    if precision == "fp16":
        config["fp16"] = dict(_FP16)
    else:
        config["bf16"] = {"enabled": True}
        if zero == 1:
            # bf16 gradients summed over many micro-batches lose low bits: accumulate them in fp32
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    zero_section: dict[str, Any] = {"stage": zero}
    if zero >= 1:
        zero_section.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=int(5e8))
    if zero in (1, 2):
        zero_section["allgather_bucket_size"] = int(5e8)
    if zero == 3:
        zero_section.update(stage3_prefetch_bucket_size=int(5e8), stage3_param_persistence_threshold=int(1e6))
        # Without it Trainer's save_model writes no model file under ZeRO-3 (only the partitions), and
        # zero_to_fp32.py cannot write safetensors of BERT's tied embeddings.
        zero_section["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer != "none":
        zero_section["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": True}
        config["zero_force_ds_cpu_optimizer"] = False
    config["zero_optimization"] = zero_section
    config["zero_allow_untested_optimizer"] = True
    config["steps_per_print"] = 100
    config["wall_clock_breakdown"] = False
    return config


def shipped_config_name(zero: int, precision: str) -> str:
    """The file name of the shipped config for a ZeRO stage and precision."""
    return f"zero{zero}-{precision}.json"


#: The shipped configs: ZeRO 1 (the default), 2 and 3, each in fp16 and bf16.
SHIPPED_CONFIGS = {shipped_config_name(z, p): (z, p) for z in (1, 2, 3) for p in PRECISIONS}


def check_config_blocks(config: dict[str, Any], *, legw: bool, client_optimizer: str | None) -> str | None:
    """Refuse the blocks of a DeepSpeed config that would undo a LEGW run; return a warning for the one that only
    weakens it.

    ``legw``: the LEGW plan drives the LR. ``client_optimizer``: how the run chose a legw_hf optimizer, as the user
    wrote it (``"--legw_optimizer lamb"``), or None.
    """
    if legw and "scheduler" in config:
        raise SettingError(
            "deepspeed",
            'config must not have a "scheduler" block with LEGW on: that is a second schedule, and DeepSpeed\'s '
            "would replace the LEGW plan. Delete the block; the LEGW settings set the schedule",
            _block_type(config["scheduler"]),
        )
    block = config.get("optimizer")
    if block is None:
        return None
    kind = str(_block_type(block)).lower()
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if client_optimizer is not None:
        raise SettingError(
            "deepspeed",
            f'config has an "optimizer" block ({_block_type(block)}) and {client_optimizer} chooses '
            "one too. Delete the block to train with legw_hf's optimizer",
            _block_type(block),
        )
    if kind in ("lamb", "onebitlamb", "lars") and stage >= 1:
        raise SettingError(
            "deepspeed",
            f'config has an "optimizer" block of type {_block_type(block)} with ZeRO stage {stage}: DeepSpeed\'s '
            "own layer-wise optimizer takes its trust ratios over ZeRO's flat partitions, which span many "
            "tensors. Delete the block and use legw_hf's lamb (or lars), which is shard-aware",
            _block_type(block),
        )
    if not legw:
        return None
    return (
        f'DeepSpeed builds the optimizer from the config\'s "optimizer" block ({_block_type(block)}) with a single '
        "param group, so weight decay also applies to biases and LayerNorm weights; the LEGW plan drives its LR. "
        "For decay groups, delete the block and choose legw_hf's optimizer (Trainer: --legw_optimizer)."
    )


def keep_client_optimizer_under_offload(config: dict[str, Any]) -> bool:
    """With ZeRO-Offload of the optimizer, DeepSpeed refuses a client optimizer and accelerate silently swaps it
    for DeepSpeedCPUAdam, unless ``zero_force_ds_cpu_optimizer`` is false. Set it so legw_hf's optimizer is the
    one that runs (on the host partitions); True when that changed the config."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if str(offload.get("device", "none")).lower() in ("none", "") or config.get("zero_force_ds_cpu_optimizer") is False:
        return False
    if config.get("zero_force_ds_cpu_optimizer") not in (None, "auto"):
        raise SettingError(
            "zero_force_ds_cpu_optimizer",
            "must be false (or absent) in the DeepSpeed config beside an offloaded legw_hf optimizer: true makes "
            "DeepSpeed refuse it and accelerate replace it by DeepSpeedCPUAdam",
            config["zero_force_ds_cpu_optimizer"],
        )
    config["zero_force_ds_cpu_optimizer"] = False
    return True


def user_config(deepspeed: dict[str, Any] | str | Path) -> dict[str, Any]:
    """The DeepSpeed config a user gave (Trainer's ``--deepspeed``): a dict, or the path of its JSON file."""
    return deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())


def adascale_refusal(
    config: dict[str, Any], mode: str, *, fp16: bool = False, estimates: int | None = None
) -> str | None:
    """Why the gradient statistics of AdaScale ``mode`` (``"diagnostics"`` for an automatic batch ramp's) cannot be
    measured under this DeepSpeed config, with ``estimates`` gradient estimates per update (processes x micro-batches
    accumulated; None: not known yet), or None. Under ZeRO the applied gradient's norm is DeepSpeed's own
    (:func:`zero_gradient_norm`), so there is no whole gradient to precondition, nor the previous update's to difference
    one estimate with; and DeepSpeed's fp16 loss scale may change inside the step the statistics are read in."""
    if mode == "sqrt_gain":
        return (
            "sqrt_gain is not supported under DeepSpeed: ZeRO partitions the gradient, so its Adam-preconditioned "
            "norm cannot be read (use gain, or run sqrt_gain with DDP)"
        )
    if fp16 or config.get("fp16", {}).get("enabled") is True:
        return (
            "is not supported with DeepSpeed's fp16 loss scaling (its scale changes inside the step the statistics "
            "are read in): use bf16 under DeepSpeed, or fp16 with DDP"
        )
    if estimates is not None and estimates < 2:
        return (
            f"needs at least 2 gradient estimates per update under DeepSpeed (processes x micro-batches accumulated "
            f">= 2, here {estimates}): one estimate per update is differenced with the previous update's gradient, "
            "which ZeRO does not keep whole"
        )
    return None


def require_deepspeed(field: str, value: Any = None) -> None:
    """A DeepSpeed path was asked for: say how to install DeepSpeed if it is missing, before any work starts."""
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except ValueError:  # a module stub without a spec
        found = "deepspeed" in sys.modules and sys.modules["deepspeed"] is not None
    if not found:
        raise SettingError(
            field,
            "needs DeepSpeed, which is not installed: pip install 'legw_hf[deepspeed]' (or pip install deepspeed)",
            value,
        )


def _block_type(block: Any) -> Any:
    return block.get("type") if isinstance(block, dict) else block
