"""What the benchmarks read of their processes: CPU seconds and resident memory, from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(stat: Path) -> list[str]:
    # After the command name, which may hold spaces and parentheses.
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of ``pid``, with ``children`` also of its live
    child processes (``hive serve --workers N``)."""
    stats = [Path(f"/proc/{pid}/stat")]
    if children:
        stats += [s for s in Path("/proc").glob("[0-9]*/stat") if s.parent.name != str(pid)]
    total = 0.0
    for stat in stats:
        try:
            fields = _stat_fields(stat)
        except OSError:
            continue  # a process that ended meanwhile
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
