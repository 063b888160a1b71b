"""A batch ramp in Trainer (``--legw_batch_ramp``): the global batch grows during the run, the per-device
micro-batch stays fixed, and every update takes LEGW's LR for its own batch (:class:`~legw_hf.ramp.RampedPlan`).

Trainer accumulates a fixed number of micro-batches per update, so the ramp hands it one update at a time instead:
Trainer runs with ``gradient_accumulation_steps = 1`` over one epoch of one batch per update, and
``LegwTrainer.get_batch_samples`` gathers that batch from the dataloader's micro-batches, as many as the plan gives
the update (:class:`MicroBatches`); ``LegwTrainer.training_step`` runs Trainer's own step on each of them,
reducing gradients only on the last, as Trainer's accumulation does. Under DeepSpeed (ZeRO 1-3) the engine's train
batch is set to each update's and the engine applies the update on its last micro-batch
(:mod:`legw_hf.integrations.deepspeed.accumulation`); the config leaves the accumulation and the train batch to
Trainer (``"auto"`` or out). Under FSDP2 (``--fsdp``) the micro-batches before the last run under accelerate's
``no_sync`` (``set_requires_gradient_sync(False)``): the last backward reduce-scatters the update's summed gradient.
An automatic ramp is refused under FSDP (its per-micro-batch statistics cannot be taken there).

The micro-batches come from :class:`RampBatchSampler`: a stream of data passes, each a permutation seeded as
Trainer's own sampler seeds its epochs (``data_seed``, else ``seed``, plus the pass number), cut into micro-batches
dealt to the processes in turn, so update ``n`` takes the next ``B_n`` samples, an update can begin in one pass and
end in the next, and progress is counted in samples. The sampler does not know the batches: they are read from the
plan when each update starts, which is what lets an automatic ramp (``--legw_batch_ramp auto``,
:class:`~legw_hf.ramp.AutoRamp`) grow the plan as the run goes, although the dataloader (accelerate's, its workers)
reads ahead. A run resumed from a checkpoint skips the micro-batches of the ``global_step`` updates done.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers.trainer_utils import seed_worker

from ...errors import SettingError
from ...plan import LegwConfig
from ...ramp import AUTO_RAMP_UNSUPPORTED, AutoRamp, BatchRamp, RampedPlan, ramped_plan
from ...schedules import DECAY_OPTIONS
from ...settings import trainer_argument
from .. import deepspeed as deepspeed_config
from .flags import as_argument_error, changed_fields

#: Train sampling strategies the ramp's sampler follows (the others group samples into batches themselves).
SAMPLING_STRATEGIES = ("random", "sequential")

#: ``--legw_batch_ramp`` of a ramp decided during the run.
AUTO = "auto"
#: The decision log of an automatic ramp in the output directory, unless ``--legw_ramp_log`` names another file.
DECISION_LOG = "legw_ramp_decisions.jsonl"
#: The flags of an automatic ramp (``--legw_ramp_max_batch``, ...): :class:`~legw_hf.ramp.AutoRamp`'s keywords.
AUTO_RAMP_FLAGS = tuple(trainer_argument(field.name) for field in dataclasses.fields(AutoRamp))


def auto_ramp(args: Any) -> AutoRamp | None:
    """The :class:`~legw_hf.ramp.AutoRamp` of ``--legw_batch_ramp auto`` and the ``--legw_ramp_*`` flags (None for
    any other run); errors name the flag."""
    if getattr(args, "legw_batch_ramp", None) != AUTO:
        return None
    if args.legw_ramp_max_batch is None:
        raise SettingError(
            "legw_ramp_max_batch",
            "is required by --legw_batch_ramp auto: the largest batch the ramp may reach (the start batch times a "
            "power of 2)",
            None,
        )
    log = args.legw_ramp_log if args.legw_ramp_log is not None else str(Path(args.output_dir) / DECISION_LOG)
    try:
        return AutoRamp(
            max_batch=args.legw_ramp_max_batch,
            efficiency=args.legw_ramp_efficiency,
            patience=args.legw_ramp_patience,
            start_batch=args.legw_ramp_start_batch,
            log=log,
        )
    except SettingError as error:
        raise as_argument_error(error) from None


def check_ramp_arguments(args: Any) -> None:
    """What ``--legw_batch_ramp`` cannot run beside, before ``TrainingArguments.__post_init__`` (nothing is written
    yet). Trainer's accelerator settings are checked after it: :func:`check_ramp_accelerator`."""
    if args.legw_batch_ramp != AUTO:
        for name in changed_fields(args, AUTO_RAMP_FLAGS):
            raise SettingError(
                name,
                "is only taken by --legw_batch_ramp auto (the ramp decided during the run); it would be ignored",
                getattr(args, name),
            )
    if args.legw_batch_ramp is None:
        return
    automatic = auto_ramp(args)
    if automatic is None:
        try:
            BatchRamp.parse(args.legw_batch_ramp)
        except SettingError as error:
            raise as_argument_error(error) from None
    ramp = "--legw_batch_ramp"
    refusals = {
        "gradient_accumulation_steps": "must be 1 with {ramp}: the ramp sets each update's accumulation (its stage "
        "batch / (per-device batch x processes))",
        "max_steps": "must be left unset with {ramp}: the ramp's length is --num_train_epochs, the epochs its stages "
        "are placed in",
        "legw_base_steps": "must be left unset with {ramp}: the ramp's length is --num_train_epochs, the epochs its "
        "stages are placed in",
        "legw_global_batch_size": "must be left unset with {ramp}: the ramp gives every update's global batch",
        "legw_dataset_size": "must be left unset with {ramp}: the ramp draws its samples from the train dataset, "
        "whose length is the epoch",
        "auto_find_batch_size": "must be off with {ramp}: the stage batches are multiples of the per-device batch, "
        "which must not shrink",
        "dataloader_drop_last": "must be off with {ramp}: updates run across epoch ends, so no batch is partial",
        "ignore_data_skip": "must be off with {ramp}: a resumed ramp skips the updates done (the next updates' "
        "samples and batches are their own)",
    }
    for name in changed_fields(args, tuple(refusals)):
        raise SettingError(name, refusals[name].format(ramp=ramp), getattr(args, name))
    if automatic is not None and args.deepspeed:
        # the statistics are taken inside DeepSpeed's step, as AdaScale's are (the start batch's estimates are
        # checked with the plan)
        config = deepspeed_config.user_config(args.deepspeed)
        refusal = deepspeed_config.adascale_refusal(config, "diagnostics", fp16=args.fp16)
        if refusal is not None:
            raise SettingError("legw_batch_ramp", f"auto {refusal}", AUTO)
    if automatic is not None and (args.fsdp or args.fsdp_config):
        raise SettingError(
            "fsdp",
            f"is not supported with --legw_batch_ramp auto: {AUTO_RAMP_UNSUPPORTED['FSDP']}; run it with DDP or "
            "DeepSpeed",
            args.fsdp or args.fsdp_config,
        )
    if args.legw_adascale is not None:
        raise SettingError(
            "legw_adascale",
            f"is not supported with {ramp}: AdaScale's gain modes set the LR themselves, and its statistics assume "
            "one global batch for the whole run",
            args.legw_adascale,
        )
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in SAMPLING_STRATEGIES:
        raise SettingError(
            "train_sampling_strategy",
            f"must be {' or '.join(SAMPLING_STRATEGIES)} with {ramp}: the ramp draws each update's samples itself",
            strategy,
        )


def check_ramp_accelerator(args: Any) -> None:
    """The accelerator, FSDP and DeepSpeed settings the ramp cannot run with (read after
    ``TrainingArguments.__post_init__``, which reads ``fsdp_config`` into accelerate's plugin arguments and fills a
    DeepSpeed config's ``"auto"`` entries from the arguments)."""
    if args.legw_batch_ramp is None:
        return
    config = args.accelerator_config
    for name in ("split_batches", "dispatch_batches"):
        if getattr(config, name, None):
            raise SettingError(
                "accelerator_config",
                f"must leave {name} off with --legw_batch_ramp: the ramp deals every process its own micro-batches",
                {name: True},
            )
    fsdp_plugin = getattr(args, "fsdp_plugin_args", None)
    if fsdp_plugin is not None and fsdp_plugin.get("fsdp_version") != 2:
        raise SettingError(
            "fsdp_config",
            'must select FSDP2 ("version": 2, Trainer\'s default) with --legw_batch_ramp: the ramp runs and is tested '
            "under FSDP2 (FSDP1 is deprecated in transformers)",
            {"version": fsdp_plugin.get("fsdp_version")},
        )
    ds_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
    # Trainer fills "auto" with these (accumulation 1); the ramp then sets the engine's batch for every update
    filled = {
        "gradient_accumulation_steps": (1, "--gradient_accumulation_steps"),
        "train_batch_size": (args.train_batch_size * args.world_size, "per-device batch x processes"),
    }
    for name, (value, meaning) in filled.items():
        if name in ds_config and ds_config[name] != value:
            raise SettingError(
                "deepspeed",
                f'must leave "{name}" "auto" or out of its config with --legw_batch_ramp (Trainer fills it with '
                f"{meaning} = {value}): the ramp sets the engine's train batch and accumulation for every update",
                {name: ds_config[name]},
            )


def plan_of_ramp(args: Any, train_dataset: Any, config: LegwConfig | None = None) -> RampedPlan:
    """The :class:`RampedPlan` of a Trainer run: ``--legw_batch_ramp`` over ``--num_train_epochs`` of the train
    dataset, micro-batch steps of per-device batch x processes; for an automatic ramp its first plan, one stage at
    the start batch (every batch it may double to is planned here too, so a cap the run cannot take fails now).
    ``config`` (given in code) replaces the config of the ``--legw_*`` fields; errors name the flag (or, for that
    config's own fields, the config's keyword)."""
    if train_dataset is None or isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
        raise SettingError(
            "legw_batch_ramp",
            "needs a train dataset with a length (map-style): the ramp draws each update's samples from it and counts "
            "epochs by it",
            args.legw_batch_ramp,
            detail=f"train dataset: {type(train_dataset).__name__}",
        )
    shape = {
        "dataset_size": len(train_dataset),
        "epochs": args.num_train_epochs,
        "micro_step_samples": args.train_batch_size * args.world_size,
    }
    automatic = auto_ramp(args)
    try:
        if automatic is not None:
            return automatic.plans(config or args.legw_config(), micro_batch=args.train_batch_size, **shape)[0]
        return ramped_plan(config or args.legw_config(), args.legw_batch_ramp, **shape)
    except SettingError as error:
        if config is not None and (error.field in LegwConfig.__dataclass_fields__ or error.field in DECAY_OPTIONS):
            raise  # a setting of the config given in code, named as that config names it
        raise as_argument_error(error) from None


def check_ramp_resume(
    saved: dict[str, Any] | None, plan: RampedPlan | None, automatic: AutoRamp | None = None, decided: bool = False
) -> None:
    """A checkpoint resumes a ramped run only when it was saved under the same ramp over the same data and length
    (its updates are then this run's updates, at any world size); a ramped checkpoint only resumes a ramped run. An
    automatic ramp (``automatic``, whose first plan is ``plan``) resumes a checkpoint of an automatic ramp
    (``decided``: it holds the decisions) whose stages it can have decided: its start batch, doublings up to its cap."""
    if saved is None or (plan is None and "ramp" not in saved):
        return
    if plan is None:
        raise SettingError(
            "legw_batch_ramp",
            "must be given to resume this checkpoint: it was saved by a batch-ramp run",
            None,
            detail=f"the checkpoint's ramp: {saved['ramp']}",
        )
    was = saved.get("ramp", "no ramp")
    shape = ("dataset_size", "epochs")
    same_run = bool(saved.get("plans")) and all(
        [p.get(key) for key in shape] == [plan.dataset_size, plan.epochs] for p in saved["plans"]
    )
    if automatic is not None:
        start = plan.batch_for_update(0)
        if not (decided and same_run and automatic.takes(BatchRamp.parse(saved["ramp"]), start)):
            raise SettingError(
                "legw_batch_ramp",
                f"auto resumes a checkpoint of an automatic ramp over the same dataset size and --num_train_epochs, "
                f"from batch {start} doubling up to --legw_ramp_max_batch {automatic.max_batch} (to replay a ramp, "
                "give its stages)",
                AUTO,
                detail=f"the checkpoint's: {was}{'' if decided else ' (no decisions)'}",
            )
        return
    if not (saved.get("ramp") == plan.ramp.to_text() and same_run):
        raise SettingError(
            "legw_batch_ramp",
            "must be the checkpoint's ramp, over the same dataset size and --num_train_epochs, to resume it: update n "
            "of another ramp is not the same samples",
            plan.ramp.to_text(),
            detail=f"the checkpoint's: {was}",
        )


class MicroBatches(list):
    """One process's share of one update: its micro-batches, each collated as Trainer collates a batch.

    Trainer's loop treats the share as one batch of inputs: ``"input_ids" in share`` asks whether the micro-batches
    have that key, and ``share["input_ids"]`` gives all their values flattened into one tensor, enough for Trainer's
    token count and FLOP estimate. Integer indexing gives the micro-batches."""

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return bool(self) and all(isinstance(batch, dict) and key in batch for batch in self)
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return torch.cat([torch.as_tensor(batch[key]).reshape(-1) for batch in self])
        return super().__getitem__(key)


class RampBatchSampler:
    """The index lists of a batch ramp: the micro-batches of a stream of data passes, ``micro_batch`` consecutive
    indices each, ``samples`` indices in all; accelerate's ``BatchSamplerShard`` deals list ``i`` to process
    ``i % processes``, so micro-batch step ``s`` gives each process one micro-batch of the stream's next
    ``micro_batch x processes`` samples, process ``r`` the ``r``-th, as Trainer deals its micro-batches.

    Each pass is a permutation of the dataset seeded with ``seed + pass`` (as Trainer's sampler seeds its epochs),
    or the dataset in order with ``shuffle=False``. Every stage batch is a whole number of micro-batch steps, so
    update ``n`` takes the stream's samples from ``samples_before(n)`` on: a one-stage ramp reads the data as a run
    with Trainer's own accumulation does.
    """

    #: The stream ends on a whole micro-batch step: nothing is left to pad.
    drop_last = True

    def __init__(
        self, dataset_size: int, *, samples: int, processes: int, micro_batch: int, seed: int, shuffle: bool = True
    ) -> None:
        if samples % (processes * micro_batch):
            raise ValueError(f"{samples} samples: no whole number of micro-batch steps ({micro_batch} x {processes})")
        self.dataset_size = dataset_size
        self.samples = samples
        self.processes = processes
        self.batch_size = micro_batch
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return self.samples // self.batch_size

    def _stream(self) -> Iterator[int]:
        for data_pass in itertools.count():
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + data_pass)
                yield from torch.randperm(self.dataset_size, generator=generator).tolist()
            else:
                yield from range(self.dataset_size)

    def __iter__(self) -> Iterator[list[int]]:
        stream = self._stream()
        for _ in range(len(self)):
            yield list(itertools.islice(stream, self.batch_size))


def ramp_samples(plan: RampedPlan, automatic: AutoRamp | None) -> int:
    """The samples a ramped run takes: its plan's; for an automatic ramp (``plan`` its first plan) the most it can
    take, since every doubling only moves the end to the first update boundary at or past the run's epochs, at most
    one update (of at most the cap) beyond them."""
    samples = plan.samples_before(plan.total_steps)
    return samples if automatic is None else samples + automatic.max_batch


def ramp_dataloader(trainer: Any, samples: int) -> Any:
    """The training dataloader of a batch ramp, ``samples`` samples in micro-batches of the per-device batch (the
    stream of :class:`RampBatchSampler`), built as Trainer builds its own (unused columns removed, its collator and
    worker settings) and prepared by its accelerator."""
    args = trainer.args
    dataset, collate = trainer.train_dataset, trainer.data_collator
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with the test extras
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="Training")
    else:
        collate = trainer._get_collator_with_removed_columns(collate, description="Training")
    sampler = RampBatchSampler(
        len(dataset),
        samples=samples,
        processes=args.world_size,
        micro_batch=args.train_batch_size,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        shuffle=getattr(args, "train_sampling_strategy", "random") != "sequential",
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        prefetch_factor=args.dataloader_prefetch_factor,
        in_order=args.dataloader_in_order,
        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
    )
    prepared = trainer.accelerator.prepare(loader)
    dealer = getattr(prepared, "batch_sampler", None)
    processes = 1 if dealer is sampler else getattr(dealer, "num_processes", None)
    if processes != sampler.processes:
        raise RuntimeError(
            f"--legw_batch_ramp: accelerate deals the batches over {processes} processes, the ramp planned for "
            f"{sampler.processes} (data-parallel processes only: no tensor or context parallelism)"
        )
    return prepared
