"""Lamb and Lars under DeepSpeed ZeRO 0-3 and FSDP2 against one process with the same global batch.

Run under ``deepspeed --num_gpus 2`` (``DS_ACCELERATOR=cpu``) with engine ``deepspeed``, or under ``torchrun
--nproc_per_node 2`` with engine ``fsdp2``. For every optimizer configuration (``optim_registry.SHARDED``; the engine
variants: ``SHARDED_FEW``) it trains a small transformer for ``STEPS`` steps sharded, and, on rank 0, the same model on
the whole batch in one process; for a few configurations it also trains once with the sharding awareness switched off
(each flat partition or local shard taken as a tensor of its own, norms not reduced), which must be far off. The
``*-triton`` runs take the Triton kernels (Triton's interpreter on CPU). Rank 0 writes ``result.json`` beside the
output path: per engine and configuration the relative parameter error of the aware and the naive run, and the
all-reduces per ``step()``; with ``fsdp2`` also the batch-ramp runs of ``trainer_fsdp2_ramp.py`` (LegwTrainer) and the
checks of ``fsdp2_ramp.py`` (an accelerate loop).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from optim_registry import SHARDED, SHARDED_EVERY_CONFIG, SHARDED_FEW, makes_naive_run
from torch import nn

from legw_hf import decay_param_groups
from legw_hf.distributed import NormReduction
from legw_hf.optim._base import LayerwiseOptimizer
from legw_hf.shutdown import exit_process

STEPS, VOCAB, DIM, SEQ, BATCH = 10, 37, 14, 6, 8


class TinyTransformer(nn.Module):
    """Embedding, self-attention, LayerNorm, an MLP with biases: sizes that do not split evenly in two."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.attention = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.hidden = nn.Linear(DIM, 19)
        self.out = nn.Linear(19, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.norm(x + self.attention(x, x, x, need_weights=False)[0])
        logits = self.out(torch.tanh(self.hidden(x)))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens.roll(1, dims=1).reshape(-1))


def model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def build_optimizer(name: str, net: nn.Module, sharded: bool = True, triton: bool = False) -> LayerwiseOptimizer:
    """The configuration ``name`` of ``optim_registry.SHARDED`` over ``net``'s decay groups; with ``triton``, on the
    Triton kernels (in Triton's interpreter on CPU, with 128-element chunks so that tensors span several). The
    one-process reference (``sharded=False``) keeps the default path, an independent one."""
    config = SHARDED[name]
    masters = next(net.parameters()).dtype == torch.bfloat16  # as DeepSpeed keeps fp32 masters of bf16 weights
    groups = decay_param_groups(net, config.settings.get("weight_decay", 0.01), adapt_no_decay=None)
    path = {"impl": "triton"} if triton and sharded else {}
    return config.build(groups, master_weights=masters, **path)


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


@functools.cache
def single_process(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters after ``STEPS`` steps on the whole batch in one process, and the last step's trust ratios."""
    net = model()
    optimizer = build_optimizer(name, net, sharded=False)
    for tokens in batches():
        net(tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    return flat(net.parameters()), optimizer.trust_stats[:, 2]


class CollectiveCounter:
    """All-reduces issued inside the client optimizer's ``step()`` calls, and the LR of each call."""

    def __init__(self, optimizer: LayerwiseOptimizer) -> None:
        self.optimizer = optimizer
        self.calls, self.reduces, self.lrs = 0, 0, []
        original_step, original_all_reduce = optimizer.step, dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            self.reduces += 1
            return original_all_reduce(*args, **kwargs)

        def counted_step(*args, **kwargs):
            self.calls += 1
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))
            dist.all_reduce = counting_all_reduce
            try:
                return original_step(*args, **kwargs)
            finally:
                dist.all_reduce = original_all_reduce

        optimizer.step = counted_step


def naive(enabled: bool) -> None:
    """Switch the sharding awareness off: flat buffers are tensors of their own, partial norms stay partial."""

    def stranger_as_tensor(self, param):
        self._row_of[id(param)] = len(self._originals)
        self._originals.append((param, self.param_groups[0], f"flat{len(self._originals)}"))
        return None

    if enabled:
        LayerwiseOptimizer._layout_for_stranger = stranger_as_tensor
        NormReduction.__call__ = lambda self, squares: squares
    else:
        LayerwiseOptimizer._layout_for_stranger = ORIGINAL_STRANGER
        NormReduction.__call__ = ORIGINAL_REDUCE


ORIGINAL_STRANGER = LayerwiseOptimizer._layout_for_stranger
ORIGINAL_REDUCE = NormReduction.__call__


def deepspeed_run(
    name: str,
    stage: int,
    persistence: int = 0,
    bf16: bool = False,
    clipping: float = 0.0,
    scheduler=None,
    extra: dict | None = None,
    triton: bool = False,
) -> tuple[torch.Tensor, CollectiveCounter]:
    import deepspeed

    net = model()
    optimizer = build_optimizer(name, net, triton=triton)
    lr_scheduler = scheduler(optimizer) if scheduler is not None else None  # before the counter wraps step()
    counter = CollectiveCounter(optimizer)
    config = {
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clipping,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": persistence},
        "bf16": {"enabled": bf16},
        **(extra or {}),
    }
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler)
    rank, half = dist.get_rank(), BATCH // dist.get_world_size()
    for tokens in batches():
        engine.backward(engine(tokens[rank * half : (rank + 1) * half]))
        engine.step()
    params = list(net.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return flat(params), counter
    return flat(params), counter


def sharded_model(net: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in (net.embed, net.attention, net.hidden, net.out):
        fully_shard(module)
    return fully_shard(net)


def fsdp2_train(net: nn.Module, optimizer: LayerwiseOptimizer, steps: range) -> None:
    rank, half = dist.get_rank(), BATCH // dist.get_world_size()
    data = batches()
    for step in steps:
        net(data[step][rank * half : (rank + 1) * half]).backward()
        optimizer.step()
        optimizer.zero_grad()


def full_parameters(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.full_tensor().reshape(-1).float() for p in net.parameters()])


def fsdp2_run(name: str, triton: bool = False) -> tuple[torch.Tensor, CollectiveCounter]:
    net = sharded_model(model())
    optimizer = build_optimizer(name, net, triton=triton)
    counter = CollectiveCounter(optimizer)
    fsdp2_train(net, optimizer, range(STEPS))
    return full_parameters(net), counter


def fsdp2_accelerate_run(name: str) -> tuple[torch.Tensor, CollectiveCounter]:
    """As accelerate's FSDP2 ``prepare`` does it: the optimizer is built on the plain model and reloaded from its
    own state (``AcceleratedOptimizer`` places the state so: new param-group dicts), then each of its parameters is
    swapped for its DTensor (accelerate's own function)."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    net = model()
    optimizer = build_optimizer(name, net)
    optimizer.load_state_dict(optimizer.state_dict())
    old = {p.data_ptr: name for name, p in net.named_parameters()}
    sharded_model(net)
    new = dict(net.named_parameters())
    fsdp2_switch_optimizer_parameters(optimizer, {key: new[name] for key, name in old.items()})
    counter = CollectiveCounter(optimizer)
    fsdp2_train(net, optimizer, range(STEPS))
    return full_parameters(net), counter


def fsdp2_resumed(name: str, directory: Path) -> torch.Tensor:
    """Half the steps, a distributed checkpoint of model and optimizer, a fresh model and optimizer loaded from
    it, the other half."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net = sharded_model(model())
    optimizer = build_optimizer(name, net)
    fsdp2_train(net, optimizer, range(STEPS // 2))
    model_state, optimizer_state = get_state_dict(net, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / name))
    del net, optimizer

    net = sharded_model(model())
    optimizer = build_optimizer(name, net)
    model_state, optimizer_state = get_state_dict(net, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / name))
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    fsdp2_train(net, optimizer, range(STEPS // 2, STEPS))
    return full_parameters(net)


PLAN = {"base_batch_size": 4, "base_lr": 0.02, "base_warmup_epochs": 0.25}


def deepspeed_checks() -> dict:
    """A LEGW scheduler handed to ``deepspeed.initialize``; DeepSpeed's clipping beside LAMB pre-normalisation."""
    from legw_hf import LegwConfig, LegwScheduler, SettingError

    plan = LegwConfig(**PLAN).plan(batch_size=BATCH, dataset_size=5 * BATCH, epochs=STEPS / 5)
    _, counter = deepspeed_run("lamb-optax", 2, scheduler=lambda optimizer: LegwScheduler(optimizer, plan))
    try:
        deepspeed_run("lamb-nvidia", 2, clipping=1.0)
        refusal = None
    except SettingError as error:
        refusal = str(error)
    return {"scheduled_lrs": counter.lrs[::2], "double_clipping": refusal}


def fsdp2_overflow(name: str) -> dict:
    """torch's GradScaler over FSDP2 shards: the step whose loss overflows changes no weight and no step counter."""
    import math

    net = sharded_model(model())
    optimizer = build_optimizer(name, net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    rank, half = dist.get_rank(), BATCH // dist.get_world_size()
    data, unchanged = batches(), []
    for step in range(4):
        loss = net(data[step][rank * half : (rank + 1) * half])
        scaler.scale(loss * math.inf if step == 2 else loss).backward()
        weights = full_parameters(net)
        counters = [state["step"].clone() for state in optimizer.state.values()]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        # before the first step there is no state (and no counter) to compare
        states = list(optimizer.state.values())
        same_counters = len(counters) == len(states) > 0 and all(
            torch.equal(a, state["step"]) for a, state in zip(counters, states, strict=True)
        )
        unchanged.append(bool(torch.equal(weights, full_parameters(net)) and same_counters))
    return {"unchanged": unchanged, "scale": scaler.get_scale()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm())


def main(engine: str, output: str) -> None:
    from legw_hf.optim import _triton_kernel

    _triton_kernel.CHUNK, _triton_kernel.BLOCK = 128, 64
    if engine == "fsdp2":
        dist.init_process_group("gloo")
        runs = {"fsdp2": fsdp2_run, "fsdp2-accelerate": fsdp2_accelerate_run}
        runs["fsdp2-triton"] = lambda name: fsdp2_run(name, triton=True)
    else:
        import deepspeed

        deepspeed.init_distributed("gloo")
        runs = {f"zero{stage}": (lambda name, s=stage: deepspeed_run(name, s)) for stage in range(4)}
        # ZeRO-3's default keeps tensors under 100K elements whole on every rank (persistent)
        runs["zero3-persistent"] = lambda name: deepspeed_run(name, 3, persistence=100_000)
        # bf16: DeepSpeed's BF16_Optimizer at stage 0, its ZeRO partitions of fp32 masters at 2 and 3
        for stage in (0, 2, 3):
            runs[f"zero{stage}-bf16"] = lambda name, s=stage: deepspeed_run(name, s, bf16=True)
        # ZeRO-1 in bf16 with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer
        runs["zero1-bf16"] = lambda name: deepspeed_run(
            name, 1, bf16=True, extra={"data_types": {"grad_accum_dtype": "fp32"}}
        )
        # ZeRO-Offload: the fp32 partitions and moments on the host, the client optimizer kept (not DeepSpeedCPUAdam)
        for stage in (2, 3):
            offload = {"stage": stage, "offload_optimizer": {"device": "cpu"}}
            runs[f"zero{stage}-offload"] = lambda name, o=offload: deepspeed_run(
                name, o["stage"], extra={"zero_optimization": o, "zero_force_ds_cpu_optimizer": False}
            )
        # the Triton kernels' partial squares of flat partitions (pieces at any offset: unaligned addresses too)
        runs["zero2-triton"] = lambda name: deepspeed_run(name, 2, triton=True)
    result: dict[str, dict[str, dict[str, float]]] = {}
    kept: dict[str, torch.Tensor] = {}
    for run_name, run in runs.items():
        for name in SHARDED if run_name in SHARDED_EVERY_CONFIG else SHARDED_FEW:
            aware, counter = run(name)
            off = None
            # the unaware run shows the comparison can fail: a few configurations suffice
            if makes_naive_run(run_name, name):
                naive(True)
                off, _ = run(name)
                naive(False)
            if dist.get_rank() == 0:
                trust = None
                if run_name.endswith("bf16"):
                    # bf16 rounds differently in every pipeline: DeepSpeed's own unsharded bf16 run is the reference
                    reference = kept.setdefault(name, aware) if run_name == "zero0-bf16" else kept[name]
                else:
                    reference, ratios = single_process(name)
                    # trust_stats: one row per original tensor, the whole tensor's ratio, as in one process
                    trust = relative_error(counter.optimizer.trust_stats[:, 2], ratios)
                result.setdefault(run_name, {})[name] = {
                    "trust_ratios": trust,
                    "aware": relative_error(aware, reference),
                    "naive": None if off is None else relative_error(off, reference),
                    "reduces_per_step_call": counter.reduces / max(counter.calls, 1),
                    "step_calls": counter.calls,
                }
    if engine == "deepspeed":
        result["checks"] = deepspeed_checks()
    if engine == "fsdp2":
        overflow = fsdp2_overflow("lamb-nvidia")
        if dist.get_rank() == 0:
            result["fsdp2-gradscaler"] = overflow
        for name in SHARDED:
            uninterrupted, _ = fsdp2_run(name)
            resumed = fsdp2_resumed(name, Path(output).parent / "checkpoints")
            if dist.get_rank() == 0:
                result.setdefault("fsdp2-resume", {})[name] = relative_error(resumed, uninterrupted)
        from trainer_fsdp2_ramp import runs as trainer_ramp_runs  # resets accelerate's state after its runs

        trainer_ramp = trainer_ramp_runs(Path(output).parent / "trainer-ramp")
        if dist.get_rank() == 0:
            result["trainer-fsdp2-ramp"] = trainer_ramp
        from fsdp2_ramp import checks as ramp_checks  # last: it leaves accelerate's state set to FSDP2

        ramp = ramp_checks(Path(output).parent / "ramp-state")
        if dist.get_rank() == 0:
            result["fsdp2-ramp"] = ramp
    if dist.get_rank() == 0:
        Path(output).write_text(json.dumps(result, indent=2))
    dist.barrier()


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*arguments)
    exit_process()
