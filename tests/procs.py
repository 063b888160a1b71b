"""Running the project's scripts and launchers as real child processes."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_env() -> dict[str, str]:
    """Environment for child processes: this one, with the repo importable. Launchers are started as
    ``sys.executable -m ...``, so PATH stays as it is (and so does the ninja that builds LAMB's CPU kernel)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def end_distributed() -> None:
    """End a multi-process test script once its results are written: tear the process group down and leave without
    the interpreter's shutdown. Left to that shutdown, gloo's and DeepSpeed's C++ threads occasionally abort a process
    whose run succeeded ("terminate called without an active exception", seen about once per CI run of the suite).
    Call it last: a failure before it still fails the launch."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
