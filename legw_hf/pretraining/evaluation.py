"""Validation metrics through ``evaluate`` (the metric module loaded from the file shipped in the package), beside
the trivial predictor they must beat.

Every figure comes with the unigram baseline on the *same* masked positions: each masked token predicted by its
frequency in the training documents. Its loss is what a model that learned token frequencies and nothing else
reaches, and its accuracy (always the most frequent training token) is the most-frequent-class accuracy. A loss
that falls proves nothing until it falls below that level.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class UnigramBaseline:
    """Predict every masked token by its training-set frequency.

    ``p(t) = (count(t) + 1) / (N + V)``: the count of token ``t`` in the training documents, add-one smoothed over
    the vocabulary of ``V`` ids (so a token never seen in training costs a finite loss); ``N`` tokens in all. Its
    accuracy is that of always predicting the most frequent training token.
    """

    #: Per token id, its count in the training documents.
    counts: np.ndarray

    @property
    def most_frequent(self) -> int:
        return int(self.counts.argmax())

    def negative_log_likelihoods(self, labels: np.ndarray) -> np.ndarray:
        log_total = np.log(self.counts.sum() + len(self.counts))
        return log_total - np.log(self.counts[labels] + 1.0)

    def metrics(self, labels: np.ndarray) -> dict[str, float]:
        """``unigram_loss``, ``unigram_perplexity`` and ``most_frequent_accuracy`` over the masked ``labels``."""
        labels = np.asarray(labels, dtype=np.int64)
        result = masked_lm_metric().compute(
            predictions=np.full_like(labels, self.most_frequent),
            references=labels,
            negative_log_likelihoods=self.negative_log_likelihoods(labels),
        )
        return {
            "unigram_loss": result["loss"],
            "unigram_perplexity": result["perplexity"],
            "most_frequent_accuracy": result["accuracy"],
        }


def token_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Trainer's ``preprocess_logits_for_metrics``: per position, the predicted id and -log p(label), stacked
    ([batch, length, 2]), so evaluation keeps two numbers per token instead of the vocabulary's logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = labels.clamp_min(0).unsqueeze(-1)
    nll = -log_probs.gather(-1, targets).squeeze(-1)
    return torch.stack((logits.argmax(-1).to(nll.dtype), nll), dim=-1)


class MaskedLmMetrics:
    """Trainer's ``compute_metrics``: the ``masked_lm`` metric over every masked validation token (``mlm_loss``,
    ``accuracy``, ``perplexity``, ``masked_tokens``) and, given a :class:`UnigramBaseline`, the baseline on the same
    tokens and the model's margin below it (``below_unigram``, nats; negative when the model is worse)."""

    def __init__(self, baseline: UnigramBaseline | None = None) -> None:
        self.baseline = baseline

    def __call__(self, eval_prediction: Any) -> dict[str, float]:
        scores, labels = eval_prediction.predictions, eval_prediction.label_ids
        scored = labels != IGNORED_LABEL
        references = labels[scored].astype(np.int64)
        result = masked_lm_metric().compute(
            predictions=scores[..., 0][scored].astype(np.int64),
            references=references,
            negative_log_likelihoods=scores[..., 1][scored].astype(np.float64),
        )
        metrics = {
            "mlm_loss": result["loss"],
            "accuracy": result["accuracy"],
            "perplexity": result["perplexity"],
            "masked_tokens": result["masked_tokens"],
        }
        if self.baseline is not None:
            metrics |= self.baseline.metrics(references)
            metrics["below_unigram"] = metrics["unigram_loss"] - metrics["mlm_loss"]
        return metrics


#: Without a baseline, for scripts of one's own.
masked_lm_metrics = MaskedLmMetrics()
