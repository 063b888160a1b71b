"""From raw text to the packed sequences of each phase, done once and cached by ``datasets``.

The steps, each a ``datasets`` map or filter with a cache file named by what went into it (so a second run with the
same text, tokenizer and settings loads the results instead of recomputing them):

1. documents: text files (one document per line, or blank-line separated paragraphs), a ``datasets`` dataset, or
   the embedded offline corpus (:mod:`legw_hf.pretraining.corpus`);
2. a WordPiece tokenizer trained on the training documents with ``tokenizers`` (or a local tokenizer);
3. tokenize every document once (no special tokens);
4. drop documents over ``max_document_tokens`` (Popel & Bojar: filter over-long examples once and store the result,
   instead of truncating or re-filtering every epoch);
5. pack: documents back to back, each ended by ``[SEP]``, cut into ``[CLS]`` + ``seq_len - 1`` tokens (the last
   partial piece of each 1000-document slice is dropped), one packing per phase's sequence length;
6. validation only: masked once with a fixed seed (:func:`legw_hf.pretraining.masking.mask_sequences`), so every
   evaluation of every model sees the same masks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast

from ..errors import SettingError
from ..record import replace_file
from .corpus import write_embedded_corpus
from .masking import MaskingRule, mask_sequences

logger = logging.getLogger(__name__)

#: Bumped when a step's output changes for the same inputs, so old cache files are not reused.
PIPELINE_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PACK_SLICE = 1000


@dataclass(frozen=True)
class TextSource:
    """Where the documents come from, and a name for them that changes when the text does."""

    train: datasets.Dataset
    validation: datasets.Dataset
    description: str

    @property
    def identity(self) -> str:
        return _digest(self.train._fingerprint, self.validation._fingerprint)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _text_file(field: str, path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise SettingError(field, "must be an existing text file", path)
    if not file.read_text(encoding="utf-8", errors="replace").strip():
        raise SettingError(field, "must hold at least one non-blank document", path)
    return file


def _documents_of(files: dict[str, Path], documents: str) -> datasets.DatasetDict:
    if documents == "auto":
        texts = {split: file.read_text(encoding="utf-8", errors="replace") for split, file in files.items()}
        documents = "paragraph" if any("\n\n" in text.strip() for text in texts.values()) else "line"
    loaded = datasets.load_dataset(
        "text", data_files={split: str(file) for split, file in files.items()}, sample_by=documents
    )
    return loaded.map(
        lambda batch: {"text": [" ".join(t.split()) for t in batch["text"]]}, batched=True, desc="Joining lines"
    ).filter(lambda batch: [bool(t) for t in batch["text"]], batched=True, desc="Dropping blank documents")


def load_text(
    *,
    train_file: str | None,
    validation_file: str | None,
    dataset_name: str | None,
    dataset_config_name: str | None,
    text_column: str,
    validation_split_percentage: int,
    documents: str,
    corpus_dir: Path,
) -> TextSource:
    """The training and validation documents, each a ``text`` column of non-blank, whitespace-collapsed text."""
    if dataset_name is not None and (train_file or validation_file):
        raise SettingError("dataset_name", "cannot be combined with --train_file / --validation_file", dataset_name)
    if validation_file is not None and train_file is None:
        raise SettingError("train_file", "is required with --validation_file", None)
    if not 1 <= validation_split_percentage <= 50:
        raise SettingError("validation_split_percentage", "must be an integer in 1..50", validation_split_percentage)
    if dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name)
        if text_column not in loaded["train"].column_names:
            raise SettingError(
                "text_column", f"must be a column of {dataset_name} ({loaded['train'].column_names})", text_column
            )
        loaded = (
            loaded.select_columns([text_column]).rename_column(text_column, "text")
            if text_column != "text"
            else loaded.select_columns(["text"])
        )
        description = f"dataset {dataset_name}" + (f" ({dataset_config_name})" if dataset_config_name else "")
    elif train_file is not None:
        files = {"train": _text_file("train_file", train_file)}
        if validation_file is not None:
            files["validation"] = _text_file("validation_file", validation_file)
        loaded = _documents_of(files, documents)
        description = f"{train_file}" + (f" + {validation_file}" if validation_file else "")
    else:
        corpus = write_embedded_corpus(corpus_dir)
        loaded = _documents_of({"train": corpus.train_file, "validation": corpus.validation_file}, "line")
        description = (
            f"embedded corpus (Python standard-library docstrings, {corpus.train_documents} train / "
            f"{corpus.validation_documents} validation documents, in {corpus_dir})"
        )
    if "validation" not in loaded:
        split = loaded["train"].train_test_split(test_size=validation_split_percentage / 100, seed=42)
        loaded = datasets.DatasetDict(train=split["train"], validation=split["test"])
    for split in ("train", "validation"):
        if len(loaded[split]) == 0:
            field = {"train": "train_file", "validation": "validation_file"}[split]
            raise SettingError(field, "must hold at least one non-blank document", 0)
    return TextSource(loaded["train"], loaded["validation"], description)


def wordpiece_tokenizer(texts: Any, vocab_size: int) -> PreTrainedTokenizerFast:
    """A lowercasing BERT WordPiece tokenizer (``[CLS] text [SEP]``) trained on ``texts`` (an iterator of strings or
    of lists of strings), as a fast tokenizer with BERT's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise SettingError("vocab_size", f"must be at least {len(SPECIAL_TOKENS) + 100}", vocab_size)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        texts, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return _wrap(tokenizer)


def train_wordpiece(documents: datasets.Dataset, vocab_size: int, directory: Path) -> PreTrainedTokenizerFast:
    """:func:`wordpiece_tokenizer` trained on ``documents``, saved in ``directory`` and reused from there."""
    from tokenizers import Tokenizer

    saved = directory / "tokenizer.json"
    if saved.is_file():
        logger.info("Reusing the WordPiece tokenizer in %s", directory)
        return _wrap(Tokenizer.from_file(str(saved)))
    tokenizer = wordpiece_tokenizer(
        (documents[i : i + 1000]["text"] for i in range(0, len(documents), 1000)), vocab_size
    )
    directory.mkdir(parents=True, exist_ok=True)
    replace_file(saved, tokenizer.backend_tokenizer.to_str())
    return tokenizer


def _wrap(tokenizer: Any) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tokenizer_identity(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


class PreparedText:
    """The tokenized, filtered documents of one split, and their packings; every step cached under ``cache_dir``."""

    def __init__(
        self,
        documents: datasets.Dataset,
        tokenizer: PreTrainedTokenizerFast,
        *,
        split: str,
        max_document_tokens: int | None,
        cache_dir: Path,
    ) -> None:
        self.split = split
        self.tokenizer = tokenizer
        self.key = _digest(PIPELINE_VERSION, documents._fingerprint, tokenizer_identity(tokenizer), max_document_tokens)
        self.cache_dir = cache_dir / f"{split}-{self.key}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.reused: list[str] = []
        tokenized = self._map(
            documents,
            "tokenized",
            lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=documents.column_names,
            desc=f"Tokenizing {split} documents",
        )
        self.documents = len(tokenized)
        # Arrow counts the tokens without turning every document into Python lists.
        self.tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0
        if max_document_tokens is None:
            self.kept = tokenized
        else:
            self.kept = self._map(
                tokenized,
                "filtered",
                lambda batch: [len(ids) <= max_document_tokens for ids in batch["input_ids"]],
                method="filter",
                batched=True,
                desc=f"Dropping {split} documents over {max_document_tokens} tokens",
            )
        self.dropped_documents = self.documents - len(self.kept)

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs in the kept documents (special tokens, added only by packing, never)."""
        ids = pc.list_flatten(self.kept.data.column("input_ids")).to_numpy()
        return np.bincount(ids.astype(np.int64, copy=False), minlength=vocab_size)

    def _map(self, dataset: datasets.Dataset, name: str, function: Any, *, method: str = "map", **kwargs: Any):
        cache_file = self.cache_dir / f"{name}.arrow"
        if cache_file.is_file():
            self.reused.append(name)
        return getattr(dataset, method)(
            function,
            cache_file_name=str(cache_file),
            load_from_cache_file=True,
            new_fingerprint=_digest(self.key, name, kwargs.get("desc")),
            **kwargs,
        )

    def packed(self, seq_len: int) -> datasets.Dataset:
        """Sequences of exactly ``seq_len`` tokens: ``[CLS]`` and the next ``seq_len - 1`` tokens of the documents
        laid end to end, each followed by ``[SEP]``."""
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        body = seq_len - 1

        def pack(batch: dict[str, list]) -> dict[str, list]:
            stream = [token for ids in batch["input_ids"] for token in (*ids, sep_id)]
            usable = len(stream) // body * body
            return {"input_ids": [[cls_id, *stream[i : i + body]] for i in range(0, usable, body)]}

        return self._map(
            self.kept,
            f"packed-{seq_len}",
            pack,
            batched=True,
            batch_size=_PACK_SLICE,
            remove_columns=self.kept.column_names,
            desc=f"Packing {self.split} into sequences of {seq_len}",
        )

    def masked(self, seq_len: int, rule: MaskingRule, seed: int) -> datasets.Dataset:
        """The packed sequences with masks drawn once (``input_ids`` masked, ``labels`` -100 where not predicted)."""
        packed = self.packed(seq_len)
        continuation = rule.continuation_table(self.tokenizer)
        return self._map(
            packed,
            f"masked-{seq_len}-{_digest(rule, seed)}",
            lambda batch, indices: mask_sequences(
                batch["input_ids"], indices, rule, continuation, seed, self.tokenizer.mask_token_id
            ),
            batched=True,
            with_indices=True,
            desc=f"Masking {self.split} sequences of {seq_len} once",
        )


@dataclass(frozen=True)
class MaskedLmData:
    """The masked-LM data at one sequence length: packed training sequences (masked afresh in every batch by
    ``rule``) and validation sequences masked once."""

    train: datasets.Dataset
    validation: datasets.Dataset
    rule: MaskingRule
