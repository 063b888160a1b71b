"""BERT models by size, built from a config (no download). Sizes as in Turc et al., "Well-Read Students Learn
Better" (2019) for tiny and mini, and Devlin et al. (2019) for base and large: layers, hidden size, attention heads
(hidden / 64) and a feed-forward of 4 × hidden."""

from __future__ import annotations

from pathlib import Path

from transformers import BertConfig, BertForMaskedLM

from ..averaging import checkpoint_weights
from ..errors import SettingError

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


def bert_from_checkpoint(checkpoint: str | Path, config: BertConfig) -> BertForMaskedLM:
    """The model a Trainer checkpoint holds: its model files, or (DeepSpeed ZeRO-3 without them) the weights
    DeepSpeed consolidates from its partitions."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "config.json").is_file() and any(checkpoint.glob("model*.safetensors")):
        return BertForMaskedLM.from_pretrained(checkpoint)
    model = BertForMaskedLM(config)
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
