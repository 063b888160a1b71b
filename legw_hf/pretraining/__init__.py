"""Two-phase BERT pretraining with LEGW and LAMB (``legw-hf pretrain``): see :mod:`legw_hf.pretraining.program`."""

from .program import main

__all__ = ["main"]
