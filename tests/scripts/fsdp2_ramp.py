"""A scheduled batch ramp in an accelerate loop under FSDP2, 2 processes: the checks of ``tests/test_sharded.py``.

Run from ``sharded_parity.py fsdp2`` (the same ``torchrun`` launch; its process group). accelerate switches FSDP on
only for GPU backends, so :func:`fsdp2_accelerator` turns the CPU state into accelerate's FSDP2 state after creating
it; from there everything is accelerate's own: ``prepare`` shards the model with ``fully_shard`` and swaps the
optimizer's parameters for their DTensors, ``no_sync`` calls ``set_requires_gradient_sync``, ``save_state`` and
``load_state`` write and read the sharded model and optimizer with ``torch.distributed.checkpoint``.

The ramp (:data:`RAMP`) takes 1, 2 and 4 micro-batches per update. Every update records its LR, this process's
sample ids, whether any gradient existed before its last micro-batch's backward (none may: the others accumulate
without reduction) and, gathered whole, the gradient it steps with. Rank 0 runs the same ramp in one process on the
whole batch of each update, with the LRs written out in ``test_ramp.written_out``: the reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from sharded_parity import PLAN, SEQ, VOCAB, build_optimizer, flat, full_parameters, model, relative_error
from test_ramp import written_out
from torch.utils.data import DataLoader, TensorDataset

from legw_hf import LegwConfig, SettingError
from legw_hf.integrations.accelerate import create_legw_scheduler, ramped_updates
from legw_hf.ramp import AutoRamp

DATASET, PER_DEVICE, EPOCHS, STOP = 32, 2, 2, 3
RAMP = "4@0,8@0.25,16@1"
#: RAMP for ``written_out``: (batch, epoch the stage starts at).
STAGES = [(4, 0.0), (8, 0.25), (16, 1.0)]
CONFIG = LegwConfig(**PLAN)
OPTIMIZER = "lamb-nvidia"
TOKENS = torch.randint(0, VOCAB, (DATASET, SEQ), generator=torch.Generator().manual_seed(5))


def fsdp2_accelerator():
    """A fresh ``Accelerator`` in accelerate's FSDP2 state (the CPU gate aside: see the module docstring). The
    embedding and the attention are FSDP modules of their own (the wrap policy): gradient sync is switched in each."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Embedding", "MultiheadAttention"],
        cpu_ram_efficient_loading=False,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # Where both states say FSDP, as on GPUs: every AcceleratorState() (accelerate makes them as it goes) copies the
    # PartialState's distributed type.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    assert accelerator.is_fsdp2
    return accelerator


def prepared(accelerator, batch_ramp=RAMP):
    net = model()
    optimizer = build_optimizer(OPTIMIZER, net)
    loader = DataLoader(TensorDataset(TOKENS, torch.arange(DATASET)), batch_size=PER_DEVICE)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    scheduler = create_legw_scheduler(accelerator, optimizer, CONFIG, loader, num_epochs=EPOCHS, batch_ramp=batch_ramp)
    return net, optimizer, loader, scheduler


def ramped_run(directory, stop: int | None = None, resume: bool = False) -> tuple[list[dict], torch.Tensor, object]:
    """The ramp from the start, or from ``directory`` (``load_state``); with ``stop``, ``save_state`` into it after
    that many updates. Each update's record, the parameters gathered whole, the optimizer."""
    accelerator = fsdp2_accelerator()
    net, optimizer, loader, scheduler = prepared(accelerator)
    if resume:
        accelerator.load_state(directory)
    records = []
    for update in ramped_updates(accelerator, scheduler, loader, net):
        ids, grads_before_last = [], False
        for position, (tokens, index) in enumerate(update.micro_batches()):
            if position + 1 == update.accumulation:
                grads_before_last = any(p.grad is not None for p in net.parameters())
            update.backward(net(tokens))
            ids += index.tolist()
        gradient = torch.cat([p.grad.full_tensor().reshape(-1) for p in net.parameters()])
        records.append(
            {
                "update": update.index,
                "batch": update.batch_size,
                "accumulation": update.accumulation,
                "lr": optimizer.param_groups[0]["lr"],
                "ids": ids,
                "grads_before_last": grads_before_last,
                "gradient": gradient,
            }
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if stop is not None and scheduler.updates == stop:
            accelerator.save_state(directory)
            break
    return records, full_parameters(net), optimizer


def one_process(updates: list[tuple[int, float]]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The written-out ramp on one process, each update one backward over its whole batch of consecutive samples:
    each update's gradient, the parameters after the last one and its trust ratios."""
    net = model()
    optimizer = build_optimizer(OPTIMIZER, net, sharded=False)
    gradients, start = [], 0
    for batch, lr in updates:
        positions = torch.arange(start, start + batch) % DATASET
        net(TOKENS[positions]).backward()
        gradients.append(flat(p.grad for p in net.parameters()))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        start += batch
    return gradients, flat(net.parameters()), optimizer.trust_stats[:, 2]


def auto_ramp_refusal() -> str | None:
    try:
        prepared(fsdp2_accelerator(), AutoRamp(max_batch=16))
    except SettingError as error:
        return str(error)
    return None


def checks(directory) -> dict | None:
    """Rank 0: per update of the uninterrupted run, what the test compares with the written-out ramp, and the
    errors against one process; the resumed run's records and parameters against the uninterrupted run's; the
    AutoRamp refusal. The other ranks: their sample ids (None)."""
    whole, parameters, optimizer = ramped_run(directory)
    ramped_run(directory, stop=STOP)
    resumed, resumed_parameters, _ = ramped_run(directory, resume=True)
    refusal = auto_ramp_refusal()
    rank_ids = [None] * dist.get_world_size()
    dist.all_gather_object(rank_ids, [record["ids"] for record in whole])
    if dist.get_rank() != 0:
        return None
    schedule = {"base_lr": PLAN["base_lr"], "base_warmup_epochs": PLAN["base_warmup_epochs"]}
    expected = written_out(STAGES, dataset_size=DATASET, epochs=EPOCHS, base_batch=PLAN["base_batch_size"], **schedule)
    gradients, reference, trust_ratios = one_process(expected)
    return {
        "updates": [
            {key: record[key] for key in ("update", "batch", "accumulation", "lr", "grads_before_last")}
            | {"ids": [ids[n] for ids in rank_ids], "gradient_error": relative_error(record["gradient"], gradient)}
            for n, (record, gradient) in enumerate(zip(whole, gradients, strict=True))
        ],
        "parameters_error": relative_error(parameters, reference),
        "trust_ratio_error": relative_error(optimizer.optimizer.trust_stats[:, 2], trust_ratios),
        "resumed_updates": [record["update"] for record in resumed],
        "resumed_lrs_equal": [r["lr"] for r in resumed] == [r["lr"] for r in whole[STOP:]],
        "resumed_gradients_equal": all(
            torch.equal(r["gradient"], w["gradient"]) for r, w in zip(resumed, whole[STOP:], strict=True)
        ),
        "resumed_bit_identical": bool(torch.equal(resumed_parameters, parameters)),
        "resumed_error": relative_error(resumed_parameters, parameters),
        "auto_ramp_refusal": refusal,
    }
