"""MkDocs hook: the flag tables of the documentation, generated from :mod:`legw_hf.settings`.

A page asks for a table with a comment naming the host and what to list (kinds of settings or setting names)::

    <!-- settings-table trainer: config decay run -->

and gets the rows :func:`legw_hf.settings.markdown_table` makes, so a setting added to the schema is documented
wherever its kind is listed.
"""

from __future__ import annotations

import re

from legw_hf.settings import markdown_table

MARKER = re.compile(r"^<!-- settings-table (trainer|cli): ([\w ]+) -->$", re.MULTILINE)


def _table(match: re.Match) -> str:
    return markdown_table(match.group(1), tuple(match.group(2).split()))


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(_table, markdown)
