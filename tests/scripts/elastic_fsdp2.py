"""Elastic resume of an FSDP2 loop with LEGW and LAMB: a ``torch.distributed.checkpoint`` saved at one world size
and loaded at another, which re-shards the DTensor parameters and LAMB's moments; the LEGW scheduler carries the
progress over in epochs. Started once per phase by ``elastic.py`` (or on its own under ``torchrun --nproc_per_node
W``), with the runs of ``elastic_trainer.py`` (the same names and meaning). Each run writes
``<output>/fsdp2/<run>.rank<N>.json``; a resumed one also records how far LAMB's full moments after loading are
from the ones saved.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from elastic_trainer import Warnings
from sharded_parity import SEQ, VOCAB, build_optimizer, full_parameters, model, sharded_model
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from legw_hf import LegwConfig, LegwScheduler
from legw_hf.shutdown import exit_process

DATASET, PER_DEVICE, EPOCHS = 64, 4, 2
CONFIG = LegwConfig(base_batch_size=4, base_lr=0.02, base_warmup_epochs=0.25)
SAMPLES = torch.randint(0, VOCAB, (DATASET, SEQ), generator=torch.Generator().manual_seed(3))


def full_moments(optimizer) -> dict[str, torch.Tensor]:
    moments = {}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            moments[f"{index}.{key}"] = state[key].full_tensor().clone()
        moments[f"{index}.step"] = torch.as_tensor(state["step"]).clone().reshape(())
    return moments


def run(root: Path, name: str, accumulation: int, stop: int | None = None, resume: str | None = None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    global_batch = PER_DEVICE * accumulation * world
    net = sharded_model(model())
    optimizer = build_optimizer("lamb-nvidia", net)
    plan = CONFIG.plan(batch_size=global_batch, dataset_size=DATASET, epochs=EPOCHS)
    scheduler = LegwScheduler(optimizer, plan)
    caught = Warnings()
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(caught)
    moment_error = None
    if resume is not None:
        model_state, optimizer_state = get_state_dict(net, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(root / resume / "dcp"))
        set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        scheduler.load_state_dict(torch.load(root / resume / "scheduler.pt", weights_only=True))
        saved = torch.load(root / resume / "moments.pt", weights_only=True)
        loaded = full_moments(optimizer)
        moment_error = max(float((saved[k].float() - loaded[k].float()).abs().max()) for k in saved)
    logging.getLogger("py.warnings").removeHandler(caught)
    applied = []
    for update in range(scheduler.updates, plan.total_steps):
        applied.append(optimizer.param_groups[0]["lr"])
        start = update % plan.steps_per_epoch * global_batch  # the epoch position, as a sampler would give it
        for micro in range(accumulation):
            offset = start + (micro * world + rank) * PER_DEVICE
            tokens = SAMPLES[offset : offset + PER_DEVICE]
            (net(tokens) / accumulation).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if stop is not None and update + 1 == stop:
            model_state, optimizer_state = get_state_dict(net, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(root / name / "dcp"))
            moments = full_moments(optimizer)
            if rank == 0:
                torch.save(scheduler.state_dict(), root / name / "scheduler.pt")
                torch.save(moments, root / name / "moments.pt")
            dist.barrier()
            break
    record = {
        "world_size": world,
        "plan": plan.summary(),
        "applied_lrs": applied,
        "updates": scheduler.updates,
        "warnings": caught.messages,
        "moment_error": moment_error,
        "params": full_parameters(net).tolist(),
    }
    out = root / "fsdp2"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))


def main(phase: str, output: str) -> None:
    if not dist.is_initialized():  # started on its own; under elastic.py the Trainer runs made the group
        dist.init_process_group("gloo")
    root = Path(output)
    if phase == "first":
        run(root, "i1-changing", accumulation=1, stop=6)
        run(root, "i1-fixed", accumulation=2, stop=6)
        run(root, "u1-fixed", accumulation=2)
    elif phase == "second":
        run(root, "r2-changing", accumulation=1, resume="i1-changing")
        run(root, "r2-fixed", accumulation=1, resume="i1-fixed")
        run(root, "i2", accumulation=1, stop=5)
        run(root, "u2", accumulation=1)
    else:
        run(root, "r1-changing", accumulation=1, resume="i2")
        run(root, "r1-fixed", accumulation=2, resume="i2")


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    exit_process()
