"""``python -m legw_hf``: the ``legw-hf`` command."""

from .cli import run

run()
