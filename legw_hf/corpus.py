"""Deprecated alias of :mod:`legw_hf.pretraining.corpus`, where the module moved: it serves only the
pretraining program. The old name keeps working, with a ``DeprecationWarning``, until the next release."""

import sys
import warnings

from .pretraining import corpus as _moved

warnings.warn(
    "legw_hf.corpus moved to legw_hf.pretraining.corpus; the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
