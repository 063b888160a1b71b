"""LAMB's CPU kernel cache: keyed by what is built, shared by checkouts, built once by concurrent processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from procs import REPO

from legw_hf.optim import _cpu_kernel

PROBE = REPO / "tests" / "scripts" / "kernel_probe.py"


def checkout(tmp_path: Path, name: str) -> Path:
    """A copy of the package at another path, as a second clone or environment of the project would have."""
    root = tmp_path / name
    shutil.copytree(REPO / "legw_hf", root / "legw_hf", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def child_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each child imports its own checkout
    return env | {"TORCH_EXTENSIONS_DIR": str(cache)}


def start_probe(root: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PROBE), str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(cache),
    )


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_the_key_follows_what_changes_the_binary_and_nothing_else():
    identity = _cpu_kernel.build_identity()
    key = _cpu_kernel.build_key(identity)
    edited = _cpu_kernel.build_identity(b"// edited\n" + _cpu_kernel.SOURCE.read_bytes())
    assert _cpu_kernel.build_key(edited) != key
    for field, other in [("cflags", ["-O2"]), ("torch", "2.99.0"), ("cxx11_abi", not identity["cxx11_abi"])]:
        assert _cpu_kernel.build_key({**identity, field: other}) != key, field
    assert _cpu_kernel.build_key(dict(reversed(identity.items()))) == key
    # the checkout's location and the ninja on PATH do not change the binary, so they are not in the key
    assert not any(str(REPO) in str(value) or "ninja" in str(value) for value in identity.values())


@pytest.mark.multiprocess
def test_concurrent_processes_build_once_and_other_checkouts_reuse_the_build(tmp_path):
    cache = tmp_path / "cache"
    first, second = checkout(tmp_path, "clone-a"), checkout(tmp_path, "clone-b")
    # three processes at once, as torchrun ranks start: one builds, the others wait and load its library
    results = [finish(process) for process in [start_probe(first, cache) for _ in range(3)]]
    assert sorted(r["built_here"] for r in results) == [False, False, True]
    assert all(r["agrees"] for r in results)
    (library,) = {r["library"] for r in results}
    builds = [path for path in (cache / _cpu_kernel.NAME).iterdir() if path.is_dir()]
    assert [path.name for path in builds] == [Path(library).parent.name]  # no scratch directory left behind
    assert [path.name for path in builds[0].iterdir()] == [Path(library).name]
    published = Path(library).stat().st_mtime_ns

    reuse = finish(start_probe(second, cache))
    assert reuse["package"].startswith(str(second))
    assert not reuse["built_here"] and reuse["agrees"] and reuse["library"] == library
    assert Path(library).stat().st_mtime_ns == published

    # an edited source is another build key: it must not load the old library
    edited = checkout(tmp_path, "clone-c")
    source = edited / "legw_hf" / "optim" / "csrc" / "lamb_cpu.cpp"
    source.write_text("// edited\n" + source.read_text())
    code = (
        f"import sys; sys.path.insert(0, {str(edited)!r}); "
        "from legw_hf.optim import _cpu_kernel as k; print(k.library_path())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(cache), check=True
    )
    assert other.stdout.strip() != library
