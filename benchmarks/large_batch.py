"""Do the LEGW paper's large-batch claims hold at small scale? LEGW vs linear vs √k vs no scaling vs AdaScale.

Three tasks in the shape of the paper's (You et al., "Large-Batch Training for LSTM and Beyond", SC'19): an LSTM
classifier on mnist1d (an MNIST-like sequence dataset generated procedurally), a word-level LSTM language model on
WikiText-2, and the tiny BERT of the main job with LAMB. Each optimizer family is tuned once at the base batch B0
(``--sweep``, recorded in ``results/large_batch_sweep.*``); every arm then runs at k·B0 for k in the task's list,
for the same number of epochs, with those base settings and no other change:

- ``legw``: √k peak LR, k× the warmup in epochs (:data:`legw_hf.RULES`);
- ``linear``: k× peak LR, the same warmup epochs (Goyal et al. 2017);
- ``sqrt``: √k peak LR, the same warmup epochs;
- ``none``: the base schedule unchanged;
- ``adascale``: the base schedule driven by AdaScale's gain (``gain`` for SGD, ``sqrt_gain`` on Adam-preconditioned
  statistics for Adam and LAMB), measured on 4 micro-batches per update, trained until its scale-invariant progress
  reaches the base run's length (capped at ``ADASCALE_EPOCH_CAP`` × the epochs); the table shows the epochs it took.

At k = 1 every arm is the base run, so it runs once per seed. Runs are independent jobs spread over worker
processes of one thread each. Output: ``results/large_batch.{json,md}`` and PNG plots (metric vs batch per arm, the
LR curves at one batch).

    python benchmarks/large_batch.py              # the default set (docs/results.md)
    python benchmarks/large_batch.py --sweep      # the base-batch LR sweep the settings below come from
    python benchmarks/large_batch.py --smoke --out /tmp/smoke   # seconds: every task, arm and code path, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from machine import cpu_model
from torch import nn

from legw_hf import RULES, GradientNoise, Lamb, LegwConfig, LegwScheduler, decay_param_groups
from legw_hf.adascale import MODES, AdaScaleScheduler, GradientStatistics
from legw_hf.schedules import Decay, Polynomial, PolynomialOfRun

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
ARMS = ("legw", "linear", "sqrt", "none", "adascale")
#: Estimates of the gradient per AdaScale update (micro-batches of k·B0/4).
ADASCALE_ESTIMATES = 4
#: AdaScale trains until its progress reaches the base run's; it may need more epochs than the others, up to this.
ADASCALE_EPOCH_CAP = 2.0
LR_CURVE_POINTS = 150


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Family:
    """An optimizer family, tuned at B0: its base peak LR and warmup (epochs), and its AdaScale rule."""

    optimizer: str  # adam | adamw | momentum | lamb
    base_lr: float
    base_warmup_epochs: float
    sweep_lrs: tuple[float, ...]
    sweep_warmups: tuple[float, ...] = ()  # besides base_warmup_epochs

    @property
    def adascale_mode(self) -> str:
        return "gain" if self.optimizer == "momentum" else "sqrt_gain"


@dataclass(frozen=True)
class Size:
    """How big a task is run: examples (task-specific meaning), epochs, base batch and the batch multiples."""

    examples: int
    epochs: float
    base_batch: int
    ks: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    metric: str
    higher_is_better: bool
    families: dict[str, Family]
    full: Size
    smoke: Size
    decay: Decay = field(default_factory=Polynomial)
    max_grad_norm: float | None = None
    #: The data and model it trains (a key of DATA_BUILDERS): its own name unless another task's.
    data: str = ""

    def size(self, smoke: bool) -> Size:
        return self.smoke if smoke else self.full


# The base settings come from `--sweep` (results/large_batch_sweep.md): the best validation metric at B0, one seed.
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="mnist1d",
            title="LSTM classifier (hidden 64) on mnist1d: 10240 train / 2560 test sequences of 40 values, read as "
            "10 rows of 4",
            metric="test accuracy",
            higher_is_better=True,
            families={
                "adam": Family("adam", 3e-2, 0.025, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (0.1,)),
                "momentum": Family("momentum", 0.3, 0.025, (0.03, 0.1, 0.3, 1.0), (0.1,)),
            },
            full=Size(examples=12800, epochs=8, base_batch=16, ks=(1, 4, 16, 64)),
            smoke=Size(examples=640, epochs=1, base_batch=8, ks=(1, 4)),
        ),
        Task(
            name="wikitext2_lm",
            title="word-level LSTM language model (embedding = hidden = 64, tied, vocabulary 2000), WikiText-2 text, "
            "every 10th article held out, sequences of 35 tokens",
            metric="validation perplexity",
            higher_is_better=False,
            families={
                "adam": Family("adam", 3e-2, 0.02, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
                "momentum": Family("momentum", 1.0, 0.02, (0.3, 1.0, 3.0)),
            },
            full=Size(examples=10**9, epochs=3, base_batch=4, ks=(1, 4, 16, 64)),
            smoke=Size(examples=120, epochs=1, base_batch=4, ks=(1, 4)),
            max_grad_norm=1.0,
        ),
        Task(
            name="bert_tiny",
            title="BERT-tiny (2 layers, hidden 128) masked LM with LAMB (preset nvidia, weight decay 0.01) on the "
            "main job's corpus, WordPiece 4096, sequences of 64",
            metric="validation MLM loss",
            higher_is_better=False,
            families={"lamb": Family("lamb", 1e-2, 0.05, (5e-3, 1e-2, 2e-2))},
            full=Size(examples=10**9, epochs=2, base_batch=8, ks=(1, 4, 16)),
            smoke=Size(examples=48, epochs=1, base_batch=4, ks=(1, 4)),
            decay=PolynomialOfRun(power=0.5),
        ),
        # benchmarks/bert_scaling.py: the LR x batch study. Base LRs are the anchors of its √2 LR lattices.
        Task(
            name="bert_scaling",
            title="BERT-tiny (2 layers, hidden 128) masked LM on the main job's corpus, WordPiece 4096, sequences of "
            "64: LAMB (preset nvidia) and AdamW, weight decay 0.01 on both",
            metric="validation MLM loss",
            higher_is_better=False,
            families={"lamb": Family("lamb", 1e-2, 0.025, ()), "adamw": Family("adamw", 1e-3, 0.025, ())},
            full=Size(examples=10**9, epochs=2, base_batch=4, ks=(1, 4, 16)),
            smoke=Size(examples=48, epochs=1, base_batch=2, ks=(1, 4)),
            decay=PolynomialOfRun(power=0.5),
            data="bert_tiny",
        ),
    )
}


#: The tasks of this runner's experiments and sweep (the others belong to other benchmarks).
REPRODUCTION_TASKS = ("mnist1d", "wikitext2_lm", "bert_tiny")


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """Training examples (one tensor per field, first dimension the example), the model and how to score it."""

    train: dict[str, torch.Tensor]
    new_model: Callable[[], nn.Module]
    #: (summed loss, count) of a batch: the batch's mean loss is their ratio, a micro-batch's weight its count.
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[nn.Module], float]
    describe: str
    #: The trivial predictor's metric on the same evaluation data, and what it is.
    baseline: float
    baseline_name: str
    prepare_batch: Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]] = lambda b, g: b

    @property
    def size(self) -> int:
        return len(next(iter(self.train.values())))


class SequenceClassifier(nn.Module):
    """An LSTM reading the 40 values as 10 rows of 4 (as the LEGW paper's MNIST LSTM reads rows of pixels), classified
    from its last state."""

    def __init__(self, hidden: int = 64, row: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.row = row
        self.lstm = nn.LSTM(row, hidden, batch_first=True)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(x.view(len(x), -1, self.row))
        return self.out(states[:, -1])


class WordLanguageModel(nn.Module):
    def __init__(self, vocab: int, width: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.out = nn.Linear(width, vocab)
        self.out.weight = self.embedding.weight  # tied (Press & Wolf 2017)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(tokens))
        return self.out(states)


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, torch.tensor(float(targets.numel()))


@torch.no_grad()
def _mean_loss(model: nn.Module, loss: Callable, examples: dict[str, torch.Tensor], batch: int = 512) -> float:
    model.eval()
    total = count = 0.0
    n = len(next(iter(examples.values())))
    for start in range(0, n, batch):
        summed, items = loss(model, {k: v[start : start + batch] for k, v in examples.items()})
        total, count = total + float(summed), count + float(items)
    model.train()
    return total / count


def mnist1d_data(size: Size, cache: Path) -> TaskData:
    from mnist1d.data import get_dataset_args, make_dataset

    path = cache / f"mnist1d-{size.examples}.pt"
    if not path.is_file():
        args = get_dataset_args()
        args.num_samples = size.examples
        made = make_dataset(args)  # procedural, seeded by args.seed: the same data everywhere
        tensors = {k: torch.as_tensor(made[k]) for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    tensors = torch.load(path)
    train = {"x": tensors["x"].float(), "y": tensors["y"].long()}
    test = {"x": tensors["x_test"].float(), "y": tensors["y_test"].long()}

    def loss(model, batch):
        return _summed_cross_entropy(model(batch["x"]), batch["y"])

    @torch.no_grad()
    def accuracy(model):
        model.eval()
        correct = (model(test["x"]).argmax(-1) == test["y"]).float().mean()
        model.train()
        return float(correct)

    most_frequent = int(torch.bincount(train["y"]).argmax())
    return TaskData(
        train,
        SequenceClassifier,
        loss,
        accuracy,
        f"{len(train['x'])} train / {len(test['x'])} test",
        baseline=float((test["y"] == most_frequent).float().mean()),
        baseline_name="most-frequent-class accuracy (the class most frequent in training, always)",
    )


WIKITEXT_VOCAB = 2000
LM_SEQUENCE = 35


def wikitext2_data(size: Size, cache: Path) -> TaskData:
    from legw_hf.pretraining.evaluation import UnigramBaseline

    text = SHARED_DATA / "wikitext-2" / "valid.txt"
    if not text.is_file():
        raise SystemExit(f"wikitext2_lm needs {text} (the shared offline data); run with --tasks without it")
    articles: list[list[str]] = []
    for line in text.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words:
            continue
        if len(words) >= 3 and words[0] == "=" and words[-1] == "=" and words[1] != "=":
            articles.append([])  # a top-level heading " = Title = " starts an article
        if not articles:
            articles.append([])
        articles[-1] += [*words, "<eos>"]
    held_out = [a for i, a in enumerate(articles) if i % 10 == 9]
    kept = [a for i, a in enumerate(articles) if i % 10 != 9]
    counts: dict[str, int] = {}
    for article in kept:
        for word in article:
            counts[word] = counts.get(word, 0) + 1
    vocab = ["<unk>", *sorted((w for w in counts if w != "<unk>"), key=lambda w: (-counts[w], w))][:WIKITEXT_VOCAB]
    index = {w: i for i, w in enumerate(vocab)}

    def sequences(parts: list[list[str]], limit: int) -> torch.Tensor:
        ids = torch.tensor([index.get(w, 0) for part in parts for w in part])
        span = LM_SEQUENCE + 1
        ids = ids[: len(ids) // span * span].view(-1, span)
        return ids[:limit]

    train = {"tokens": sequences(kept, size.examples)}
    validation = {"tokens": sequences(held_out, max(size.examples // 9, 8))}
    vocab_size = len(vocab)

    def loss(model, batch):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])
        return _summed_cross_entropy(logits.reshape(-1, vocab_size), tokens[:, 1:].reshape(-1))

    def perplexity(model):
        return math.exp(min(_mean_loss(model, loss, validation), 50.0))

    # Each next token predicted by its training frequency, on the same predicted tokens.
    counts = torch.bincount(train["tokens"][:, 1:].reshape(-1), minlength=vocab_size).numpy()
    unigram = UnigramBaseline(counts).metrics(validation["tokens"][:, 1:].reshape(-1).numpy())
    return TaskData(
        train,
        lambda: WordLanguageModel(vocab_size),
        loss,
        perplexity,
        f"{len(train['tokens'])} train / {len(validation['tokens'])} validation sequences of {LM_SEQUENCE} tokens "
        f"({len(kept)} / {len(held_out)} articles)",
        baseline=unigram["unigram_perplexity"],
        baseline_name="unigram perplexity (each next token predicted by its training frequency, add-one smoothed)",
    )


BERT_SEQUENCE = 64


def bert_data(size: Size, cache: Path) -> TaskData:
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    from legw_hf.pretraining.data import PreparedText, load_text, train_wordpiece
    from legw_hf.pretraining.evaluation import UnigramBaseline
    from legw_hf.pretraining.masking import MaskingCollator, MaskingRule
    from legw_hf.pretraining.model import bert_config

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    root = cache / "bert"
    text = load_text(
        train_file=None,
        validation_file=None,
        dataset_name=None,
        dataset_config_name=None,
        text_column="text",
        validation_split_percentage=5,
        documents="auto",
        corpus_dir=root / "embedded-corpus",
    )
    tokenizer = train_wordpiece(text.train, 4096, root / f"wordpiece-{text.identity}")
    prepared = {
        split: PreparedText(documents, tokenizer, split=split, max_document_tokens=None, cache_dir=root)
        for split, documents in (("train", text.train), ("validation", text.validation))
    }
    rule = MaskingRule(0.15, 10, True)
    packed = prepared["train"].packed(BERT_SEQUENCE)
    train = {"input_ids": torch.tensor(packed["input_ids"][: size.examples])}
    masked = prepared["validation"].masked(BERT_SEQUENCE, rule, seed=0)
    validation = {key: torch.tensor(masked[key][: max(size.examples // 8, 16)]) for key in ("input_ids", "labels")}
    config = bert_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    collator = MaskingCollator(tokenizer, rule, seed=0)

    def mask(batch, generator):
        import numpy as np

        # masks drawn from the run's generator, so a run's masks depend on its seed, not on the worker's history
        collator.rng = np.random.default_rng(int(torch.randint(2**31, (), generator=generator)))
        return collator([{"input_ids": ids} for ids in batch["input_ids"]])

    def loss(model, batch):
        # The prediction head on the masked positions only (NVIDIA's BERT does the same gather).
        hidden = model.bert(input_ids=batch["input_ids"]).last_hidden_state
        chosen = batch["labels"] != -100
        return _summed_cross_entropy(model.cls(hidden[chosen]), batch["labels"][chosen])

    labels = validation["labels"][validation["labels"] != -100].numpy()
    unigram = UnigramBaseline(prepared["train"].token_counts(len(tokenizer))).metrics(labels)["unigram_loss"]
    return TaskData(
        train,
        lambda: BertForMaskedLM(config),
        loss,
        lambda model: _mean_loss(model, loss, validation),
        f"{len(train['input_ids'])} train / {len(validation['input_ids'])} validation sequences of {BERT_SEQUENCE}",
        baseline=unigram,
        baseline_name="unigram loss (each masked token predicted by its training frequency, add-one smoothed)",
        prepare_batch=mask,
    )


DATA_BUILDERS = {"mnist1d": mnist1d_data, "wikitext2_lm": wikitext2_data, "bert_tiny": bert_data}


@functools.cache
def task_data(name: str, smoke: bool, cache: str) -> TaskData:
    task = TASKS[name]
    return DATA_BUILDERS[task.data or name](task.size(smoke), Path(cache))


# ------------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class Cell:
    task: str
    family: str
    arm: str
    k: int
    seed: int
    smoke: bool
    cache: str
    base_lr: float | None = None  # the sweep's override
    base_warmup_epochs: float | None = None
    #: Measure B_simple from plain gradients (ADASCALE_ESTIMATES micro-batches per update) over this fraction of the
    #: run's first updates; 0: not measured.
    noise_fraction: float = 0.0


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1.0)
    if name == "momentum":
        return torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    if name == "lamb":
        return Lamb(decay_param_groups(model, 0.01, adapt_no_decay=False), lr=1.0, preset="nvidia")
    if name == "adamw":  # BERT's AdamW: decoupled decay 0.01 off biases and LayerNorm, eps 1e-6
        return torch.optim.AdamW(decay_param_groups(model, 0.01), lr=1.0, eps=1e-6)
    raise ValueError(name)


def _batches(n: int, batch: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch):
        yield order[start : start + batch]


def train_cell(cell: Cell) -> dict[str, Any]:
    """One run: the task's model at k·B0 under one arm; the final metric, updates, epochs and the LR it applied."""
    torch.set_num_threads(1)
    task = TASKS[cell.task]
    size = task.size(cell.smoke)
    family = task.families[cell.family]
    base_lr = cell.base_lr if cell.base_lr is not None else family.base_lr
    warmup = cell.base_warmup_epochs if cell.base_warmup_epochs is not None else family.base_warmup_epochs
    data = task_data(cell.task, cell.smoke, cell.cache)
    n = data.size
    batch = cell.k * size.base_batch
    torch.manual_seed(cell.seed)
    model = data.new_model()
    model.train()
    optimizer = make_optimizer(family.optimizer, model)
    config = LegwConfig(
        base_batch_size=size.base_batch,
        base_lr=base_lr,
        base_warmup_epochs=warmup,
        rule="none" if cell.arm == "adascale" else cell.arm,
        decay=task.decay,
    )
    adascale = cell.arm == "adascale" and cell.k > 1
    estimates = ADASCALE_ESTIMATES if adascale else 1
    if adascale:
        base_plan = config.plan(batch_size=size.base_batch, dataset_size=n, epochs=size.epochs)
        noise = GradientNoise(micro_batch=batch // estimates, base_batch=size.base_batch, global_batch=batch)
        mode = family.adascale_mode
        statistics_ = GradientStatistics(
            model.parameters(), noise, preconditioner=optimizer if mode == "sqrt_gain" else None
        ).attach()
        scheduler = AdaScaleScheduler(
            optimizer, base_plan, noise, total_progress=base_plan.total_steps, power=MODES[mode]
        )
        max_epochs = size.epochs * ADASCALE_EPOCH_CAP
        total_steps = None
    else:
        plan = config.plan(batch_size=batch, dataset_size=n, epochs=size.epochs)
        scheduler = LegwScheduler(optimizer, plan)
        max_epochs = size.epochs
        total_steps = plan.total_steps
    noise_updates, split = 0, 1
    if cell.noise_fraction > 0 and not adascale:
        # Plain gradients, no preconditioner: McCandlish et al.'s B_simple, in sequences (micro-batches of one or
        # more sequences, each an independent estimate), a plain mean over the window's updates.
        noise_updates = max(1, round(cell.noise_fraction * total_steps))
        split = min(ADASCALE_ESTIMATES, batch)
        plain_noise = GradientNoise(micro_batch=batch // split, base_batch=batch, global_batch=batch)
        plain_statistics = GradientStatistics(model.parameters(), plain_noise).attach()
    generator = torch.Generator().manual_seed(cell.seed)
    lrs: list[float] = []
    gains: list[float] = []
    updates = samples = 0
    diverged = False
    last_loss = math.nan
    started = time.perf_counter()

    def finished() -> bool:
        return scheduler.finished if adascale else updates == total_steps

    while not diverged and not finished() and samples < max_epochs * n - 1e-9:
        for indices in _batches(n, batch, generator):
            examples = data.prepare_batch({k: v[indices] for k, v in data.train.items()}, generator)
            measuring = updates < noise_updates
            parts = [
                {k: v[chunk] for k, v in examples.items()}
                for chunk in torch.arange(len(indices)).chunk(split if measuring else estimates)
            ]
            losses = [data.loss(model, part) for part in parts]
            total = sum(float(count) for _, count in losses)
            step_loss = 0.0
            for summed, count in losses:
                (summed / total).backward()
                step_loss += float(summed.detach()) / total
                if adascale:
                    statistics_.micro_step_done(float(count) / total)
                if measuring:
                    plain_statistics.micro_step_done(float(count) / total)
            if measuring:
                plain_statistics.update_done()
                if updates + 1 == noise_updates:
                    plain_statistics.detach()
            if adascale:
                statistics_.update_done()
                scheduler.begin_update()
                gains.append(scheduler.gain)
            lrs.append(optimizer.param_groups[0]["lr"])
            if task.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), task.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            updates += 1
            samples += len(indices)
            last_loss = step_loss
            diverged = not math.isfinite(step_loss)
            if diverged or finished():
                break
    metric = math.nan if diverged else data.evaluate(model)
    if not math.isfinite(metric):
        diverged = True
    stride = max(1, len(lrs) // LR_CURVE_POINTS)
    record = {
        **{k: v for k, v in asdict(cell).items() if k not in ("smoke", "cache")},
        "batch": batch,
        "base_batch": size.base_batch,
        "base_lr": base_lr,
        "base_warmup_epochs": warmup,
        "metric": None if diverged else metric,
        "diverged": diverged,
        "final_train_loss": last_loss if math.isfinite(last_loss) else None,
        "updates": updates,
        "epochs": samples / n,
        "dataset_size": n,
        "seconds": time.perf_counter() - started,
        "lr_curve": [[(i + 1) / math.ceil(n / batch), lrs[i]] for i in range(0, len(lrs), stride)],
        "peak_lr": max(lrs) if lrs else None,
    }
    if noise_updates:
        record.update(plain_b_simple=plain_noise.b_simple, plain_b_simple_updates=noise_updates)
    if adascale:
        record.update(
            mean_gain=statistics.fmean(gains),
            # the last update's gain, the moments it came from and the LR it set, for checks written out elsewhere
            last_gain=gains[-1],
            last_trace=noise.trace,
            last_signal=noise.signal,
            last_lr=lrs[-1],
            b_simple=noise.b_simple,
            progress=scheduler.progress,
            total_progress=scheduler.total_progress,
            reached_end=scheduler.finished,
        )
    return record


def _init_worker() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cells(
    cells: list[Any],
    workers: int,
    log: Callable[[str], None],
    *,
    train: Callable[[Any], dict[str, Any]] = train_cell,
    describe: Callable[[dict[str, Any]], str] | None = None,
) -> list[dict[str, Any]]:
    """The runs of ``cells`` (in their order) by ``train``, on ``workers`` spawned processes, logging each as it
    comes in (``describe``)."""
    describe = describe or _describe_run
    # Longest first (small batches are the slowest per sample) so the workers finish together.
    ordered = sorted(cells, key=lambda cell: (cell.k, cell.task != "bert_tiny"))
    results: dict[Cell, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        run_all = map
        if workers > 1:
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
            run_all = stack.enter_context(pool).map
        for cell, result in zip(ordered, run_all(train, ordered), strict=True):
            results[cell] = result
            log(describe(result))
    return [results[cell] for cell in cells]


def _describe_run(r: dict[str, Any]) -> str:
    metric = "diverged" if r["diverged"] else f"{r['metric']:.4g}"
    return (
        f"{r['task']:>12} {r['family']:>8} {r['arm']:>8} k={r['k']:<3} seed {r['seed']} lr {r['base_lr']:.3g} "
        f"warmup {r['base_warmup_epochs']:.3g} ep: {metric:>9}, "
        f"{r['updates']} updates, {r['epochs']:.2f} epochs, {r['seconds']:.0f} s"
    )


# -------------------------------------------------------------------------------------------------------- report
def experiment_cells(tasks: list[str], seeds: int, smoke: bool, cache: str) -> list[Cell]:
    cells = []
    for name in tasks:
        task = TASKS[name]
        for family in task.families:
            for seed in range(seeds):
                for k in task.size(smoke).ks:
                    for arm in ARMS if k > 1 else ("none",):  # at k = 1 every arm is the base run
                        cells.append(Cell(name, family, arm, k, seed, smoke, cache))
    return cells


def sweep_cells(tasks: list[str], smoke: bool, cache: str) -> list[Cell]:
    cells = []
    for name in tasks:
        task = TASKS[name]
        for family_name, family in task.families.items():
            warmups = (family.base_warmup_epochs, *family.sweep_warmups)
            for lr in family.sweep_lrs:
                for warmup in warmups:
                    cells.append(Cell(name, family_name, "none", 1, 0, smoke, cache, lr, warmup))
    return cells


def _spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def arm_rows(run: dict[str, Any]) -> list[str]:
    """The table rows of an experiment run: its arm; the base run (k = 1) stands in every arm's first column."""
    return [run["arm"]] if run["k"] > 1 else list(ARMS)


def setting_rows(run: dict[str, Any]) -> list[str]:
    """The table row of a sweep run: its base setting."""
    return [f"lr {run['base_lr']:g}, warmup {run['base_warmup_epochs']:g} ep"]


#: A run whose metric is this much worse than its base run's (same task, family and seed) exploded: perplexity 10×,
#: or the same in nats for a loss.
EXPLOSION_FACTOR = 10.0


def mark_exploded(runs: list[dict[str, Any]], tasks: dict[str, Any]) -> None:
    """Mark as diverged (``exploded``) every run whose metric is beyond :data:`EXPLOSION_FACTOR` × its base run's:
    such a run is shown as diverged, never averaged into a mean."""
    base = {(r["task"], r["family"], r["seed"]): r["metric"] for r in runs if r["k"] == 1 and not r["diverged"]}
    for run in runs:
        reference = base.get((run["task"], run["family"], run["seed"]))
        metric, task = run["metric"], tasks[run["task"]]
        if run["diverged"] or reference is None or task["higher_is_better"]:
            continue
        limit = (
            reference * EXPLOSION_FACTOR if "perplexity" in task["metric"] else reference + math.log(EXPLOSION_FACTOR)
        )
        if metric > limit:
            run.update(diverged=True, exploded=True, metric=None, exploded_metric=metric)


def summarise(runs: list[dict[str, Any]], rows_of: Callable[[dict[str, Any]], list[str]]) -> dict[str, Any]:
    """Per task and family, per row (``rows_of``) and batch: the mean and spread of the metric over seeds, with the
    diverged seeds counted."""
    tables: dict[str, Any] = {}
    for run in runs:
        key = f"{run['task']}/{run['family']}"
        for row in rows_of(run):
            tables.setdefault(key, {}).setdefault(row, {}).setdefault(str(run["batch"]), []).append(run)
    summary: dict[str, Any] = {}
    for key, arms in tables.items():
        summary[key] = {}
        for arm, by_batch in arms.items():
            summary[key][arm] = {}
            for batch, group in sorted(by_batch.items(), key=lambda kv: int(kv[0])):
                finite = [r["metric"] for r in group if not r["diverged"]]
                cell = {
                    "seeds": len(group),
                    "diverged": sum(r["diverged"] for r in group),
                    "updates": round(statistics.fmean(r["updates"] for r in group)),
                    "epochs": statistics.fmean(r["epochs"] for r in group),
                    "values": [r["metric"] for r in group],
                }
                if finite:
                    cell["mean"], cell["spread"] = _spread(finite)
                if arm == "adascale" and group[0]["k"] > 1:
                    cell["b_simple"] = statistics.fmean(r["b_simple"] for r in group)
                    cell["mean_gain"] = statistics.fmean(r["mean_gain"] for r in group)
                summary[key][arm][batch] = cell
    return summary


def _format_cell(cell: dict[str, Any], arm: str) -> str:
    if "mean" not in cell:
        text = "diverged"
    else:
        text = f"{cell['mean']:.4g}" + (f" ± {cell['spread']:.2g}" if cell["seeds"] > 1 else "")
        if cell["diverged"]:
            text += f" ({cell['diverged']}/{cell['seeds']} diverged)"
    text += f"<br>{cell['updates']} upd"
    if arm == "adascale" and "b_simple" in cell:
        text += f", {cell['epochs']:.1f} ep, r̄ {cell['mean_gain']:.2g}"
    return text


def environment() -> dict[str, Any]:
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, one thread per run",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "legw_hf": __import__("legw_hf").__version__,
    }


def _describe_decay(decay: dict[str, Any]) -> str:
    options = ", ".join(f"{k} {v:g}" for k, v in decay.items() if k != "name")
    return f"{decay['name']} ({options})" if options else decay["name"]


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, Any], sweep: bool) -> None:
    lines = [f"# {'Base-batch LR sweep' if sweep else 'Large-batch reproduction'}", ""]
    cells = "one seed" if sweep else "mean ± standard deviation over seeds"
    lines += [f"- {k}: {v}" for k, v in meta["environment"].items()]
    lines += [f"- command: `{meta['command']}`", f"- wall time: {meta['seconds'] / 60:.1f} min", ""]
    for name, task in meta["tasks"].items():
        lines += [f"## {name}: {task['title']}", "", f"Data: {task['data']}.", ""]
        if "baseline" in task:
            lines += [
                f"Trivial baseline on the same data: {task['baseline']['name']}: {task['baseline']['value']:.4g}.",
                "",
            ]
        for family_name, family in task["families"].items():
            key = f"{name}/{family_name}"
            lines += [
                f"### {family_name}: {task['metric']} ({'higher' if task['higher_is_better'] else 'lower'} is "
                f"better), base batch {task['base_batch']}, {task['epochs']:g} epochs",
                "",
                f"Base settings: peak LR {family['base_lr']:g}, warmup {family['base_warmup_epochs']:g} epochs, "
                f"{_describe_decay(task['decay'])} decay. Cells: {cells}, updates taken.",
                "",
            ]
            arms = summary.get(key, {})
            batches = sorted({int(b) for arm in arms.values() for b in arm})
            lines.append(f"| {'setting' if sweep else 'arm'} | " + " | ".join(f"batch {b}" for b in batches) + " |")
            lines.append("|---|" + "---:|" * len(batches))
            for arm, by_batch in arms.items():
                row = [_format_cell(by_batch[str(b)], arm) if str(b) in by_batch else "" for b in batches]
                lines.append(f"| {arm} | " + " | ".join(row) + " |")
            noise = [(b, c["b_simple"]) for b, c in arms.get("adascale", {}).items() if "b_simple" in c]
            if noise:
                lines += [
                    "",
                    "B_simple (AdaScale runs, end of training): "
                    + ", ".join(f"{v:.0f} at batch {b}" for b, v in noise)
                    + ".",
                ]
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(out: Path, stem: str, meta: dict[str, Any], summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """Per task: the metric against the batch for every arm, and the LR each arm applied at the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panels(families: list[str], draw: Callable[[Any, str], None], path: Path) -> str:
        figure, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
        for axis, family in zip(axes[0], families, strict=True):
            draw(axis, family)
            axis.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path.name

    written = []
    for name, task in meta["tasks"].items():

        def metric_by_batch(axis, family, name=name, task=task):
            for arm, by_batch in summary.get(f"{name}/{family}", {}).items():
                points = sorted((int(b), c) for b, c in by_batch.items() if "mean" in c)
                if points:
                    batches, cells = zip(*points, strict=True)
                    means, spreads = [c["mean"] for c in cells], [c["spread"] for c in cells]
                    axis.errorbar(batches, means, yerr=spreads, marker="o", capsize=3, label=arm)
            if "baseline" in task:
                axis.axhline(task["baseline"]["value"], color="black", linestyle="--", label="trivial baseline")
            axis.set_xscale("log", base=2)
            batches = sorted({int(b) for by_batch in summary.get(f"{name}/{family}", {}).values() for b in by_batch})
            axis.set_xticks(batches, labels=[str(b) for b in batches])
            axis.set(xlabel="global batch", ylabel=task["metric"], title=f"{name}: {family}")
            if "perplexity" in task["metric"]:
                axis.set_yscale("log")  # a diverging arm's perplexity is orders of magnitude above the rest

        def lr_curves(axis, family, name=name):
            chosen = [r for r in runs if r["task"] == name and r["family"] == family and r["seed"] == 0]
            k = max((r["k"] for r in chosen), default=1)
            for r in chosen:
                if r["k"] == k and r["lr_curve"]:
                    epochs, lrs = zip(*r["lr_curve"], strict=True)
                    axis.plot(epochs, lrs, label=r["arm"])
            axis.set(yscale="log", xlabel="epoch", ylabel="LR applied", title=f"{name}: {family}, k={k} (seed 0)")

        families = list(task["families"])
        written.append(panels(families, metric_by_batch, out / f"{stem}_{name}.png"))
        written.append(panels(families, lr_curves, out / f"{stem}_{name}_lr.png"))
    return written


def describe_task(name: str, smoke: bool, cache: str) -> dict[str, Any]:
    """A task's settings as the result file records them."""
    task, size, data = TASKS[name], TASKS[name].size(smoke), task_data(name, smoke, cache)
    return {
        "title": task.title,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "data": data.describe,
        "baseline": {"value": data.baseline, "name": data.baseline_name},
        "base_batch": size.base_batch,
        "epochs": size.epochs,
        "ks": list(size.ks),
        "decay": task.decay.to_dict(),
        "max_grad_norm": task.max_grad_norm,
        "families": {family: asdict(settings) for family, settings in task.families.items()},
    }


def write_report(out: Path, stem: str, result: dict[str, Any], sweep: bool) -> None:
    """The Markdown tables and (for the experiments) the plots of a result."""
    write_markdown(out / f"{stem}.md", result, result["summary"], sweep)
    if not sweep:
        plot(out, stem, result, result["summary"], result["runs"])


def runner_parser(description: str, seeds: int) -> argparse.ArgumentParser:
    """The flags every runner of these benchmarks takes (this one and bert_scaling.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds per cell (default {seeds})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: checks every path in seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the tables and plots go")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "legw_hf_bench"
    )
    parser.add_argument(
        "--report", type=Path, metavar="RESULT.json", help="only rewrite the Markdown and plots of a saved result"
    )
    return parser


def check_runner_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad counts, and a --report that is not a file, before any work."""
    if args.report is not None and not args.report.is_file():
        parser.error(f"--report must be a result file written by this script, got {args.report}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")


def prepare_tasks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Refuse a task whose data is missing, make the output folder and build every task's data once (so the workers
    find each cache file ready); the cache folder."""
    if "wikitext2_lm" in args.tasks and not (SHARED_DATA / "wikitext-2" / "valid.txt").is_file():
        parser.error(f"--tasks wikitext2_lm needs {SHARED_DATA / 'wikitext-2' / 'valid.txt'}")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = str(args.cache)
    for name in args.tasks:
        task_data(name, args.smoke, cache)
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = runner_parser(__doc__.split("\n\n")[0], seeds=2)
    parser.add_argument("--tasks", nargs="+", choices=REPRODUCTION_TASKS, default=list(REPRODUCTION_TASKS))
    parser.add_argument("--sweep", action="store_true", help="the base-batch LR sweep instead of the experiments")
    args = parser.parse_args(argv)
    check_runner_arguments(parser, args)
    if args.report is not None:
        result = json.loads(args.report.read_text(encoding="utf-8"))
        write_report(args.report.parent, args.report.stem, result, sweep="--sweep" in result["command"])
        return 0
    seeds = 1 if args.smoke and args.seeds == 2 else args.seeds
    cache = prepare_tasks(parser, args)
    cells = (
        sweep_cells(args.tasks, args.smoke, cache)
        if args.sweep
        else experiment_cells(args.tasks, seeds, args.smoke, cache)
    )
    stem = "large_batch_sweep" if args.sweep else "large_batch"
    print(f"{len(cells)} runs on {args.workers} workers", flush=True)
    started = time.perf_counter()
    runs = run_cells(cells, args.workers, lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    meta = {
        "environment": environment(),
        "command": "python benchmarks/large_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": seconds,
        "seeds": seeds,
        "arms": {arm: RULES.get(arm, "AdaScale") for arm in ARMS},
        "adascale": {"estimates_per_update": ADASCALE_ESTIMATES, "epoch_cap": ADASCALE_EPOCH_CAP},
        "tasks": {name: describe_task(name, args.smoke, cache) for name in args.tasks},
    }
    if not args.sweep:  # a sweep has no base run to compare with: only non-finite runs are diverged there
        mark_exploded(runs, meta["tasks"])
    result = {**meta, "summary": summarise(runs, setting_rows if args.sweep else arm_rows), "runs": runs}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_report(args.out, stem, result, args.sweep)
    print(f"done in {seconds / 60:.1f} min: {args.out / stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
