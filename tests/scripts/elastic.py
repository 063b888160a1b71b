"""Every elastic-resume engine in one launch per phase: the Trainer runs of ``elastic_trainer.py`` with plain DDP and
with DeepSpeed ZeRO-2, then the FSDP2 loop of ``elastic_fsdp2.py``, each in a folder of its own under the output
(``<output>/<engine>/<engine>/<run>.rank<N>.json``), then a batch ramp under ZeRO-2 (``ramp_deepspeed.py``, into
``<output>/zero2-ramp/<run>``). Started by DeepSpeed's launcher with 1, 2, then 1 processes (``first``, ``second``,
``third``); the processes keep one gloo group for all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import elastic_fsdp2
import elastic_trainer
import ramp_deepspeed

from legw_hf.shutdown import exit_process

ENGINES = ("ddp", "zero2", "fsdp2")


def main(phase: str, output: str) -> None:
    root = Path(output)
    for engine in ENGINES:
        if engine == "fsdp2":
            elastic_fsdp2.main(phase, str(root / engine))
        else:
            elastic_trainer.main(engine, phase, str(root / engine))
    ramp_deepspeed.trainer(phase, str(root / "zero2-ramp"))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_process()
