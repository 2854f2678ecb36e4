"""OpenAI-compatible endpoints on top of the same job queue (issue 5: to be built)."""

from __future__ import annotations

routes: list = []
