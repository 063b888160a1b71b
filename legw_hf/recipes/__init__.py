"""Shipped recipes: BERT-large pretraining phases (LEGW base settings as data), DeepSpeed configs, launch files.

The files live beside this module (``deepspeed/*.json``, ``launch/*``) and are installed with the package;
``legw-hf recipes`` lists them and ``legw-hf recipes --copy DIR`` copies them for editing.

Each :class:`PretrainingPhase` holds what was tuned, where the numbers come from, and the global batches the
recipe is meant for. Its base settings are NVIDIA's BERT-large LAMB recipe (DeepLearningExamples, apex
FusedLAMB): the peak LR at NVIDIA's own global batch, the warmup as the number of optimizer steps NVIDIA's
``warmup_proportion × max_steps`` gives, and NVIDIA's polynomial decay with power 0.5 (of the whole phase's
progress, :class:`~legw_hf.schedules.PolynomialOfRun`). LEGW carries them to other global
batches: √k peak LR and the same number of warmup steps (k× the warmup in epochs), the same epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SettingError
from ..plan import LegwConfig, LegwPlan
from ..schedules import PolynomialOfRun


@dataclass(frozen=True, kw_only=True)
class PretrainingPhase:
    """One phase of pretraining: what it trains with. The recipe's data shape, its tuned base and the global batches
    it targets, and the run's own batch: ``global_batch_size`` and ``per_device_batch_size`` (default: the first of
    ``global_batches`` and the recipe's ``micro_batch``). ``dataclasses.replace`` gives a phase with other settings,
    as ``legw-hf pretrain``'s ``--phase1_*`` / ``--phase2_*`` flags do.

    The phase's length is ``base_steps`` (optimizer steps at the base batch) or ``epochs`` (of the data it is
    given), exactly one. With ``base_steps``, ``dataset_size`` is the number of sequences the phase sees at the
    base batch (``base_batch_size × base_steps``): NVIDIA samples pre-generated shards rather than counting epochs,
    so the phase is one such "epoch". Pass your own dataset size to count real epochs; the plan's LR per step does
    not change.
    """

    name: str
    seq_len: int
    max_predictions_per_seq: int
    base_batch_size: int
    base_lr: float
    base_warmup_steps: float
    power: float
    global_batches: tuple[int, ...]
    #: Per-device micro-batch on the recipe's hardware: 80 GB GPUs in fp16/bf16 for BERT-large (NVIDIA's DGX A100
    #: setting), a CPU for tiny.
    micro_batch: int
    source: str
    base_steps: int | None = None
    epochs: float | None = None
    #: Sequences per update, all processes, in this run (default: ``global_batches[0]``).
    global_batch_size: int | None = None
    #: Micro-batch per process in this run (default: ``micro_batch``).
    per_device_batch_size: int | None = None

    def __post_init__(self) -> None:
        if (self.base_steps is None) == (self.epochs is None):
            raise SettingError(
                "base_steps", "or epochs must be given, exactly one of them", (self.base_steps, self.epochs)
            )
        if self.global_batch_size is None:
            object.__setattr__(self, "global_batch_size", self.global_batches[0])
        if self.per_device_batch_size is None:
            object.__setattr__(self, "per_device_batch_size", self.micro_batch)

    @property
    def dataset_size(self) -> int | None:
        return None if self.base_steps is None else self.base_batch_size * self.base_steps

    def config(self) -> LegwConfig:
        return LegwConfig(
            base_batch_size=self.base_batch_size,
            base_lr=self.base_lr,
            base_warmup_steps=self.base_warmup_steps,
            rule="legw",
            decay=PolynomialOfRun(power=self.power),
        )

    def length(self, dataset_size: int | None = None) -> dict[str, float | int]:
        """The plan settings of the phase's length: its epochs of ``dataset_size`` sequences."""
        size = self.dataset_size if dataset_size is None else dataset_size
        if size is None:
            raise SettingError("dataset_size", f"is required by recipe {self.name!r}, whose length is in epochs", None)
        return {"dataset_size": size, "epochs": self.epochs if self.base_steps is None else self.dataset_size / size}

    def plan(
        self, batch_size: int | None = None, dataset_size: int | None = None, *, steps_per_epoch: int | None = None
    ) -> LegwPlan:
        """The LEGW plan of this phase at global batch ``batch_size`` (default: ``global_batch_size``), same epochs
        as the base run; ``steps_per_epoch`` is the real dataloader's count where it differs from the computed one."""
        batch = self.global_batch_size if batch_size is None else batch_size
        return self.config().plan(batch_size=batch, steps_per_epoch=steps_per_epoch, **self.length(dataset_size))

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-batches per update so that micro-batch × accumulation × processes is the global batch."""
        per_update = self.per_device_batch_size * world_size
        if self.global_batch_size % per_update:
            raise SettingError(
                "global_batch_size",
                f"must be a multiple of per-device batch × processes = {self.per_device_batch_size} × {world_size} = "
                f"{per_update}, so gradient accumulation reaches it exactly",
                self.global_batch_size,
            )
        return self.global_batch_size // per_update


_NVIDIA = (
    "NVIDIA DeepLearningExamples, PyTorch BERT-large pretraining with LAMB (scripts/run_pretraining.sh, "
    "DGX A100): phase 1 global batch 65536, LR 6e-3, warmup_proportion 0.2843 of 7038 steps; phase 2 global "
    "batch 32768, LR 4e-3, warmup_proportion 0.128 of 1563 steps; polynomial decay, power 0.5. LEGW to other "
    "batches: You et al., 'Large Batch Optimization for Deep Learning: Training BERT in 76 minutes' (ICLR 2020), "
    "which scales BERT with sqrt LR scaling and LEGW warmup"
)

#: Phases by name. Phase 2 starts from phase 1's weights and moments with a new step count and warmup.
PHASES: dict[str, PretrainingPhase] = {
    phase.name: phase
    for phase in (
        PretrainingPhase(
            name="bert-large-phase1",
            seq_len=128,
            max_predictions_per_seq=20,
            base_batch_size=65536,
            base_lr=6e-3,
            base_warmup_steps=0.2843 * 7038,
            base_steps=7038,
            power=0.5,
            global_batches=(65536, 32768),
            micro_batch=64,
            source=_NVIDIA,
        ),
        PretrainingPhase(
            name="bert-large-phase2",
            seq_len=512,
            max_predictions_per_seq=80,
            base_batch_size=32768,
            base_lr=4e-3,
            base_warmup_steps=0.128 * 1563,
            base_steps=1563,
            power=0.5,
            global_batches=(32768,),
            micro_batch=16,
            source=_NVIDIA,
        ),
    )
}


_TINY = (
    "legw_hf's CPU recipe for BERT-tiny (2 layers, hidden 128) on the embedded corpus: NVIDIA's phase structure "
    "(seq 128, then a longer sequence with a re-warmup; poly 0.5 decay of the phase; LAMB) scaled down to minutes on "
    "2 CPU cores; base batch 32, run at 128 (k = 4) with LEGW. Phase 1's base LR from a sweep at the base batch "
    "(4 epochs, batch 32, warmup 40 steps; validation MLM loss against a unigram level of 6.18): 0.0025 6.13, 0.005 "
    "5.99, 0.01 5.80, 0.02 5.73, 0.04 6.18 (stalled). LEGW from 0.02 (peak 0.04 at 128) stalled at the unigram "
    "level too (6.23 after 140 updates), so the recipe takes 0.01, one grid step below the sweep's best, whose LEGW "
    "peak 0.02 learns. Phase 2's base LR is 0.6x phase 1's (NVIDIA: 4e-3 / 6e-3), its warmup 13% of the phase "
    "(NVIDIA: 12.8%)"
)

PHASES.update(
    {
        phase.name: phase
        for phase in (
            PretrainingPhase(
                name="tiny-phase1",
                seq_len=128,
                max_predictions_per_seq=20,
                base_batch_size=32,
                base_lr=0.01,
                base_warmup_steps=40,
                epochs=14,
                power=0.5,
                global_batches=(128,),
                micro_batch=64,
                source=_TINY,
            ),
            PretrainingPhase(
                name="tiny-phase2",
                seq_len=256,
                max_predictions_per_seq=40,
                base_batch_size=32,
                base_lr=0.006,
                base_warmup_steps=4,
                epochs=3,
                power=0.5,
                global_batches=(128,),
                micro_batch=32,
                source=_TINY,
            ),
        )
    }
)

#: Two-phase recipes by name, for ``legw-hf pretrain --recipe``.
RECIPES: dict[str, tuple[str, str]] = {
    "tiny": ("tiny-phase1", "tiny-phase2"),
    "bert-large": ("bert-large-phase1", "bert-large-phase2"),
}


def phase(name: str) -> PretrainingPhase:
    if name not in PHASES:
        raise SettingError("recipe", f"must be one of {', '.join(map(repr, PHASES))}", name)
    return PHASES[name]


def recipe_files() -> list[Path]:
    """Every shipped DeepSpeed config and launch file, sorted."""
    root = Path(str(resources.files(__name__)))
    return sorted(p for folder in ("deepspeed", "launch") for p in (root / folder).iterdir() if p.is_file())


def recipe_file(name: str) -> Path:
    """A shipped file by its name (``zero1-fp16.json``, ``hostfile``, ...)."""
    files = {p.name: p for p in recipe_files()}
    if name not in files:
        raise SettingError("name", f"must be a shipped recipe file ({', '.join(sorted(files))})", name)
    return files[name]
