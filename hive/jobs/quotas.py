"""Per-API-key limits: a create rate (a token bucket) and a maximum of jobs in flight
(queued or running), set by the operator, with the headers that tell a client where
it stands.

Defaults for every key come from ``--key-rate-per-min`` and ``--key-max-in-flight``
(0: no limit); ``--key-limits FILE`` overrides them per key and names keys, so that
``hive queue ls`` and ``/metrics`` show "team-a" rather than a hash. The file is
JSON: ``{"<API key, or its id>": {"name": ..., "rate_per_min": ..., "max_in_flight":
...}}``; a key's id is the first 24 hex digits of its SHA-256 (hive/jobs/owners.py),
so the file need hold no secret. The limits are enforced in the submit script
(hive/jobs/submit.py), atomically with the submit, on every hive alike.

The headers follow the IETF draft (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy: "rate";q=60;w=60, "inflight";q=10`` and ``RateLimit:
"rate";r=59;t=1``; the OpenAI-compatible routes also send OpenAI's
``x-ratelimit-*-requests``, which its client reads to back off.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from hive.jobs.owners import owner_of

_OWNER_ID = re.compile(r"^[0-9a-f]{24}$")


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; 0 means none."""

    name: str = ""
    rate_per_min: float = 0.0
    max_in_flight: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.rate_per_min or self.max_in_flight)

    @property
    def burst(self) -> int:
        """The bucket's size: a minute's worth, so a key may use its rate in a burst."""
        return max(1, math.ceil(self.rate_per_min))


class LimitsFileError(ValueError):
    pass


class Quotas:
    def __init__(self, rate_per_min: float = 0.0, max_in_flight: int = 0, overrides: dict[str, KeyLimits] | None = None):
        self.default = KeyLimits("", rate_per_min, max_in_flight)
        self._overrides = overrides or {}

    @classmethod
    def from_file(cls, path: str, rate_per_min: float, max_in_flight: int) -> "Quotas":
        """Raises LimitsFileError, saying what is wrong, for a file that cannot be used."""

        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise LimitsFileError(f"cannot read the key limits in {path}: {e}") from e
        if not isinstance(entries, dict):
            raise LimitsFileError(f"{path}: expected a JSON object of keys")
        overrides = {}
        for key, spec in entries.items():
            if not isinstance(spec, dict) or set(spec) - {"name", "rate_per_min", "max_in_flight"}:
                raise LimitsFileError(f"{path}: each key maps to {{name, rate_per_min, max_in_flight}}")
            try:
                limits = KeyLimits(
                    str(spec.get("name", "")),
                    float(spec.get("rate_per_min", rate_per_min)),
                    int(spec.get("max_in_flight", max_in_flight)),
                )
            except (TypeError, ValueError) as e:
                raise LimitsFileError(f"{path}: bad limits for a key: {e}") from e
            if limits.rate_per_min < 0 or limits.max_in_flight < 0:
                raise LimitsFileError(f"{path}: limits cannot be negative")
            overrides[key if _OWNER_ID.match(key) else owner_of(key)] = limits
        return cls(rate_per_min, max_in_flight, overrides)

    def for_owner(self, owner: str) -> KeyLimits:
        return self._overrides.get(owner, self.default)

    def name_of(self, owner: str) -> str:
        """How /metrics and ``hive queue ls`` label a key: its name, else its id."""
        return self._overrides.get(owner, self.default).name or owner


def rate_limit_headers(limits: KeyLimits, remaining: float, reset_s: float, in_flight: int, openai: bool) -> dict[str, str]:
    """The headers telling a client its limits and where it stands."""
    policies, states = [], []
    if limits.rate_per_min:
        policies.append(f'"rate";q={limits.burst};w=60')
        states.append(f'"rate";r={max(0, math.floor(remaining))};t={max(0, math.ceil(reset_s))}')
    if limits.max_in_flight:
        policies.append(f'"inflight";q={limits.max_in_flight}')
        states.append(f'"inflight";r={max(0, limits.max_in_flight - in_flight)}')
    headers = {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)} if policies else {}
    if openai and limits.rate_per_min:
        headers |= {
            "x-ratelimit-limit-requests": str(limits.burst),
            "x-ratelimit-remaining-requests": str(max(0, math.floor(remaining))),
            "x-ratelimit-reset-requests": f"{max(0.0, reset_s):.3f}s",
        }
    return headers
