"""Compile the two C++ extensions the test suite loads, once, at ``make setup``: LAMB's CPU kernel
(``legw_hf.optim._cpu_kernel``, about 45 s of CPU) and DeepSpeed's CPU shared-memory communication op, which
``deepspeed.init_distributed`` JIT-builds on a CPU machine (about 80 s of CPU). Both land in torch's extension cache
(``TORCH_EXTENSIONS_DIR``), where every later process finds them; built here, the suite's first LAMB and DeepSpeed
tests do not pay for them, and no other process waits on the build lock meanwhile. A failed build fails setup."""

from __future__ import annotations

import os
import sys
import threading

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_deepspeed_shm_op(failures: list[str]) -> None:
    try:
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        ShareMemCommBuilder().load(verbose=False)
    except Exception as error:  # reported below, in the main thread
        failures.append(f"DeepSpeed's shm comm op: {type(error).__name__}: {error}")


def main() -> int:
    failures: list[str] = []
    deepspeed_build = threading.Thread(target=build_deepspeed_shm_op, args=(failures,))
    deepspeed_build.start()  # its compiler runs beside LAMB's: both cores busy
    from legw_hf.optim import _cpu_kernel

    if _cpu_kernel.load() is None:
        failures.append("LAMB's CPU kernel (see the warning above)")
    deepspeed_build.join()
    for failure in failures:
        print(f"build_extensions: could not build {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
