"""Reading py-spy's raw (collapsed) stacks: where a process's CPU time goes, by layer."""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    name: str
    #: A frame belongs to the layer when one of these occurs in it (a file path, a function).
    needles: tuple[str, ...]

    def holds(self, frame: str) -> bool:
        return any(needle in frame for needle in self.needles)


OTHER = "other (interpreter, stdlib)"


def shares(collapsed: str, layers: list[Layer], steps: list[Layer] = ()) -> list[tuple[str, float]]:
    """Each sample counts for the layer of its leaf-most frame that matches one
    (else OTHER), then for every step any of its frames matches (inclusive)."""
    by_layer: collections.Counter = collections.Counter()
    by_step: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        layer = next((layer.name for frame in reversed(frames) for layer in layers if layer.holds(frame)), OTHER)
        by_layer[layer] += n
        for step in steps:
            if any(step.holds(frame) for frame in frames):
                by_step[step.name] += n
    if not total:
        return []
    return [(name, by_layer[name] / total) for name in [*(layer.name for layer in layers), OTHER]] + [
        (step.name, by_step[step.name] / total) for step in steps
    ]
