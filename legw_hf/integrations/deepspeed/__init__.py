"""Everything legw_hf knows about DeepSpeed, one job per module:

- :mod:`.config`: the configs of LEGW + LAMB runs (the global batch split over nodes, GPUs and micro-batches, the
  JSON, the shipped files), the checks of a user's config blocks, and whether DeepSpeed is installed;
- :mod:`.clipping`: the one rule that has gradients clipped once beside a LAMB's pre-normalisation;
- :mod:`.checkpoints`: ZeRO checkpoints at another world size, through DeepSpeed's universal form;
- :mod:`.engine`: DeepSpeed's optimizer wrappers found around legw_hf's optimizers, their state-initialising
  call, ZeRO's gradient norm;
- :mod:`.accumulation`: a batch ramp's accumulation, set on the engine update by update;
- :mod:`.layouts`: the flat buffers of ZeRO 1-3 and the fp16/bf16 wrappers as
  :class:`~legw_hf.distributed.FlatLayout` objects (it needs torch). It is the DeepSpeed adapter of
  :mod:`legw_hf.engines`, registered by ``legw_hf/__init__.py``, through which the optimizers learn the layouts
  without importing anything of DeepSpeed's.

The package itself and every module but :mod:`.layouts` are plain Python: ``legw-hf ds-config`` imports them to write
a config, with neither torch nor DeepSpeed loaded.
"""

from .checkpoints import checkpoint_data_parallel_size, convert_to_universal, reshard_checkpoint, universal_state_view
from .clipping import clip_once
from .config import (
    OFFLOAD_DEVICES,
    PRECISIONS,
    SHIPPED_CONFIGS,
    ZERO_STAGES,
    BatchSplit,
    adascale_refusal,
    check_config_blocks,
    deepspeed_config,
    keep_client_optimizer_under_offload,
    require_deepspeed,
    shipped_config_name,
    split_global_batch,
    user_config,
)
from .engine import zero_gradient_norm

__all__ = [
    "OFFLOAD_DEVICES",
    "PRECISIONS",
    "SHIPPED_CONFIGS",
    "ZERO_STAGES",
    "BatchSplit",
    "adascale_refusal",
    "check_config_blocks",
    "checkpoint_data_parallel_size",
    "clip_once",
    "convert_to_universal",
    "deepspeed_config",
    "keep_client_optimizer_under_offload",
    "require_deepspeed",
    "reshard_checkpoint",
    "shipped_config_name",
    "split_global_batch",
    "universal_state_view",
    "user_config",
    "zero_gradient_norm",
]
