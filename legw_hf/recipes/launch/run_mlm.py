"""Masked-language-model training in the style of transformers' ``run_mlm.py``, offline, with LEGW.

The LEGW version of a ``run_mlm.py``-style script differs from the plain one by the single import line
marked ``# LEGW`` below; delete it and this is a plain Trainer script again. Everything runs offline: the
WordPiece tokenizer is trained on the training file (with legw_hf's helper) and the BERT model is built from a
config. For the full two-phase pretraining job see ``examples/pretrain_bert.py``. The package ships this script
with its launch recipes (``legw-hf recipes --copy DIR`` puts it in ``DIR/launch/``, where ``job.sh`` runs it);
``examples/run_mlm.py`` of a checkout is a link to it.

    python examples/run_mlm.py --output_dir runs/mlm --legw_base_batch_size 16 --learning_rate 1e-3 \\
        --legw_base_warmup_epochs 0.1 --per_device_train_batch_size 32 --num_train_epochs 2
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from legw_hf import LegwTrainer as Trainer, LegwTrainingArguments as TrainingArguments  # noqa: F811  # LEGW
from legw_hf.pretraining.data import train_wordpiece  # BERT's WordPiece, trained offline
from legw_hf.shutdown import exit_process  # ends a torchrun process without the gloo shutdown abort

logger = logging.getLogger(__name__)

# In a legw_hf checkout (examples/run_mlm.py links here): the offline corpus beside it. Elsewhere, pass --train_file.
DEFAULT_TRAIN_FILE = Path(os.path.abspath(__file__)).parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


@dataclass
class ModelArguments:
    vocab_size: int = field(default=4000, metadata={"help": "WordPiece vocabulary trained on the train file."})
    hidden_size: int = field(default=64)
    num_hidden_layers: int = field(default=2)
    num_attention_heads: int = field(default=2)
    intermediate_size: int = field(default=128)


@dataclass
class DataTrainingArguments:
    train_file: str = field(default=str(DEFAULT_TRAIN_FILE), metadata={"help": "A plain text file."})
    max_seq_length: int = field(default=64)
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N blocks."})
    mlm_probability: float = field(default=0.15)

    def __post_init__(self) -> None:
        if not Path(self.train_file).is_file():
            raise ValueError(f"train_file must be an existing text file, got {self.train_file!r}")


def load_documents(data_args: DataTrainingArguments) -> datasets.Dataset:
    raw = datasets.load_dataset("text", data_files={"train": data_args.train_file})["train"]
    return raw.filter(lambda example: len(example["text"].strip()) > 0)


def shared_tokenizer(documents: datasets.Dataset, vocab_size: int, training_args) -> PreTrainedTokenizerFast:
    """WordPiece trained once, by the main process, and read from output_dir by the others: its training is not
    deterministic, and processes with different vocabularies would cut the text into different numbers of blocks."""
    with training_args.main_process_first(local=False, desc="training the tokenizer"):
        return train_wordpiece(documents, vocab_size, Path(training_args.output_dir) / "wordpiece")


def build_dataset(
    data_args: DataTrainingArguments, documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast
) -> datasets.Dataset:
    tokenized = documents.map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False),
        batched=True,
        remove_columns=["text"],
    )
    block = data_args.max_seq_length

    def group_texts(batch):
        ids = [token for sequence in batch["input_ids"] for token in sequence]
        usable = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, usable, block)]}

    grouped = tokenized.map(group_texts, batched=True, remove_columns=tokenized.column_names)
    if data_args.max_train_samples is not None:
        grouped = grouped.select(range(min(data_args.max_train_samples, len(grouped))))
    return grouped


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Logging as transformers' example scripts set it up: the root logger keeps its WARNING level, and the
    # transformers and datasets loggers follow --log_level (INFO on the main process by default).
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    set_seed(training_args.seed)

    documents = load_documents(data_args)
    tokenizer = shared_tokenizer(documents, model_args.vocab_size, training_args)
    train_dataset = build_dataset(data_args, documents, tokenizer)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        max_position_embeddings=max(512, data_args.max_seq_length),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**result.metrics, "train_samples": len(train_dataset)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)  # train_results.json and all_results.json, as upstream's run_mlm.py
    if training_args.save_strategy != "no":
        trainer.save_model()


if __name__ == "__main__":
    exit_process(main())
