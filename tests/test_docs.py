"""The README stays a front page (what it is, install, the two commands, the Trainer and accelerate changes, links)
and every link in it leads somewhere; the documentation site itself is built by `make docs` (MkDocs, strict)."""

from __future__ import annotations

import re

import yaml
from procs import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_front_page_of_at_most_150_lines():
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= 150, len(readme)
    text = "\n".join(readme)
    for essential in ("make main", "make test", "LegwTrainer as Trainer", "create_legw_scheduler", "pip install"):
        assert essential in text, essential


def test_every_relative_link_in_the_readme_leads_to_a_file():
    targets = [t for t in LINK.findall((REPO / "README.md").read_text()) if "://" not in t]
    assert len(targets) >= 10
    for target in targets:
        assert (REPO / target).exists(), target


def test_every_docs_page_is_in_the_sites_navigation():
    config = (REPO / "mkdocs.yml").read_text()
    nav = yaml.safe_load(config)["nav"]

    def pages(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(nav))
    on_disk = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert listed == on_disk
