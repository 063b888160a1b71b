"""Validation metrics through ``evaluate``, with the metric module loaded from the file shipped in the package."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .masking import IGNORED_LABEL

METRIC_DIR = Path(str(resources.files(__package__))) / "metrics" / "masked_lm"


@cache
def masked_lm_metric() -> Any:
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def token_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Trainer's ``preprocess_logits_for_metrics``: per position, the predicted id and -log p(label), stacked
    ([batch, length, 2]), so evaluation keeps two numbers per token instead of the vocabulary's logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = labels.clamp_min(0).unsqueeze(-1)
    nll = -log_probs.gather(-1, targets).squeeze(-1)
    return torch.stack((logits.argmax(-1).to(nll.dtype), nll), dim=-1)


def masked_lm_metrics(eval_prediction: Any) -> dict[str, float]:
    """Trainer's ``compute_metrics``: the ``masked_lm`` metric over every masked validation token."""
    scores, labels = eval_prediction.predictions, eval_prediction.label_ids
    scored = labels != IGNORED_LABEL
    result = masked_lm_metric().compute(
        predictions=scores[..., 0][scored].astype(np.int64),
        references=labels[scored].astype(np.int64),
        negative_log_likelihoods=scores[..., 1][scored].astype(np.float64),
    )
    return {
        "mlm_loss": result["loss"],
        "accuracy": result["accuracy"],
        "perplexity": result["perplexity"],
        "masked_tokens": result["masked_tokens"],
    }
