"""LAMB's two-pass CPU kernel (``csrc/lamb_cpu.cpp``), compiled on first use and cached by what it is built from.

The cache lives under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/...``), one directory per
*build key*: a hash of everything that changes the binary — the source text, the compiler flags, the compiler, the
torch version and C++ ABI, the Python extension suffix and the machine type — and of nothing else (not the
checkout's path, not the ninja on ``PATH``). Two checkouts or two environments with the same torch share one build;
a changed source or torch gets its own.

A build is published by one atomic rename of the finished library into its key directory, under an exclusive
``flock`` on the key's lock file. Processes that start together (torchrun ranks) wait on that lock, and the first
one builds; the others then load its library. Nobody ever loads a half-written file, and a crashed builder leaves
no stale lock (the kernel drops ``flock`` locks with the process). Where no build is possible, :func:`load` says
why once and returns None, and LAMB keeps its torch-ops path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

NAME = "legw_hf_lamb_cpu"
SOURCE = Path(__file__).with_name("csrc") / "lamb_cpu.cpp"
# Portable flags: the build is cached and may be shared by machines with other CPUs, so no -march=native. The
# kernel is bound by memory bandwidth, where SSE2 vectors already keep up.
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)

#: Whether this process compiled the kernel (rather than loading a cached build); for diagnostics and tests.
built_here = False


def build_identity(source: bytes | None = None) -> dict[str, Any]:
    """Everything the compiled library depends on, as primitives. ``source`` defaults to the shipped file."""
    import torch

    source = SOURCE.read_bytes() if source is None else source
    compiler = os.environ.get("CXX", "c++")
    return {
        "source_sha256": hashlib.sha256(source).hexdigest(),
        "cflags": list(CFLAGS),
        "ldflags": list(LDFLAGS),
        "compiler": shutil.which(compiler) or compiler,
        "torch": torch.__version__,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "extension_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "machine": platform.machine(),
    }


def build_key(identity: dict[str, Any]) -> str:
    """A short, stable name for one build identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cache_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / NAME


def library_path(identity: dict[str, Any] | None = None) -> Path:
    """Where the finished library of ``identity`` (default: this checkout and environment) is cached."""
    from torch.utils.cpp_extension import LIB_EXT

    return cache_root() / build_key(identity or build_identity()) / f"{NAME}{LIB_EXT}"


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    import fcntl  # POSIX only, like the kernel build itself: `from legw_hf import Lamb` must work everywhere

    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_into(target: Path) -> ModuleType:
    """Compile in a private scratch directory, publish the library at ``target`` with one rename, and return
    the module (already imported by the build)."""
    global built_here
    from torch.utils.cpp_extension import load as build

    # A 30 s pause at the first step is worth one line at the default level.
    logger.warning("legw_hf: building LAMB's CPU kernel into %s (about 30 s, once per build key)", target.parent)
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.parent.name}.build-", dir=target.parent.parent))
    try:
        module = build(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(scratch),
            verbose=False,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(module.__file__, target)
        built_here = True
        return module
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, or None when it cannot be built here (the reason is warned once)."""
    try:
        target = library_path()
        if not target.is_file():
            target.parent.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target.parent.parent / f"{target.parent.name}.lock"):
                if not target.is_file():  # another process may have published it while we waited
                    return _build_into(target)
        return _import(target)
    except Exception as error:  # no compiler, no ninja, a read-only cache: all mean "not here"
        warnings.warn(
            f"legw_hf: LAMB's CPU kernel cannot be built here ({type(error).__name__}: {error}); "
            "Lamb uses its torch-ops path instead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
