"""MkDocs hook: two fixes to the rendered pages.

- The package's docstrings are written for Sphinx (``:func:`name```); mkdocstrings renders them as Markdown,
  where a role would stay as text beside its code. Keep the code, drop the role (and, as Sphinx does, the module
  path of a ``~`` reference).
- A ``|`` inside inline code in a table row is written ``\\|`` (GitHub's rule); Python-Markdown's tables keep the
  backslash inside the code. Drop it there.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):<code>(~(?:[\w.]+\.)?)?")
INLINE_CODE = re.compile(r"<code>([^<]*)</code>")


def _drop_role(match: re.Match) -> str:
    return "<code>"


def _unescape_pipes(match: re.Match) -> str:
    return "<code>" + match.group(1).replace("\\|", "|") + "</code>"


def on_page_content(html: str, **kwargs) -> str:
    html = ROLE.sub(_drop_role, html)
    return INLINE_CODE.sub(_unescape_pipes, html)
