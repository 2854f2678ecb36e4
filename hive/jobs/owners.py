"""Who a job belongs to: an API key's id, the first 24 hex digits of its SHA-256.

Jobs, quotas and metrics name a key by its id alone, so Redis, ``/metrics`` and
``--key-limits`` files never need to hold the key itself.
"""

from __future__ import annotations

import hashlib


def owner_of(key: str) -> str:
    """The id of API key ``key``: what a job's ``owner`` field holds."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]
