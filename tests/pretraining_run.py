"""Running ``legw-hf pretrain`` at a size that takes seconds, as a child process (for the pretraining tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from procs import python_env

from legw_hf.corpus import stdlib_docstrings

PHASES = {
    # seq, predictions, global batch, per device, base batch, base LR, base warmup steps, epochs
    "phase1": (32, 5, 32, 16, 16, 0.02, 4, 0.5),
    "phase2": (64, 10, 32, 8, 16, 0.01, 2, 0.5),
}
KEYS = (
    "seq_len",
    "max_predictions",
    "global_batch_size",
    "per_device_batch_size",
    "base_batch_size",
    "base_lr",
    "base_warmup_steps",
    "epochs",
)


def write_corpus(folder: Path) -> dict[str, Path]:
    """Small train and validation files made of standard-library docstrings, and a validation file too small."""
    docs = stdlib_docstrings()
    (folder / "train.txt").write_text("".join(f"{d}\n" for d in docs[:240]))
    (folder / "validation.txt").write_text("".join(f"{d}\n" for d in docs[240:300]))
    (folder / "tiny-validation.txt").write_text(docs[300] + "\n")
    return {
        "train": folder / "train.txt",
        "validation": folder / "validation.txt",
        "tiny": folder / "tiny-validation.txt",
        "cache": folder / "cache",
    }


def small_args(corpus, output_dir: Path, **changes: str) -> list[str]:
    flags = {
        "train_file": str(corpus["train"]),
        "validation_file": str(corpus["validation"]),
        "preprocessing_cache_dir": str(corpus["cache"]),
        "output_dir": str(output_dir),
        "vocab_size": "600",
        "average_last": "3",
        "average_interval": "2",
        "disable_tqdm": "true",
    }
    for phase, values in PHASES.items():
        flags.update({f"{phase}_{key}": str(value) for key, value in zip(KEYS, values, strict=True)})
    flags.update(changes)
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


def launch(args: list[str], launcher: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python [LAUNCHER ...] -m legw_hf.pretraining ARGS``, LAUNCHER such as ``-m torch.distributed.run ...``;
    DeepSpeed's launcher takes the module with ``--module``. CI is left out of the environment: with it,
    transformers prints Trainer's lines twice."""
    environment = {k: v for k, v in python_env().items() if k != "CI"} | (env or {})
    if not launcher:  # one process: both cores (the suite's default of 1 thread is for multi-process launches)
        environment["OMP_NUM_THREADS"] = "2"
    module = ["--module" if "deepspeed.launcher.runner" in launcher else "-m", "legw_hf.pretraining"]
    return subprocess.Popen(
        [sys.executable, *launcher, *module, *args],
        env=environment,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def run_program(args: list[str], launcher: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
    proc = launch(args, launcher, env)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def nvidia_lr(update: int, *, peak: float, total: int, warmup_fraction: float, power: float = 0.5) -> float:
    """NVIDIA's PolyWarmUpScheduler (DeepLearningExamples BERT) for the ``update``-th update (1-based) of a phase:
    the schedule at the progress that update completes."""
    progress = update / total
    if progress < warmup_fraction:
        return peak * progress / warmup_fraction
    return peak * (1 - progress) ** power
