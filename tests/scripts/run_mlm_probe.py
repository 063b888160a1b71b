"""``examples/run_mlm.py`` exactly as a launcher starts it, plus a callback that writes what each rank did.

Per rank, ``<output_dir>/rank<N>.json``: the world Trainer saw, the LEGW plan's summary, the LR in the innermost
optimizer as each update began (the LR that update applied), and a hash of the final parameters' bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "tests"))

import run_mlm  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from legw_hf import LegwTrainer  # noqa: E402
from legw_hf.shutdown import exit_process  # noqa: E402


def innermost(optimizer):
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


class RankRecord(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(float(innermost(optimizer).param_groups[0]["lr"]))

    def on_train_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        while not hasattr(lr_scheduler, "plan"):  # accelerate wraps the scheduler DeepSpeed is handed
            lr_scheduler = lr_scheduler.scheduler
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
        record = {
            "world_size": args.world_size,
            "process_index": args.process_index,
            "plan": lr_scheduler.plan.summary(),
            "lrs": self.lrs,
            "global_step": state.global_step,
            "parameters_sha256": digest.hexdigest(),
        }
        (Path(args.output_dir) / f"rank{args.process_index}.json").write_text(json.dumps(record))


class ProbedTrainer(LegwTrainer):
    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), RankRecord()], **kwargs)


run_mlm.Trainer = ProbedTrainer  # the script looks its Trainer up when main() runs

if __name__ == "__main__":
    run_mlm.main()
    exit_process()
