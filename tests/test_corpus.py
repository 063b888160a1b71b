"""The embedded offline corpus: made the same way every time, split by document, readable by `datasets`, reused,
and never written over a user's files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from procs import python_env

from legw_hf import SettingError
from legw_hf.pretraining.corpus import (
    MIN_WORDS,
    _parse_docstrings,
    in_validation,
    stdlib_docstrings,
    write_embedded_corpus,
)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return stdlib_docstrings()


def test_documents_are_long_single_line_distinct_docstrings(documents):
    assert len(documents) > 1000 and sum(len(d.split()) for d in documents) > 100_000
    assert len(set(documents)) == len(documents)
    assert all(len(d.split()) >= MIN_WORDS and "\n" not in d and d == " ".join(d.split()) for d in documents)
    assert " ".join(json.__doc__.split()) in documents  # a docstring every CPython has, whitespace collapsed
    # the same documents, in the same order, every time (a process parses a root once: parse one package twice)
    package = Path(json.__file__).parent
    assert _parse_docstrings.__wrapped__(package) == _parse_docstrings.__wrapped__(package)
    assert " ".join(json.__doc__.split()) in stdlib_docstrings(package)


def test_files_split_by_document_and_load_with_datasets(tmp_path, documents):
    corpus = write_embedded_corpus(tmp_path / "corpus")
    train = corpus.train_file.read_text().splitlines()
    validation = corpus.validation_file.read_text().splitlines()
    assert (len(train), len(validation)) == (corpus.train_documents, corpus.validation_documents)
    assert sorted(train + validation) == sorted(documents) and not set(train) & set(validation)
    assert all(in_validation(d, 5) for d in validation) and not any(in_validation(d, 5) for d in train)
    assert 0.03 < len(validation) / len(documents) < 0.07
    meta = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert meta["python"] == sys.version.split()[0] and meta["validation_percent"] == 5
    loaded = datasets.load_dataset(
        "text", data_files={"train": str(corpus.train_file), "validation": str(corpus.validation_file)}
    )
    assert loaded["train"].num_rows == len(train) and loaded["validation"]["text"] == validation


def test_an_existing_corpus_is_reused_and_other_files_are_never_overwritten(tmp_path):
    first = write_embedded_corpus(tmp_path / "corpus")
    stamp = first.train_file.stat().st_mtime_ns
    again = write_embedded_corpus(tmp_path / "corpus")
    assert again == first and again.train_file.stat().st_mtime_ns == stamp
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.txt").write_text("my data\n")
    with pytest.raises(SettingError, match="holds a train.txt or validation.txt that is not an embedded corpus"):
        write_embedded_corpus(mine)
    assert (mine / "train.txt").read_text() == "my data\n"
    with pytest.raises(SettingError, match=r"validation_percent must be an integer in 1\.\.50"):
        write_embedded_corpus(tmp_path / "other", validation_percent=0)


@pytest.mark.parametrize("name", ["corpus", "largest_batch"])
def test_the_modules_old_names_still_import_with_a_deprecation_warning(name):
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    import legw_hf.{name} as old\n"
        f"import legw_hf.pretraining.{name} as new\n"
        "assert old is new, (old, new)\n"
        "print(caught[0].category.__name__, caught[0].message)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"DeprecationWarning legw_hf.{name} moved to legw_hf.pretraining.{name}; the old name goes in the next release"
    )
