"""One line of ``python -m bench``'s summary: a measured figure next to its target."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    benchmark: str
    figure: str
    target: str
    measured: str
    #: None: reported only, no target to meet.
    met: bool | None


def spread(values: list[float], fmt: str) -> str:
    """The median with min–max in brackets."""
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"
