"""Stress check for the gloo shutdown abort (legw_hf/shutdown.py): the launch that failed CI, many times in a row.

    .venv/bin/python tests/stress_shutdown.py --launches 50            # torchrun, 2 gloo processes, examples/run_mlm.py
    .venv/bin/python tests/stress_shutdown.py --launches 50 --unfixed  # ending in a normal interpreter exit

Each launch is ``tests/test_examples.py``'s two-process run. ``--unfixed`` runs a copy of the example whose last line
is a plain ``main()`` after ``destroy_process_group()`` (what it did before), to show the abort still happens without
the fix on this machine. A launch that fails is kept in ``--keep`` with its log and, with ``ulimit -c unlimited``, the
core dump of the aborted process (``gdb -batch -ex "thread apply all bt" python core``). Not part of the test suite:
50 launches take about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from launch import launch_environment, launcher_command  # noqa: E402
from test_examples import LEGW_FLAGS, TINY_RUN  # noqa: E402

FIX_LINE = "    exit_process(main())"
UNFIXED = "    main()\n    import torch.distributed as dist\n\n    dist.barrier()\n    dist.destroy_process_group()"


def script(unfixed: bool, folder: Path) -> Path:
    example = REPO / "examples" / "run_mlm.py"
    if not unfixed:
        return example
    source = example.read_text()
    assert FIX_LINE in source, f"{example} no longer ends with {FIX_LINE.strip()!r}"
    copy = folder / "run_mlm_unfixed.py"
    copy.write_text(source.replace(FIX_LINE, UNFIXED))
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--unfixed", action="store_true", help="end with a normal interpreter exit (the old way)")
    parser.add_argument("--keep", type=Path, default=REPO / "runs" / "stress_shutdown", help="failed launches' logs")
    args = parser.parse_args()
    env = launch_environment("torchrun")
    failures = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        target = script(args.unfixed, folder)
        for launch in range(1, args.launches + 1):
            output = folder / "out"
            shutil.rmtree(output, ignore_errors=True)
            command = [*launcher_command("torchrun", 2), str(target), "--output_dir", str(output), *TINY_RUN]
            command += [*LEGW_FLAGS, "--use_cpu", "true", "--per_device_train_batch_size", "4"]
            command += ["--log_level_replica", "warning"]
            started = time.perf_counter()
            result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
            log = result.stdout + result.stderr
            aborted = "terminate called without an active exception" in log
            print(
                f"launch {launch}: exit {result.returncode}{' (abort)' if aborted else ''}, "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
            if result.returncode != 0:
                failures.append(launch)
                keep = args.keep / f"launch{launch}"
                keep.mkdir(parents=True, exist_ok=True)
                (keep / "log.txt").write_text(log)
                for core in folder.glob("core*"):
                    shutil.move(core, keep / core.name)
    print(
        f"{args.launches - len(failures)} passed, {len(failures)} failed"
        + (f": launches {failures}" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
