"""LEGW for ``transformers.Trainer``: argument fields, a Trainer subclass and a validating callback.

The only change a ``run_mlm.py``-style script needs::

    from legw_hf import LegwTrainer as Trainer, LegwTrainingArguments as TrainingArguments

``--learning_rate`` is then the peak LR tuned at ``--legw_base_batch_size``; the plan is computed from
Trainer's own arithmetic (global batch = per-device × gradient accumulation × data-parallel processes, steps
per epoch from Trainer's dataloader) when training starts, and :class:`LegwCallback` checks it against the
run and logs it. The package converts between Trainer's vocabulary and :mod:`legw_hf.plan`, one job per module,
as transformers splits its own:

- :mod:`.flags`: which ``--legw_*`` flag carries which setting, and errors renamed to the flag a user typed;
- :mod:`.arguments`: :class:`LegwArguments` (the fields) and the checks that run when arguments are built;
- :mod:`.optimizer`: the optimizer ``--legw_optimizer`` and its flags select;
- :mod:`.trainer`: :class:`LegwTrainer`;
- :mod:`.ramp`: the batch ramp (``--legw_batch_ramp``): its checks, its sampler and its dataloader;
- :mod:`.resume`: what a checkpoint says about the plan it was saved under;
- :mod:`.callback`: :class:`LegwCallback`.
"""

from .arguments import LegwArguments, LegwTrainingArguments
from .callback import NOISE_STATE_FILE, LegwCallback
from .flags import changed_fields
from .optimizer import optimizer_cls_and_kwargs
from .trainer import LegwTrainer, follow_trainer_log_level

__all__ = [
    "NOISE_STATE_FILE",
    "LegwArguments",
    "LegwCallback",
    "LegwTrainer",
    "LegwTrainingArguments",
    "changed_fields",
    "follow_trainer_log_level",
    "optimizer_cls_and_kwargs",
]
