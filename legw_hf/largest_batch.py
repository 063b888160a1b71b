"""Deprecated alias of :mod:`legw_hf.pretraining.largest_batch`, where the module moved: it serves only the
pretraining program. The old name keeps working, with a ``DeprecationWarning``, until the next release."""

import sys
import warnings

from .pretraining import largest_batch as _moved

warnings.warn(
    "legw_hf.largest_batch moved to legw_hf.pretraining.largest_batch; the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
