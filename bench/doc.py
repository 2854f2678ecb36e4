"""docs/benchmarks.md, one section per benchmark: each benchmark replaces its own
section and leaves the others as they are, byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nFigures measured on this project's machines, each with the command that reproduces it.\n"


def replace_section(title: str, section: str, doc: Path = DOC) -> None:
    """Replaces the ``## <title>…`` section of ``doc`` with ``section`` (which starts
    with its own ``## `` heading), or appends it when there is none yet."""
    text = doc.read_text() if doc.exists() else HEADER
    head, *sections = text.split("\n## ")
    new = section.strip("\n").removeprefix("## ") + "\n"
    at = next((i for i, s in enumerate(sections) if s.startswith(title)), None)
    if at is None:
        sections.append(new)
    else:
        sections[at] = new
    doc.write_text("\n## ".join(part if part.endswith("\n") else part + "\n" for part in [head, *sections]))
    print(f"wrote the '{title}' section of {doc}", file=sys.stderr)


def section_text(title: str, doc: Path = DOC) -> str:
    """The ``## <title>`` section of ``doc`` without its heading, or ""."""
    if not doc.exists():
        return ""
    _, *sections = doc.read_text().split("\n## ")
    return next((s for s in sections if s.startswith(title)), "")
