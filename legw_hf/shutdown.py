"""Ending a multi-process program without the gloo shutdown abort.

What happens (torch 2.13, CPython 3.11; seen in the core dump of a torchrun job that had finished training): the last
collective a Trainer run issues is an ``all_gather`` (``store_flos``) whose output tensors were made in Python. The
call returns as soon as the work is marked complete; the gloo worker thread that ran it drops its own reference to the
work object a moment later (``ProcessGroupGloo::runLoop`` resets ``workInProgress_``). When that reference is the
last, ``~AsyncWork`` frees the output tensors, whose Python objects the tensors now own, so the worker takes the GIL
to deallocate them. If the main thread has meanwhile reached interpreter finalization, CPython ends any other thread
that asks for the GIL with ``pthread_exit``; the forced unwind meets the ``noexcept`` destructor and the C++ runtime
calls ``std::terminate``: "terminate called without an active exception", SIGABRT, and the launcher fails a job
whose results were already written. ``destroy_process_group()`` does not prevent it: it forgets the group, but the
group object lives on (DDP, DeepSpeed and FSDP hold references) and its worker threads are not joined.

The window exists only during finalization, so a finished program leaves without it: it joins its own threads, runs
the ``atexit`` handlers and flushes the standard streams, as a normal exit does, then ends the process with
``os._exit``. :func:`exit_process` does that for the project's entry points (``legw-hf pretrain``, the examples and
the test scripts); a script of a user's own can end with ``legw_hf.exit_process(main())`` the same way.

On the way out it also removes the ``/dev/shm`` buffer DeepSpeed's CPU communication op leaves behind (see
:func:`deepspeed_shm_buffer`).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn


def leave_process_group() -> bool:
    """Wait for every process at a barrier, then destroy the default process group (and every other).

    Returns whether this process took part in a multi-process run, so the caller knows whether the gloo worker
    threads may still be alive: also true when the group was destroyed already (the threads outlive it)."""
    # A process group exists only where torch.distributed was imported: a command that never imported it (such as
    # ``legw-hf plan``) must not pay torch's import on the way out.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        _remove_deepspeed_shm_buffer(dist.get_rank())
        dist.destroy_process_group()
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def deepspeed_shm_buffer(rank: int | str, address: str | None = None, port: int | str | None = None) -> Path:
    """The shared-memory file DeepSpeed's CPU communication op creates for ``rank`` at ``deepspeed.init_distributed``
    when all ranks are on one machine (``ops/csrc/cpu/comm/shm.cpp``: 69 MB, named by user, master address and port,
    and rank). DeepSpeed never unlinks it, so every such run would leave one per rank in ``/dev/shm``, in memory.

    ``address`` and ``port`` default to this process's ``MASTER_ADDR`` and ``MASTER_PORT``; pass ``"*"`` for any
    of the three to get a glob pattern (a launcher cleaning up after its job)."""
    address = os.environ.get("MASTER_ADDR", "") if address is None else address
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def _remove_deepspeed_shm_buffer(rank: int) -> None:
    # After the barrier every rank has long mapped its peers' buffers (they are opened at initialisation), and a
    # mapping outlives the unlink: removing the name frees the memory once the processes end.
    if "deepspeed" in sys.modules and hasattr(os, "getuid"):
        deepspeed_shm_buffer(rank).unlink(missing_ok=True)


def exit_process(status: int | None = 0) -> NoReturn:
    """End the program with ``status`` once its work is done.

    In a multi-process run: leave the process group together, join this program's non-daemon threads, run the
    ``atexit`` handlers, flush the logs and the standard streams, and end the process without interpreter
    finalization (see the module docstring for why). In a single process: an ordinary ``sys.exit``.
    Call it last, on the success path: an exception raised before it still fails the process as usual."""
    status = 0 if status is None else int(status)
    if not leave_process_group():
        sys.exit(status)
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    # Py_FinalizeEx's steps before finalization proper: atexit handlers (logging's flush among them) run here
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(status)
