"""API keys, job ownership and signed stream URLs.

Without keys the hive runs in local mode: no authentication, loopback only (the
CLI refuses another bind). With keys every endpoint but ``/health`` wants
``Authorization: Bearer <key>``; a job is visible only to the key that created it
(admin keys see all); and the ``sse_url`` handed out carries a short-lived signed
token, so a browser's EventSource, which cannot send headers, can follow it.
Keys are compared in constant time, stored nowhere, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from hive.api.errors import ApiError
from hive.jobs.owners import owner_of
from shared.clock import RedisClock
from shared.settings import Settings

#: How long a stream token stays valid (reconnects with Last-Event-ID included).
STREAM_TOKEN_TTL_S = 3600
LOCAL_OWNER = "local"


@dataclass(frozen=True)
class Principal:
    owner: str
    admin: bool = False

    def may_see(self, owner: str | None) -> bool:
        return self.admin or hmac.compare_digest(self.owner, owner or "")


def read_keys(value: str) -> tuple[str, ...]:
    """``k1,k2`` or ``@/path/to/file`` (one key a line, # comments)."""
    if value.startswith("@"):
        lines = Path(value[1:]).read_text().splitlines()
    else:
        lines = value.split(",")
    return tuple(k.strip() for k in lines if k.strip() and not k.strip().startswith("#"))


class Auth:
    def __init__(self, settings: Settings, clock: RedisClock):
        """``clock``: a token's expiry, checked by whichever hive the stream reaches."""
        self._clock = clock
        self._keys = [(k.encode(), False) for k in settings.api_keys] + [(k.encode(), True) for k in settings.admin_keys]
        self.enabled = bool(self._keys)
        # Derived from the keys: every hive with the same keys accepts the same tokens.
        seed = "\n".join(sorted(settings.api_keys + settings.admin_keys))
        self._secret = hashlib.sha256(b"hive-stream-token\n" + seed.encode()).digest()

    def authenticate(self, request: Request) -> Principal:
        if not self.enabled:
            return Principal(LOCAL_OWNER, admin=True)
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        match: tuple[bytes, bool] | None = None
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            for key, admin in self._keys:  # every key compared: timing tells nothing
                if hmac.compare_digest(key, candidate):
                    match = (key, admin)
        if match is None:
            raise ApiError(
                401, "UNAUTHORIZED", "a valid API key is required: Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}
            )
        return Principal(owner_of(match[0].decode()), admin=match[1])

    def owners(self) -> list[str]:
        """The ids of every key's jobs (one, ``local``, without keys)."""
        if not self.enabled:
            return [LOCAL_OWNER]
        return sorted({owner_of(key.decode()) for key, _ in self._keys})

    def _sign(self, job_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{job_id}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def stream_token(self, job_id: str) -> str:
        expires = int(self._clock.now()) + STREAM_TOKEN_TTL_S
        return f"{expires}.{self._sign(job_id, expires)}"

    def valid_stream_token(self, job_id: str, token: str) -> bool:
        expires, _, signature = token.partition(".")
        if not expires.isdigit() or int(expires) < self._clock.now():
            return False
        return hmac.compare_digest(signature, self._sign(job_id, int(expires)))
