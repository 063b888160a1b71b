"""Deprecated alias of :mod:`legw_hf.integrations.deepspeed.layouts`, where the module moved: all of legw_hf's
DeepSpeed knowledge lives in :mod:`legw_hf.integrations.deepspeed`. The old name keeps working, with a
``DeprecationWarning``, until the next release."""

from .._moved import alias_moved_module

alias_moved_module(__name__, "legw_hf.integrations.deepspeed.layouts")
