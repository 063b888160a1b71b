"""An offline text corpus that every machine with Python has: the docstrings of the standard library.

Made from the ``.py`` files of the running interpreter's standard library (``sysconfig``'s ``stdlib`` path), without
its tests, ``idlelib``, ``lib2to3`` and ``site-packages``: every module, class and function docstring of at least
:data:`MIN_WORDS` words, whitespace collapsed to single spaces, duplicates dropped, in sorted file order. CPython
3.11 gives about 3,200 documents, 206,000 words, 1.3 MB. The split is by a hash of each document's text, so it is
the same on every run and machine with the same Python (another Python version gives a somewhat different corpus).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import SettingError
from ..record import replace_file, write_json

MIN_WORDS = 20
_SOURCE = "docstrings of the Python standard library"
_SKIPPED = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def stdlib_docstrings(root: str | Path | None = None) -> list[str]:
    """The documents: standard-library docstrings of at least :data:`MIN_WORDS` words, one line each.

    Parsing the standard library takes seconds, so a process parses each root once."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return list(_parse_docstrings(root.resolve()))


@functools.cache
def _parse_docstrings(root: Path) -> tuple[str, ...]:
    documents: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # the stdlib ships a few deliberately broken files
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(words := text.split()) >= MIN_WORDS:
                    documents.setdefault(" ".join(words))
    return tuple(documents)


def in_validation(document: str, validation_percent: int) -> bool:
    """Whether a document belongs to the validation split: by its text's hash, the same everywhere."""
    return int(hashlib.sha1(document.encode("utf-8")).hexdigest(), 16) % 100 < validation_percent


@dataclass(frozen=True)
class CorpusFiles:
    train_file: Path
    validation_file: Path
    train_documents: int
    validation_documents: int


def write_embedded_corpus(directory: str | Path, validation_percent: int = 5) -> CorpusFiles:
    """Write the corpus as ``train.txt`` and ``validation.txt`` (one document per line) under ``directory``, with a
    ``corpus.json`` saying how it was made; a corpus already there from the same Python and split is reused."""
    if isinstance(validation_percent, bool) or not isinstance(validation_percent, int):
        raise SettingError("validation_percent", "must be an integer in 1..50", validation_percent)
    if not 1 <= validation_percent <= 50:
        raise SettingError("validation_percent", "must be an integer in 1..50", validation_percent)
    folder = Path(directory)
    made_by = {
        "source": _SOURCE,
        "python": sys.version.split()[0],
        "min_words": MIN_WORDS,
        "validation_percent": validation_percent,
    }
    record = folder / "corpus.json"
    train, validation = folder / "train.txt", folder / "validation.txt"
    saved = _own_record(record)
    if saved is None and (train.exists() or validation.exists()):
        raise SettingError(
            "directory",
            "holds a train.txt or validation.txt that is not an embedded corpus; choose another",
            str(folder),
        )
    current = saved is not None and {k: saved.get(k) for k in made_by} == made_by
    if current and train.is_file() and validation.is_file():
        return CorpusFiles(train, validation, saved["train_documents"], saved["validation_documents"])
    documents = stdlib_docstrings()
    held_out = [d for d in documents if in_validation(d, validation_percent)]
    kept = [d for d in documents if not in_validation(d, validation_percent)]
    folder.mkdir(parents=True, exist_ok=True)
    replace_file(train, "".join(f"{d}\n" for d in kept))
    replace_file(validation, "".join(f"{d}\n" for d in held_out))
    made_by.update(train_documents=len(kept), validation_documents=len(held_out))
    write_json(record, made_by)
    return CorpusFiles(train, validation, len(kept), len(held_out))


def _own_record(record: Path) -> dict | None:
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("source") == _SOURCE else None
