"""Deprecated alias of :mod:`legw_hf.pretraining.corpus`, where the module moved: it serves only the
pretraining program. The old name keeps working, with a ``DeprecationWarning``, until the next release."""

from ._moved import alias_moved_module

alias_moved_module(__name__, "legw_hf.pretraining.corpus")
