"""Several runs of examples/accelerate_loop.py, one after another, in the processes of one launch.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/scripts/accelerate_loop_runs.py RUNS

RUNS is a JSON file mapping each run's name to its command line (the example's flags), run in that order. Starting
the processes (importing torch and accelerate, joining the process group) costs more than these loops, so the tests
that read such runs share one launch. Before each run accelerate's state is cleared as a new process finds it, except
the process group, which the launch made once, and the main process marks where the run's output begins
(``launch.RUN_MARK``; ``launch.split_runs`` cuts the output there).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "tests"))

import accelerate_loop  # noqa: E402
from launch import RUN_MARK  # noqa: E402

from legw_hf import exit_process  # noqa: E402


def main(runs_file: str) -> None:
    for name, argv in json.loads(Path(runs_file).read_text()).items():
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        if int(os.environ.get("RANK", "0")) == 0:
            for stream in (sys.stdout, sys.stderr):
                print(f"{RUN_MARK}{name}", file=stream, flush=True)
        accelerate_loop.main(argv)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)
