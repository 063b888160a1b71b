"""LAMB's two-pass CPU kernel (``csrc/lamb_cpu.cpp``), compiled on first use.

``torch.utils.cpp_extension`` builds it with the machine's C++ compiler and ninja the first time a process asks
(about half a minute) and caches the build under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); later processes load the cached library. Where no build is possible, :func:`load`
says why once and returns None, and LAMB keeps its torch-ops path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "lamb_cpu.cpp"
# Portable flags: the build is cached and may be shared by machines with other CPUs, so no -march=native. The
# kernel is bound by memory bandwidth, where SSE2 vectors already keep up.
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]


def build_directory() -> Path:
    """Where the build is cached: one directory per Python version and per ninja executable.

    Two ninjas on one machine are common (the system's, and the ``ninja`` wheel DeepSpeed installs into a venv);
    their build logs do not recognise each other's entries, so sharing a directory would rebuild the kernel
    whenever a process with the other ninja first on its PATH loads it.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    ninja = hashlib.sha1(str(shutil.which("ninja")).encode()).hexdigest()[:8]
    return root / f"legw_hf_lamb_cpu_py{sys.version_info.major}{sys.version_info.minor}_{ninja}"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, or None when it cannot be built here (the reason is warned once)."""
    try:
        from torch.utils.cpp_extension import load as build

        logger.info("legw_hf: loading LAMB's CPU kernel (built once per machine, about 30 s the first time)")
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        return build(
            name="legw_hf_lamb_cpu",
            sources=[str(SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: all mean "not here"
        warnings.warn(
            f"legw_hf: LAMB's CPU kernel cannot be built here ({type(error).__name__}: {error}); "
            "Lamb uses its torch-ops path instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
