"""BERT's masked-LM masking (Devlin et al. 2019; google-research/bert ``create_pretraining_data.py``).

Per sequence: the candidates are every token but ``[CLS]``, ``[SEP]`` and ``[PAD]``; with whole-word masking a
WordPiece continuation (``##…``) joins the word before it. ``round(len · probability)`` tokens are predicted (at
least 1, at most ``max_predictions``), chosen word by word in a random order, skipping a word that would overshoot.
Each chosen token becomes ``[MASK]`` 80% of the time, a random non-special token 10%, and stays itself 10%.

Training batches are masked afresh every time they are drawn (dynamic masking, as RoBERTa); the validation set is
masked once with a fixed seed, per sequence index, so every evaluation sees the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SettingError

IGNORED_LABEL = -100


@dataclass(frozen=True)
class MaskingRule:
    probability: float = 0.15
    max_predictions: int = 20
    whole_word: bool = True
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.probability < 1:
            raise SettingError("mlm_probability", "must be in (0, 1)", self.probability)
        if self.max_predictions < 1:
            raise SettingError("max_predictions", "must be an integer >= 1", self.max_predictions)

    def continuation_table(self, tokenizer: Any) -> np.ndarray:
        """Per token id: 1 for a WordPiece continuation (joins the word before it), 2 for a special token."""
        table = np.zeros(len(tokenizer), dtype=np.int8)
        for token, index in tokenizer.get_vocab().items():
            if token.startswith("##"):
                table[index] = 1
        table[tokenizer.all_special_ids] = 2
        return table

    def mask(
        self, ids: np.ndarray, table: np.ndarray, mask_id: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, labels) of one sequence."""
        kind = table[ids]
        candidate = kind != 2
        previous_candidate = np.concatenate(([False], candidate[:-1]))
        joins = (kind == 1) & previous_candidate if self.whole_word else np.zeros_like(candidate)
        starts = candidate & ~joins
        word = np.cumsum(starts) - 1
        words = int(starts.sum())
        labels = np.full_like(ids, IGNORED_LABEL)
        if words == 0:
            return ids.copy(), labels
        lengths = np.bincount(word[candidate], minlength=words)
        budget = min(self.max_predictions, max(1, round(len(ids) * self.probability)))
        chosen, count = [], 0
        for w in rng.permutation(words):
            if count >= budget:
                break
            if count + lengths[w] > budget:
                continue
            chosen.append(w)
            count += lengths[w]
        picked = candidate & np.isin(word, chosen)
        positions = np.flatnonzero(picked)
        labels[positions] = ids[positions]
        masked = ids.copy()
        draw = rng.random(len(positions))
        masked[positions[draw < self.mask_fraction]] = mask_id
        randomised = positions[(draw >= self.mask_fraction) & (draw < self.mask_fraction + self.random_fraction)]
        if len(randomised):
            ordinary = np.flatnonzero(table != 2)
            masked[randomised] = ordinary[rng.integers(0, len(ordinary), len(randomised))]
        return masked, labels


def mask_sequences(
    sequences: list[list[int]], indices: list[int], rule: MaskingRule, table: np.ndarray, seed: int, mask_id: int
) -> dict[str, list]:
    """Masks for stored sequences: sequence ``i`` drawn from a generator seeded by ``(seed, i)``."""
    masked, labels = [], []
    for ids, index in zip(sequences, indices, strict=True):
        ids_masked, ids_labels = rule.mask(
            np.asarray(ids, dtype=np.int64), table, mask_id, np.random.default_rng([seed, index])
        )
        masked.append(ids_masked.tolist())
        labels.append(ids_labels.tolist())
    return {"input_ids": masked, "labels": labels}


class MaskingCollator:
    """Trainer's ``data_collator``: stacks packed training sequences and masks them afresh; sequences that come with
    their ``labels`` (the validation set, masked once) are only stacked."""

    def __init__(self, tokenizer: Any, rule: MaskingRule, seed: int) -> None:
        self.rule = rule
        self.table = rule.continuation_table(tokenizer)
        self.mask_id = tokenizer.mask_token_id
        self.rng = np.random.default_rng(seed)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" in examples[0]:  # masked in advance (the validation set)
            return stack_masked(examples)
        pairs = [
            self.rule.mask(np.asarray(e["input_ids"], dtype=np.int64), self.table, self.mask_id, self.rng)
            for e in examples
        ]
        return {
            "input_ids": torch.from_numpy(np.stack([m for m, _ in pairs])),
            "labels": torch.from_numpy(np.stack([labels for _, labels in pairs])),
        }


def stack_masked(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``data_collator`` for sequences masked in advance (the validation set)."""
    return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels")}
