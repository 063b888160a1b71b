"""Launching the project's scripts as users launch them: plain ``python``, ``torchrun``, ``deepspeed`` or
``accelerate launch``, several CPU processes over gloo, each launch on a free port.

Every multi-process test goes through :func:`launch`: it builds the launcher's command line, gives the rendezvous a
port nobody holds (no two tests, and no two runs of the suite, share one), sets what the launcher needs on a CPU
machine (``DS_ACCELERATOR=cpu``, ``ACCELERATE_USE_CPU``), and fails with the end of both streams when the launch does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from procs import python_env

from legw_hf.shutdown import deepspeed_shm_buffer

LAUNCHERS = ("python", "torchrun", "deepspeed", "accelerate")


def free_port() -> int:
    """A TCP port on the loopback interface that no process holds now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_command(launcher: str, processes: int, module: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """The command line before the script (or, with ``module``, before the module name)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "python":
        return [sys.executable, *(["-m"] if module else [])]
    port = str(free_port())
    if launcher == "torchrun":
        command = ["torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port]
        return [sys.executable, "-m", *command, *extra, *(["-m"] if module else [])]
    if launcher == "deepspeed":
        command = ["deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port", port]
        return [sys.executable, "-m", *command, *extra, *(["--module"] if module else [])]
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process; several CPU processes need --multi_gpu with
    # ACCELERATE_USE_CPU set (see launch()).
    command = ["accelerate.commands.launch", "--num_processes", str(processes), "--main_process_port", port]
    if processes > 1:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [sys.executable, "-m", *command, *extra, *(["-m"] if module else [])]


def launch_environment(
    launcher: str, processes: int = 2, launcher_args: Sequence[str] = (), env: dict[str, str] | None = None
) -> dict[str, str]:
    """This environment with the repository importable and without ``CI`` (transformers lets its loggers propagate
    when CI is set, so a user's shell sees other output), what the launcher needs on a CPU machine, then ``env``."""
    environment = {key: value for key, value in python_env().items() if key != "CI"}
    if launcher == "deepspeed" or "--use_deepspeed" in launcher_args:
        environment["DS_ACCELERATOR"] = "cpu"
    if launcher == "accelerate" and processes > 1:
        environment["ACCELERATE_USE_CPU"] = "true"
    return environment | (env or {})


def launch(
    launcher: str,
    target: str | Path,
    *args: str | Path,
    processes: int = 2,
    module: bool = False,
    launcher_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 900,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``target`` (a script, or a module with ``module=True``) under ``launcher`` and return the finished process,
    in :func:`launch_environment`. With ``check``, a non-zero exit fails the test with the end of stdout and stderr."""
    command = [*launcher_command(launcher, processes, module, launcher_args), str(target), *map(str, args)]
    environment = launch_environment(launcher, processes, launcher_args, env)
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, cwd=cwd or os.getcwd(), timeout=timeout
    )
    left = remove_deepspeed_shm_buffers(command)
    if check:
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        assert not left, f"DeepSpeed's shared-memory buffers outlived a finished run: {left}"
    return result


def remove_deepspeed_shm_buffers(command: Sequence[str]) -> list[str]:
    """Remove the ``/dev/shm`` buffers DeepSpeed's CPU communication op made for the run of ``command`` (named by its
    rendezvous port; see ``legw_hf.shutdown.deepspeed_shm_buffer``) and return their names: a finished run that ends
    through ``exit_process`` leaves none, a failed one may, and they must not pile up in memory over many launches."""
    flags = [index for index, word in enumerate(command) if word in ("--master_port", "--main_process_port")]
    if not flags:
        return []
    port = command[flags[0] + 1]
    pattern = deepspeed_shm_buffer("*", address="*", port=port)
    left = sorted(pattern.parent.glob(pattern.name))
    for path in left:
        path.unlink(missing_ok=True)
    return [path.name for path in left]


#: A script that makes several runs in one launch (tests/scripts/accelerate_loop_runs.py) writes this and the run's
#: name on a line of its own before each run, on stdout and on stderr, from the main process.
RUN_MARK = "@@ run: "


def split_runs(output: str) -> dict[str, str]:
    """A launch's stdout or stderr cut at the :data:`RUN_MARK` lines: each run's name -> the lines written after its
    mark (what came before the first mark, the launcher's own, belongs to no run)."""
    runs: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in output.splitlines(keepends=True):
        if line.startswith(RUN_MARK):
            lines = runs.setdefault(line[len(RUN_MARK) :].strip(), [])
        else:
            lines.append(line)
    return {name: "".join(lines) for name, lines in runs.items()}
