"""The web console served at ``/`` (issue 5: to be built)."""

from __future__ import annotations

routes: list = []
