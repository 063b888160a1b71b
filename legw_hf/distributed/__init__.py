"""Sharding awareness for the layer-wise optimizers: which local pieces make up each original tensor.

Under DeepSpeed ZeRO the optimizer sees flat partitions that span many tensors; under FSDP2 it sees DTensor
shards. A trust ratio needs the norms of whole tensors. This package says, for every parameter the optimizer is
handed, which piece of which original tensor it holds (:mod:`.layout`: DTensors describe themselves, DeepSpeed's
layouts come from its own metadata through :mod:`legw_hf.integrations.deepspeed.layouts`), and sums the partial
squared norms of a step with one all-reduce (:class:`.layout.NormReduction`). The optimizers use it through their
``reduce_squared_norms`` hook; nothing here knows LAMB or LARS, or DeepSpeed.
"""

from .layout import FlatLayout, NormReduction, local_tensor, shard_group

__all__ = ["FlatLayout", "NormReduction", "local_tensor", "shard_group"]
