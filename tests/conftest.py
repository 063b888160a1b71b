"""Shared pieces for the Trainer and accelerate tests: a small real model and dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep test processes from oversubscribing the 2 cores and from reaching for any hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU, Triton's kernels run in its interpreter on CPU tensors; it must be chosen before triton is imported.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Small train and validation text files for the pretraining program (``pretraining_run.write_corpus``)."""
    from pretraining_run import write_corpus

    return write_corpus(tmp_path_factory.mktemp("text"))


#: The slowest test modules, slowest first (seconds from `pytest --durations=0` on 2 cores). `make test` passes
#: `--dist loadscope --no-loadscope-reorder`: pytest-xdist hands whole modules to its workers (a module's shared runs
#: happen once) in collection order, so these start first and the workers end together. (By default xdist would
#: reorder the modules by their number of tests, which puts a slow module of one test last.)
SLOWEST_FIRST = (
    "test_sharded.py",
    "test_pretraining_distributed.py",
    "test_triton_kernel.py",
    "test_multinode.py",
    "test_reproduction.py",
    "test_accelerate.py",
    "test_pretraining.py",
    "test_elastic.py",
    "test_examples.py",
    "test_adascale.py",
    "test_cpu_kernel_cache.py",
    "test_trainer.py",
    "test_recipes.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module is kept


# `LEGW_TEST_CPU_LOG=FILE pytest ...` appends "seconds<TAB>test id" per test: the CPU time of the test, its fixtures'
# set-up and every process it waited for (the suite is CPU-bound on 2 cores, so CPU, not wall time, is what to cut).
if os.environ.get("LEGW_TEST_CPU_LOG"):
    import resource

    def _cpu_seconds() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        start = _cpu_seconds()
        yield
        with open(os.environ["LEGW_TEST_CPU_LOG"], "a") as log:
            log.write(f"{_cpu_seconds() - start:.1f}\t{item.nodeid}\n")
