"""BERT models by size, built from a config (no download). Sizes as in Turc et al., "Well-Read Students Learn
Better" (2019) for tiny and mini, and Devlin et al. (2019) for base and large: layers, hidden size, attention heads
(hidden / 64) and a feed-forward of 4 × hidden."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

from ..averaging import checkpoint_weights
from ..errors import SettingError
from .masking import IGNORED_LABEL

#: size -> (layers, hidden)
MODEL_SIZES: dict[str, tuple[int, int]] = {"tiny": (2, 128), "mini": (4, 256), "base": (12, 768), "large": (24, 1024)}
MAX_POSITIONS = 512


def bert_config(size: str, *, vocab_size: int, pad_token_id: int, max_positions: int = MAX_POSITIONS) -> BertConfig:
    if size not in MODEL_SIZES:
        raise SettingError("model_size", f"must be one of {', '.join(MODEL_SIZES)}", size)
    layers, hidden = MODEL_SIZES[size]
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
    )


class BertForMaskedPositions(BertForMaskedLM):
    """``BertForMaskedLM`` whose training forward runs the prediction head only where a token is predicted.

    The head (a dense layer and the vocabulary projection with its softmax) is most of a small BERT's work when it
    scores every position, yet only ~15% carry a label. NVIDIA's and Google's BERT pretraining gather the masked
    positions first; so does this: same weights, same loss (the mean cross-entropy over the labelled positions),
    same checkpoints (they load into ``BertForMaskedLM``), and in evaluation the usual logits of every position.
    ``logits`` in training are those of the labelled positions only, ``[predicted tokens, vocabulary]``.
    """

    #: The loss is a mean over the micro-batch's labelled tokens, as BertForMaskedLM's: Trainer must average the
    #: accumulated micro-batches itself rather than pass ``num_items_in_batch``.
    accepts_loss_kwargs = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        if labels is None or not self.training:
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                **kwargs,
            )
        hidden = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        ).last_hidden_state
        predicted = labels != IGNORED_LABEL
        scores = self.cls(hidden[predicted])
        return MaskedLMOutput(loss=F.cross_entropy(scores, labels[predicted]), logits=scores)


def bert_from_checkpoint(checkpoint: str | Path, config: BertConfig) -> BertForMaskedPositions:
    """The model a Trainer checkpoint holds: its model files, or (DeepSpeed ZeRO-3 without them) the weights
    DeepSpeed consolidates from its partitions."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "config.json").is_file() and any(checkpoint.glob("model*.safetensors")):
        return BertForMaskedPositions.from_pretrained(checkpoint)
    model = BertForMaskedPositions(config)
    missing, unexpected = model.load_state_dict(checkpoint_weights(checkpoint), strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if unexpected or set(missing) - tied:
        raise SettingError(
            "checkpoint",
            f"must hold this model's weights (missing {missing[:5]}, unexpected {unexpected[:5]})",
            str(checkpoint),
        )
    model.tie_weights()
    return model
