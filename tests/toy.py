"""A small real regression model and dataset for Trainer runs, and the LEGW formula written out."""

from __future__ import annotations

import math
from collections.abc import Callable

import datasets
import torch
from torch import nn
from transformers import TrainerCallback

from legw_hf import LegwTrainingArguments


class Regressor(nn.Module):
    """An MLP with a LayerNorm (so Trainer forms decay and no-decay groups) returning ``{"loss": mse}``.

    ``max_batch`` stands in for a memory limit: a larger micro-batch raises the CPU allocator's out-of-memory
    error, which Trainer's ``auto_find_batch_size`` reacts to. ``poison`` makes the loss infinite, which is
    what an fp16 overflow looks like to a GradScaler.
    """

    def __init__(self, features: int = 8, hidden: int = 16, max_batch: int | None = None, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.max_batch = max_batch
        self.poison = False

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise RuntimeError(
                f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {x.shape[0] * 2**30} bytes."
            )
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        return {"loss": loss * math.inf if self.poison else loss}


def regression_dataset(size: int = 100, features: int = 8, seed: int = 0, noise: float = 0.0) -> datasets.Dataset:
    """``noise`` adds that much Gaussian noise to the targets: the gradient noise scale grows with it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, features, generator=generator)
    y = torch.tanh(x @ torch.randn(features, generator=generator))
    if noise:
        y = y + noise * torch.randn(size, generator=generator)
    return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}).with_format("torch")


class SaveAt(TrainerCallback):
    """Saves a checkpoint at optimizer step ``step`` and trains on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True


class StopAt(TrainerCallback):
    """Saves a checkpoint at optimizer step ``step`` and stops there, as an interrupted run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


class PoisonSteps(TrainerCallback):
    """Makes the loss of chosen optimizer steps (all their micro-batches) infinite, as an fp16 overflow would."""

    def __init__(self, model: Regressor, steps: set[int]) -> None:
        self.model, self.steps = model, steps

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.poison = state.global_step in self.steps


def logged_learning_rates(log_history: list[dict]) -> list[float]:
    return [entry["learning_rate"] for entry in log_history if "learning_rate" in entry]


def legw_training_args(output_dir, **overrides) -> LegwTrainingArguments:
    """A small LEGW Trainer run on CPU: base batch 4, per-device 8 × accumulation 2 (k = 4), 3 epochs."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        learning_rate=0.05,
        legw_base_batch_size=4,
        legw_base_warmup_epochs=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
    )
    return LegwTrainingArguments(**(settings | overrides))


class RecordingRegressor(Regressor):
    """A :class:`Regressor` that records the first feature of every training sample it sees, per forward (one list
    per micro-batch): the samples identify themselves by it (:func:`sample_ids`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.micro_batches: list[list[float]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            self.micro_batches.append(x[:, 0].tolist())
        return super().forward(x, y)


class MicroBatchesPerUpdate(TrainerCallback):
    """The micro-batches (first features of their samples) a :class:`RecordingRegressor` saw in each update."""

    def __init__(self, model: RecordingRegressor) -> None:
        self.model = model
        self.updates: list[list[list[float]]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.updates.append(list(self.model.micro_batches))
        self.model.micro_batches.clear()


def sample_ids(dataset: datasets.Dataset, first_features: list[float]) -> list[int]:
    """The dataset indices of samples named by their first feature (as :class:`RecordingRegressor` records them)."""
    index = {value: i for i, value in enumerate(dataset[:]["x"][:, 0].tolist())}
    return [index[value] for value in first_features]


def ramped_updates_of(ranks: list[dict], dataset: datasets.Dataset) -> list[list[int]]:
    """The dataset indices of every update's samples, over all ranks (each rank's record lists per update its
    micro-batches by their first features, ``"micro_batches"``)."""
    updates = zip(*(record["micro_batches"] for record in ranks), strict=True)
    return [sample_ids(dataset, [x for share in shares for micro in share for x in micro]) for shares in updates]


def replayed_weights(
    updates: list[list[int]], lrs: list[float], dataset: datasets.Dataset, optimizer: Callable
) -> torch.Tensor:
    """The flat weights of a :class:`Regressor` trained in one process, one backward of the mean loss over each
    update's samples (dataset indices) and one step at its LR: where a run that accumulates and averages the same
    updates over micro-batches and processes must end. ``optimizer`` builds the optimizer from the parameters."""
    model = Regressor()
    steps = optimizer(model.parameters())
    for samples, lr in zip(updates, lrs, strict=True):
        for group in steps.param_groups:
            group["lr"] = lr
        model(dataset[samples]["x"], dataset[samples]["y"])["loss"].backward()
        steps.step()
        steps.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ramp_training_args(output_dir, **overrides) -> LegwTrainingArguments:
    """:func:`legw_training_args` with the batch ramp 8@0,16@1,32@2 over 3 epochs at base batch 8 (warmup 0.2 epochs),
    per-device 4, no accumulation of Trainer's own."""
    ramp = {"legw_batch_ramp": "8@0,16@1,32@2", "legw_base_batch_size": 8, "legw_base_warmup_epochs": 0.2}
    return legw_training_args(
        output_dir, **({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1} | ramp | overrides)
    )


#: The run shape of the automatic-ramp runs: per-device 2, base batch 4, 2 epochs (of the noisy data, NOISY_DATA).
RAMP_SHAPE = {"per_device_train_batch_size": 2, "legw_base_batch_size": 4, "num_train_epochs": 2}
#: An automatic ramp (--legw_batch_ramp auto) of that shape, doubling up to 32 after 3 updates at a batch; it starts
#: at per-device batch x processes unless --legw_ramp_start_batch says otherwise.
AUTO_RAMP = RAMP_SHAPE | {"legw_batch_ramp": "auto", "legw_ramp_max_batch": 32, "legw_ramp_patience": 3}
#: 128 samples whose targets are mostly noise: the gradient noise scale B_simple is tens of samples.
NOISY_DATA = {"size": 128, "noise": 3.0}
