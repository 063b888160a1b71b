"""Masked-LM metrics for ``evaluate``: masked-token accuracy, mean loss and perplexity over the masked tokens.

Load it from this file, offline: ``evaluate.load(path_to_this_directory)``. Inputs are flat, one entry per
masked token: the predicted token id, the true token id, and the model's negative log-likelihood of the true
token. The loss is the mean over tokens (not over batches), so it does not depend on how evaluation was batched.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Masked-token accuracy, mean negative log-likelihood and perplexity of a masked language model."
_INPUTS = """
Args:
    predictions: predicted token id of each masked token.
    references: true token id of each masked token.
    negative_log_likelihoods: -log p(true token) of each masked token, natural log.
Returns:
    accuracy: fraction of masked tokens predicted exactly.
    loss: mean negative log-likelihood per masked token.
    perplexity: exp(loss).
    masked_tokens: how many tokens were scored.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MaskedLm(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "negative_log_likelihoods": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, predictions, references, negative_log_likelihoods):
        count = len(references)
        if count == 0:
            raise ValueError("masked_lm needs at least one masked token to score")
        correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        loss = math.fsum(negative_log_likelihoods) / count
        return {"accuracy": correct / count, "loss": loss, "perplexity": math.exp(loss), "masked_tokens": count}
