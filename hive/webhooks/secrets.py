"""Webhook signing secrets (the endpoint that hands a key its own: hive/api/webhook_secret.py).

Deliveries are signed with the Standard Webhooks scheme (HMAC-SHA256 over
``id.timestamp.body``) with a ``whsec_`` secret per API key, as Replicate serves it
at ``GET /v1/webhooks/default/secret``. Each key's secret is derived from a random
cluster secret kept in Redis (set once, by the first hive that needs it) and the
key's owner digest: every hive derives the same one without storing a secret per
key, a delivering hive needs only the job's owner (it never sees the key), and a
key cannot work out another key's secret. In local mode (no keys) every job has the
one owner, so there is one secret per cluster.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import redis.asyncio as aioredis

from shared import keys


class WebhookSecrets:
    def __init__(self, connection: aioredis.Redis):
        self.redis = connection
        self._cluster: bytes | None = None

    async def _cluster_secret(self) -> bytes:
        if self._cluster is None:
            # NX: the first hive's wins, and every hive reads that one back.
            await self.redis.set(keys.WEBHOOK_SECRET, secrets.token_hex(32), nx=True)
            value = await self.redis.get(keys.WEBHOOK_SECRET)
            self._cluster = value.encode() if isinstance(value, str) else value
        return self._cluster

    async def for_owner(self, owner: str) -> str:
        """The ``whsec_…`` secret the webhooks of ``owner``'s jobs are signed with."""
        derived = hmac.new(await self._cluster_secret(), b"hive-webhook-secret\n" + owner.encode(), hashlib.sha256).digest()
        return "whsec_" + base64.b64encode(derived).decode()
