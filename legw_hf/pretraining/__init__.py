"""Two-phase BERT pretraining with LEGW and LAMB (``legw-hf pretrain``): see :mod:`legw_hf.pretraining.program`.

The program loads on first use of :func:`main`, so its building blocks (``data``, ``masking``, ``evaluation``)
import without it.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .program import main as run

    return run(argv)


__all__ = ["main"]
