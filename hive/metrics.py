"""Prometheus metrics at ``/metrics`` (issue 5: to be built)."""

from __future__ import annotations

routes: list = []
