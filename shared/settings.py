"""Typed settings, built once at start-up from command-line flags and the environment.

The CLI (typer) reads flags and their ``HIVE_*`` environment variables and builds one
``Settings``; nothing in Hive reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from . import keys

DEFAULT_PORT = 7833
#: The model the CLI asks for when none is given; ``hive up`` serves it from its
#: built-in hub mirror so the first run works offline.
DEMO_MODEL = "hive-demo/tiny-llama"
#: Seconds between a failing terminal webhook delivery's attempts (each stretched by
#: up to a quarter, at random, and never shorter than the receiver's Retry-After):
#: 8 attempts over about an hour.
WEBHOOK_RETRY_DELAYS = (5.0, 30.0, 120.0, 300.0, 600.0, 1200.0, 1500.0)


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Hive: a submit is acknowledged (202) once this many replicas have it (Redis's
    #: WAIT); the CLI makes it 1 with a Sentinel URL and 0 with a plain one.
    redis_min_replicas: int = 0
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    queue: str = keys.DEFAULT_QUEUE
    job_ttl_s: int = keys.JOB_TTL_S
    #: RQ kills a job that runs longer than this (download + load + generation).
    job_timeout_s: int = 3600
    #: A job waiting in the queue longer than this ends with TIMEOUT.
    max_queue_wait_s: float = 3600.0
    #: Past these many waiting jobs (in all, and for one model) POST answers 429.
    max_queue: int = 10_000
    max_queue_per_model: int = 1_000
    max_body_bytes: int = 1024 * 1024
    #: SSE keep-alive comment interval while a stream is quiet.
    sse_ping_s: float = 10.0
    #: Hive: API keys (``Authorization: Bearer <key>``); none means local mode, which
    #: listens on loopback only. Admin keys also see every job.
    api_keys: tuple[str, ...] = ()
    #: Hive: per API key, jobs created a minute and jobs in flight (0: no limit), and
    #: a JSON file of per-key overrides and names (hive/jobs/quotas.py).
    key_rate_per_min: float = 0.0
    key_max_in_flight: int = 0
    key_limits_file: str = ""
    admin_keys: tuple[str, ...] = ()
    #: Worker: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
    device: str = "auto"
    #: Worker: ``auto`` (bf16/fp16 from the checkpoint on CUDA, float32 on CPU) or a torch dtype name.
    dtype: str = "auto"
    worker_name: str = ""
    #: Worker: sleep this long after each token. Zero in production; tests and demos
    #: use it to make streaming visible on a model that generates in microseconds.
    token_delay_ms: float = 0.0
    #: Worker: memory for loaded models, in bytes; 0: the device's free memory at
    #: start-up minus MEMORY_HEADROOM. Least recently used models make room.
    max_memory: int = 0
    #: Worker: how long a model stays loaded after its last job (a request's
    #: keep_alive overrides it); negative: until evicted.
    keep_alive_s: float = 300.0
    #: Worker: jobs it runs at once, in one batch per model (continuous batching);
    #: 0: the device's default (worker/runtime.py); 1: one job at a time.
    max_batch: int = 0
    #: Worker: keep the keys and values of computed prompt blocks for later prompts
    #: that start alike (worker/kv/prefix.py); and whose prompts may reuse
    #: whose: ``key`` (each API key its own; the default, since a hit is faster and
    #: timing would tell one key of another's prompt) or ``shared`` (every key alike).
    prefix_cache: bool = True
    prefix_cache_scope: str = "key"
    #: Worker: the most the prefix cache holds, in bytes; 0: 1 GiB on the CPU (its
    #: memory is reused once full: growing it costs first-touch page faults, 4% of
    #: the step time while it grows, bench/prefix.py), else what the batches leave.
    prefix_cache_bytes: int = 0
    #: Hive: route a prompt to the idle worker that last ran one starting alike
    #: (shared/prefix_affinity.py); off: the idle worker with the most free slots.
    prefix_routing: bool = True
    #: Worker: serve its Prometheus metrics on this port (0: off).
    metrics_port: int = 0
    #: Hive: the hub that ``/hub`` mirrors (pulls through on a miss); "" serves no ``/hub``.
    hub_upstream: str = "https://huggingface.co"
    #: Hive: the Hugging Face cache folder ``/hub`` serves and fills; "": huggingface_hub's
    #: default (HF_HUB_CACHE).
    hub_cache: str = ""
    #: Hive: see WEBHOOK_RETRY_DELAYS; tests run the schedule in milliseconds.
    webhook_retry_delays: tuple[float, ...] = WEBHOOK_RETRY_DELAYS
    #: Hive: let webhooks call loopback, private, link-local (and other non-public)
    #: addresses; off, such a URL is refused at submit and at every delivery.
    webhook_allow_private: bool = False

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:  # secrets print as ***
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["redis_url"] = redact_url(self.redis_url)
        fields["hub_upstream"] = redact_url(self.hub_upstream)
        for name in ("api_keys", "admin_keys"):
            fields[name] = tuple("***" for _ in fields[name])
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` → ``redis://user:***@host``; a Sentinel URL's
    ``sentinel_password=secret`` → ``sentinel_password=***``."""
    parts = urlsplit(url)
    query = re.sub(r"(^|&)(sentinel_password=)[^&]*", r"\1\2***", parts.query)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))
