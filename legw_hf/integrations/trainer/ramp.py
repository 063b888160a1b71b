"""A batch ramp in Trainer (``--legw_batch_ramp``): the global batch grows during the run, the per-device
micro-batch stays fixed, and every update takes LEGW's LR for its own batch (:class:`~legw_hf.ramp.RampedPlan`).

Trainer accumulates a fixed number of micro-batches per update, so the ramp hands it one *virtual batch* per
update instead: Trainer runs with ``gradient_accumulation_steps = 1`` over one epoch of ``total_steps`` batches, and
each batch a process receives is its share of one update, already collated into micro-batches of
``per_device_train_batch_size`` (:class:`MicroBatches`). ``LegwTrainer.training_step`` runs Trainer's own step on
each of them, all-reducing gradients only on the last, as Trainer's accumulation does.

The samples come from :class:`RampBatchSampler`: a stream of data passes, each a permutation seeded as Trainer's own
sampler seeds its epochs (``data_seed``, else ``seed``, plus the pass number), from which update ``n`` takes the
next ``B_n`` indices, so an update can begin in one pass and end in the next and progress is counted in samples.
A run resumed from a checkpoint skips ``global_step`` batches of that one epoch, which are exactly the updates done.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers.trainer_utils import seed_worker

from ...errors import SettingError
from ...plan import LegwConfig
from ...ramp import BatchRamp, RampedPlan, ramped_plan
from ...schedules import DECAY_OPTIONS
from .flags import as_argument_error, changed_fields

#: Train sampling strategies the ramp's sampler follows (the others group samples into batches themselves).
SAMPLING_STRATEGIES = ("random", "sequential")


def check_ramp_arguments(args: Any) -> None:
    """What ``--legw_batch_ramp`` cannot run beside, before ``TrainingArguments.__post_init__`` (nothing is written
    yet). Trainer's accelerator settings are checked after it: :func:`check_ramp_accelerator`."""
    if args.legw_batch_ramp is None:
        return
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
    if args.legw_adascale is not None:
        raise SettingError(
            "legw_adascale",
            f"is not supported with {ramp}: AdaScale's gain modes set the LR themselves, and its statistics assume "
            "one global batch for the whole run",
            args.legw_adascale,
        )
    if args.deepspeed:
        raise SettingError(
            "deepspeed",
            f"is not supported with {ramp} yet: DeepSpeed's engine fixes the accumulation in its config, and the ramp "
            "changes it from stage to stage; train with DDP (torchrun / accelerate launch without DeepSpeed)",
            args.deepspeed,
        )
    if args.fsdp or args.fsdp_config:
        raise SettingError(
            "fsdp",
            f"is not supported with {ramp} yet: the ramp's accumulation is tested under DDP only; train with DDP "
            "(torchrun / accelerate launch without FSDP)",
            args.fsdp or args.fsdp_config,
        )
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in SAMPLING_STRATEGIES:
        raise SettingError(
            "train_sampling_strategy",
            f"must be {' or '.join(SAMPLING_STRATEGIES)} with {ramp}: the ramp draws each update's samples itself",
            strategy,
        )


def check_ramp_accelerator(args: Any) -> None:
    """The accelerator settings the ramp cannot run with (read after ``TrainingArguments.__post_init__``)."""
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


def plan_of_ramp(args: Any, train_dataset: Any, config: LegwConfig | None = None) -> RampedPlan:
    """The :class:`RampedPlan` of a Trainer run: ``--legw_batch_ramp`` over ``--num_train_epochs`` of the train
    dataset, micro-batch steps of per-device batch x processes. ``config`` (given in code) replaces the config of the
    ``--legw_*`` fields; errors name the flag (or, for that config's own fields, the config's keyword)."""
    if train_dataset is None or isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
        raise SettingError(
            "legw_batch_ramp",
            "needs a train dataset with a length (map-style): the ramp draws each update's samples from it and counts "
            "epochs by it",
            args.legw_batch_ramp,
            detail=f"train dataset: {type(train_dataset).__name__}",
        )
    try:
        return ramped_plan(
            config or args.legw_config(),
            args.legw_batch_ramp,
            dataset_size=len(train_dataset),
            epochs=args.num_train_epochs,
            micro_step_samples=args.train_batch_size * args.world_size,
        )
    except SettingError as error:
        if config is not None and (error.field in LegwConfig.__dataclass_fields__ or error.field in DECAY_OPTIONS):
            raise  # a setting of the config given in code, named as that config names it
        raise as_argument_error(error) from None


def check_ramp_resume(saved: dict[str, Any] | None, plan: RampedPlan | None) -> None:
    """A checkpoint resumes a ramped run only when it was saved under the same ramp over the same data and length
    (its updates are then this run's updates, at any world size); a ramped checkpoint only resumes a ramped run."""
    if saved is None or (plan is None and "ramp" not in saved):
        return
    if plan is None:
        raise SettingError(
            "legw_batch_ramp",
            "must be given to resume this checkpoint: it was saved by a batch-ramp run",
            None,
            detail=f"the checkpoint's ramp: {saved['ramp']}",
        )
    current = plan.to_dict()
    shape = ("dataset_size", "epochs")
    same = saved.get("ramp") == current["ramp"] and all(
        [p.get(key) for p in saved.get("plans", [])] == [p[key] for p in current["plans"]] for key in shape
    )
    if not same:
        was = saved.get("ramp", "no ramp")
        raise SettingError(
            "legw_batch_ramp",
            "must be the checkpoint's ramp, over the same dataset size and --num_train_epochs, to resume it: update n "
            "of another ramp is not the same samples",
            current["ramp"],
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


class MicroBatchCollator:
    """Collates one process's share of an update into :class:`MicroBatches` of ``micro_batch`` samples each."""

    def __init__(self, collate: Callable[[list], Any], micro_batch: int) -> None:
        self.collate = collate
        self.micro_batch = micro_batch

    def __call__(self, samples: list) -> MicroBatches:
        starts = range(0, len(samples), self.micro_batch)
        return MicroBatches(self.collate(samples[start : start + self.micro_batch]) for start in starts)


class RampBatchSampler:
    """The index lists of a batch ramp: for update ``n``, ``processes`` lists of ``B_n / processes`` indices, list
    ``r`` for process ``r`` (accelerate's ``BatchSamplerShard`` deals list ``i`` to process ``i % processes``).

    Update ``n`` takes the next ``B_n`` indices of a stream of data passes, each pass a permutation of the dataset
    seeded with ``seed + pass`` (as Trainer's sampler seeds its epochs), or the dataset in order with
    ``shuffle=False``. Within the update, micro-batch step ``s`` takes ``processes`` consecutive micro-batches and
    process ``r`` the ``r``-th of them, as Trainer deals its micro-batches: a one-stage ramp reads the data as a run
    with Trainer's own accumulation does.
    """

    #: Lists of varying length: ``BatchSamplerShard`` deals them without padding or cutting.
    batch_size = None
    #: Every update gives every process a full list, so nothing is left to pad at the end.
    drop_last = True

    def __init__(self, plan: RampedPlan, *, processes: int, micro_batch: int, seed: int, shuffle: bool = True) -> None:
        if plan.micro_step_samples != processes * micro_batch:
            raise ValueError(
                f"the plan's micro-batch step ({plan.micro_step_samples}) is not micro-batch x processes "
                f"({micro_batch} x {processes})"
            )
        self.plan = plan
        self.processes = processes
        self.micro_batch = micro_batch
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return self.plan.total_steps * self.processes

    def _stream(self) -> Iterator[int]:
        size = self.plan.dataset_size
        for data_pass in itertools.count():
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + data_pass)
                yield from torch.randperm(size, generator=generator).tolist()
            else:
                yield from range(size)

    def __iter__(self) -> Iterator[list[int]]:
        stream = self._stream()
        step = self.micro_batch * self.processes
        for update in range(self.plan.total_steps):
            indices = list(itertools.islice(stream, self.plan.batch_for_update(update)))
            for process in range(self.processes):
                start = process * self.micro_batch
                yield [
                    index
                    for offset in range(0, len(indices), step)
                    for index in indices[offset + start : offset + start + self.micro_batch]
                ]


def ramp_dataloader(trainer: Any, plan: RampedPlan) -> Any:
    """The training dataloader of a batch ramp, built as Trainer builds its own (unused columns removed, its worker
    settings) and prepared by its accelerator."""
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
        plan,
        processes=args.world_size,
        micro_batch=args.train_batch_size,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        shuffle=getattr(args, "train_sampling_strategy", "random") != "sequential",
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=MicroBatchCollator(collate, args.train_batch_size),
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
