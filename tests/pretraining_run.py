"""Running ``legw-hf pretrain`` at a size that takes seconds, as a child process (for the pretraining tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from launch import launch_environment, launcher_command, remove_deepspeed_shm_buffers

from legw_hf.pretraining.corpus import stdlib_docstrings

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
    docs = stdlib_docstrings()[:301]  # parsed once per process
    (folder / "train.txt").write_text("".join(f"{d}\n" for d in docs[:240]))
    (folder / "validation.txt").write_text("".join(f"{d}\n" for d in docs[240:300]))
    (folder / "tiny-validation.txt").write_text(docs[300] + "\n")
    return {
        "train": folder / "train.txt",
        "validation": folder / "validation.txt",
        "tiny": folder / "tiny-validation.txt",
        "cache": folder / "cache",
    }


def small_args(corpus, output_dir: Path | str, **changes: str) -> list[str]:
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


def launch(args: list[str], launcher: str = "python", env: dict[str, str] | None = None) -> subprocess.Popen:
    """``legw-hf pretrain ARGS`` as ``python -m legw_hf.pretraining`` under ``launcher`` (``launch.LAUNCHERS``, 2
    processes), output and errors in one stream."""
    # One thread per process, as the suite's default: the other test worker keeps the second core busy, and two
    # OpenMP threads on one free core spin against each other (the same run took 2.4x the CPU time).
    environment = launch_environment(launcher, env=env)
    return subprocess.Popen(
        [*launcher_command(launcher, 2, module=True), "legw_hf.pretraining", *args],
        env=environment,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def run_program(args: list[str], launcher: str = "python", env: dict[str, str] | None = None) -> str:
    proc = launch(args, launcher, env)
    output, _ = proc.communicate(timeout=600)
    left = remove_deepspeed_shm_buffers(proc.args)
    assert proc.returncode == 0, output[-4000:]
    assert not left, f"DeepSpeed's shared-memory buffers outlived a finished run: {left}"
    return output
