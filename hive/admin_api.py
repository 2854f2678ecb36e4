"""Admin endpoints the `hive` CLI uses beyond the public API (issue 5: to be built)."""

from __future__ import annotations

routes: list = []
