"""The ``hive`` command: serve, worker, up, run.

Every option has a ``HIVE_*`` environment variable; the command line wins.
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from typing import Annotated, Optional

import typer

from hive.client.admin import register as register_admin_commands
from shared import keys
from shared.settings import DEFAULT_PORT, DEMO_MODEL, WEBHOOK_RETRY_DELAYS, Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Hive: LLM inference jobs on GPU workers, streamed over SSE.")

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"

RedisUrl = Annotated[str, typer.Option("--redis-url", envvar="HIVE_REDIS_URL", help="Redis holding the queue and events.")]
Host = Annotated[str, typer.Option(envvar="HIVE_HOST", help="Interface to bind.")]
Port = Annotated[int, typer.Option(envvar="HIVE_PORT", min=1, max=65535, help="Port to bind.")]
Queue = Annotated[str, typer.Option(envvar="HIVE_QUEUE", help="RQ queue for inference jobs.")]
Device = Annotated[str, typer.Option(envvar="HIVE_DEVICE", help="auto, cpu, cuda or cuda:N; a worker given cuda:0,cuda:1 spreads each model over both.")]
LogLevel = Annotated[str, typer.Option(envvar="HIVE_LOG_LEVEL", help="debug, info, warning or error.")]
MaxMemory = Annotated[
    str,
    typer.Option(envvar="HIVE_MAX_MEMORY", help="Memory for loaded models (8GiB, 512MB); auto: the device's free memory minus 1 GiB."),
]
KeepAlive = Annotated[
    str,
    typer.Option(envvar="HIVE_KEEP_ALIVE", help="Unload a model this long after its last job (30s, 5m, 1h; 0: at once; -1: never)."),
]
JobTtl = Annotated[int, typer.Option(envvar="HIVE_JOB_TTL_S", min=1, help="Job records and replay logs expire this long after the job ends.")]


class PrefixScope(str, Enum):
    key = "key"
    shared = "shared"


HiveUrl = Annotated[str, typer.Option("--url", envvar="HIVE_URL", help="The hive to talk to.")]
ApiKey = Annotated[str, typer.Option(envvar="HIVE_API_KEY", help="API key for a hive that wants one.", show_default=False)]


def _logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}", param_hint="--log-level")
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _check_redis(url: str) -> None:
    """A Redis URL that can never work ends the command with one line; an
    unreachable Redis does not (serve and worker wait for it)."""
    from shared.connections import RedisUnusable, preflight

    try:
        preflight(url)
    except RedisUnusable as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None


def _retry_delays(value: str) -> tuple[float, ...]:
    """``5,30,120``: seconds, each 0 to a day; "" (no retry) is allowed."""
    try:
        delays = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of seconds", param_hint="--webhook-retry-delays") from None
    if len(delays) > 50 or any(not 0 <= d <= 86400 for d in delays):
        raise typer.BadParameter("at most 50 delays, each 0 to 86400 s", param_hint="--webhook-retry-delays")
    return delays


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not provably loopback
        return False


@app.command()
def serve(
    redis_url: RedisUrl = DEFAULT_REDIS,
    host: Host = "127.0.0.1",
    port: Port = DEFAULT_PORT,
    queue: Queue = keys.DEFAULT_QUEUE,
    sse_ping_s: Annotated[float, typer.Option(envvar="HIVE_SSE_PING_S", min=0.1, help="Keep-alive comment interval on quiet streams.")] = 10.0,
    max_queue: Annotated[int, typer.Option(envvar="HIVE_MAX_QUEUE", min=1, help="Waiting jobs in all before POST answers 429.")] = 10_000,
    max_queue_per_model: Annotated[int, typer.Option(envvar="HIVE_MAX_QUEUE_PER_MODEL", min=1, help="Waiting jobs for one model before 429.")] = 1_000,
    max_queue_wait_s: Annotated[float, typer.Option(envvar="HIVE_MAX_QUEUE_WAIT_S", min=0.1, help="A job waiting longer ends with TIMEOUT.")] = 3600.0,
    job_timeout_s: Annotated[int, typer.Option(envvar="HIVE_JOB_TIMEOUT_S", min=1, help="A job running longer ends with TIMEOUT.")] = 3600,
    api_keys: Annotated[str, typer.Option(envvar="HIVE_API_KEYS", help="API keys: k1,k2 or @file. None: local mode, loopback only.", show_default=False)] = "",
    admin_keys: Annotated[str, typer.Option(envvar="HIVE_ADMIN_KEYS", help="Admin keys (see every job): k1,k2 or @file.", show_default=False)] = "",
    hub: Annotated[bool, typer.Option("--hub/--no-hub", envvar="HIVE_HUB", help="Serve /hub, a pull-through mirror of the upstream hub, for workers' HF_ENDPOINT.")] = True,
    hub_upstream: Annotated[str, typer.Option(envvar="HIVE_HUB_UPSTREAM", help="The hub /hub pulls from on a miss.")] = "https://huggingface.co",
    hub_cache: Annotated[str, typer.Option(envvar="HIVE_HUB_CACHE", help="Hugging Face cache folder /hub serves and fills (default: HF_HUB_CACHE).", show_default=False)] = "",
    job_ttl_s: JobTtl = keys.JOB_TTL_S,
    key_rate_per_min: Annotated[float, typer.Option(envvar="HIVE_KEY_RATE_PER_MIN", min=0, help="Jobs each API key may create a minute (0: no limit).")] = 0.0,
    key_max_in_flight: Annotated[int, typer.Option(envvar="HIVE_KEY_MAX_IN_FLIGHT", min=0, help="Jobs each API key may have queued or running (0: no limit).")] = 0,
    key_limits: Annotated[
        str, typer.Option(envvar="HIVE_KEY_LIMITS", help="JSON file of per-key limits and names (docs/api.md, Per-key limits).", show_default=False)
    ] = "",
    redis_min_replicas: Annotated[
        Optional[int],
        typer.Option(
            envvar="HIVE_REDIS_MIN_REPLICAS", min=0,
            help="Answer a submit 202 only once this many Redis replicas have it, else 503 (default: 1 with a redis+sentinel:// URL, else 0).",
            show_default=False,
        ),
    ] = None,
    webhook_retry_delays: Annotated[
        str,
        typer.Option(envvar="HIVE_WEBHOOK_RETRY_DELAYS", help="Seconds between a failing webhook's attempts, comma-separated (one attempt more than delays)."),
    ] = ",".join(f"{d:g}" for d in WEBHOOK_RETRY_DELAYS),
    webhook_allow_private: Annotated[
        bool,
        typer.Option(envvar="HIVE_WEBHOOK_ALLOW_PRIVATE", help="Let webhooks call loopback, private and link-local addresses (tests, private networks)."),
    ] = False,
    prefix_routing: Annotated[
        bool,
        typer.Option("--prefix-routing/--no-prefix-routing", envvar="HIVE_PREFIX_ROUTING",
                     help="Send a prompt to the idle worker that last ran one starting alike (its prefix cache holds it)."),
    ] = True,
    processes: Annotated[int, typer.Option(envvar="HIVE_PROCESSES", min=1, max=64, help="Hive processes sharing the port (each with its own relay and reaper).")] = 1,
    log_level: LogLevel = "info",
) -> None:
    """Run the HTTP API and SSE relay."""
    import functools

    import uvicorn

    from hive.api.auth import read_keys
    from hive.app import create_app

    _logging(log_level)
    _check_redis(redis_url)
    try:
        keys_ = read_keys(api_keys) if api_keys else ()
        admins = read_keys(admin_keys) if admin_keys else ()
    except OSError as e:
        raise typer.BadParameter(f"cannot read keys: {e}", param_hint="--api-keys/--admin-keys") from e
    if not (keys_ or admins) and not _is_loopback(host):
        raise typer.BadParameter(
            f"no API keys: local mode listens on loopback only, not {host}; set HIVE_API_KEYS to serve others", param_hint="--host"
        )
    if hub and not hub_upstream.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{hub_upstream!r} is not an http(s) URL", param_hint="--hub-upstream")
    if key_limits:
        from hive.jobs.quotas import LimitsFileError, Quotas

        try:
            Quotas.from_file(key_limits, key_rate_per_min, key_max_in_flight)
        except LimitsFileError as e:
            raise typer.BadParameter(str(e), param_hint="--key-limits") from None
    retry_delays = _retry_delays(webhook_retry_delays)
    if redis_min_replicas is None:
        from shared.redis_url import is_sentinel

        redis_min_replicas = 1 if is_sentinel(redis_url) else 0
    settings = Settings(
        redis_url=redis_url,
        redis_min_replicas=redis_min_replicas,
        key_rate_per_min=key_rate_per_min,
        key_max_in_flight=key_max_in_flight,
        key_limits_file=key_limits,
        host=host,
        port=port,
        queue=queue,
        sse_ping_s=sse_ping_s,
        max_queue=max_queue,
        max_queue_per_model=max_queue_per_model,
        max_queue_wait_s=max_queue_wait_s,
        job_timeout_s=job_timeout_s,
        api_keys=keys_,
        admin_keys=admins,
        job_ttl_s=job_ttl_s,
        hub_upstream=hub_upstream if hub else "",
        hub_cache=hub_cache,
        webhook_retry_delays=retry_delays,
        webhook_allow_private=webhook_allow_private,
        prefix_routing=prefix_routing,
    )
    from hive.server import SERVER_OPTIONS, ReusePortProcesses

    config = uvicorn.Config(
        functools.partial(create_app, settings),
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_level=log_level.lower(),
        **SERVER_OPTIONS,
    )
    if processes == 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:  # as uvicorn.run: the port was taken, or the lifespan failed
            raise typer.Exit(3)
        return
    # uvicorn.run() takes several processes only with an app import string, which
    # would leave the settings to the environment; its supervisor itself accepts
    # any picklable factory, so each process gets these settings, parsed once here.
    try:
        supervisor = ReusePortProcesses(config)
        supervisor.check_port()
    except OSError as e:
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {e.strerror}", param_hint="--port") from e
    supervisor.run()


@app.command()
def worker(
    redis_url: RedisUrl = DEFAULT_REDIS,
    device: Device = "auto",
    queue: Queue = keys.DEFAULT_QUEUE,
    dtype: Annotated[str, typer.Option(envvar="HIVE_DTYPE", help="auto, float32, bfloat16 or float16.")] = "auto",
    name: Annotated[str, typer.Option(envvar="HIVE_WORKER_NAME", help="Worker name (default host:device:pid).")] = "",
    token_delay_ms: Annotated[float, typer.Option(envvar="HIVE_TOKEN_DELAY_MS", min=0, help="Pause after each token (demos, tests).")] = 0.0,
    max_memory: MaxMemory = "auto",
    keep_alive: KeepAlive = "5m",
    max_batch: Annotated[int, typer.Option(envvar="HIVE_MAX_BATCH", min=0, max=1024, help="Jobs run at once, batched per model (0: 32 on CPU, 64 on CUDA; 1: one at a time).")] = 0,
    metrics_port: Annotated[int, typer.Option(envvar="HIVE_METRICS_PORT", min=0, max=65535, help="Serve Prometheus metrics on this port (0: off).")] = 0,
    prefix_cache: Annotated[
        bool, typer.Option("--prefix-cache/--no-prefix-cache", envvar="HIVE_PREFIX_CACHE", help="Reuse the keys and values of prompt prefixes computed before.")
    ] = True,
    prefix_cache_memory: Annotated[
        str, typer.Option(envvar="HIVE_PREFIX_CACHE_MEMORY", help="The most the prefix cache holds (auto: 1GiB on the CPU, what the batches leave on CUDA).")
    ] = "auto",
    prefix_cache_scope: Annotated[
        PrefixScope,
        typer.Option(envvar="HIVE_PREFIX_CACHE_SCOPE", help="key: each API key reuses only its own prefixes (no timing tells one key of another's prompt); shared: all keys alike."),
    ] = PrefixScope.key,
    job_ttl_s: JobTtl = keys.JOB_TTL_S,
    log_level: LogLevel = "info",
    check: Annotated[
        bool,
        typer.Option("--check", help="Ask the worker on --metrics-port whether it is alive (heartbeating) and exit 0 if so, 1 if not: a healthcheck."),
    ] = False,
) -> None:
    """Run a worker: one long-lived process per device that keeps models loaded."""
    if check:
        raise typer.Exit(_check_worker(metrics_port))
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"unknown dtype {dtype!r}", param_hint="--dtype")
    memory_bytes = _memory_size(max_memory)
    keep_alive_s = _duration(keep_alive)
    _logging(log_level)
    _check_redis(redis_url)
    from worker.main import run_worker

    run_worker(
        Settings(
            redis_url=redis_url,
            device=device,
            queue=queue,
            dtype=dtype,
            worker_name=name,
            token_delay_ms=token_delay_ms,
            job_ttl_s=job_ttl_s,
            max_memory=memory_bytes,
            keep_alive_s=keep_alive_s,
            max_batch=max_batch,
            metrics_port=metrics_port,
            prefix_cache=prefix_cache,
            prefix_cache_scope=prefix_cache_scope.value,
            prefix_cache_bytes=_memory_size(prefix_cache_memory, "--prefix-cache-memory"),
        )
    )


def _check_worker(metrics_port: int) -> int:
    """``hive worker --check``: the worker's ``/livez`` (worker/cluster/liveness.py), one line."""
    import httpx

    if not metrics_port:
        raise typer.BadParameter("--check asks the worker's metrics port: give it (or HIVE_METRICS_PORT)", param_hint="--metrics-port")
    url = f"http://127.0.0.1:{metrics_port}/livez"
    try:
        response = httpx.get(url, timeout=3)
        status = response.json()
    except (httpx.HTTPError, ValueError) as e:
        typer.echo(f"worker: no answer from {url}: {e}", err=True)
        return 1
    if response.status_code == 200:
        typer.echo(f"worker alive: last heartbeat {status['heartbeat_age_s']:.1f} s ago")
        return 0
    typer.echo(f"worker not alive: last heartbeat {status['heartbeat_age_s']:.1f} s ago ({status.get('last_error') or 'no error'})", err=True)
    return 1


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _memory_size(text: str, option: str = "--max-memory") -> int:
    """``auto`` → 0; ``8GiB``, ``512MB`` or plain bytes → bytes."""
    if text.strip().lower() == "auto":
        return 0
    match = _SIZE.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r}: expected auto or a size like 8GiB, 512MB", param_hint=option)
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _duration(text: str) -> float:
    from shared.spec import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise typer.BadParameter(f"{text!r}: {e}", param_hint="--keep-alive") from None


def _prompt_body(prompt: str, model: str, max_tokens: int, temperature: float, seed: Optional[int], stop: list[str]) -> dict:
    body: dict = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = stop
    return body


Model = Annotated[str, typer.Option(envvar="HIVE_DEFAULT_MODEL", help="Hub repo id (org/name).")]
MaxTokens = Annotated[int, typer.Option(min=1, max=4096)]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 is greedy.")]
Seed = Annotated[Optional[int], typer.Option(min=0, help="Same seed, same output.")]
Stop = Annotated[list[str], typer.Option(help="Stop sequence (repeatable).")]


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    url: HiveUrl = DEFAULT_URL,
    model: Model = DEMO_MODEL,
    max_tokens: MaxTokens = 64,
    temperature: Temperature = 1.0,
    seed: Seed = None,
    stop: Stop = [],
    api_key: ApiKey = "",
) -> None:
    """Submit a prompt, show download and loading progress, print tokens as they arrive."""
    from hive.client.run import run_prompt

    raise typer.Exit(run_prompt(url, _prompt_body(prompt, model, max_tokens, temperature, seed, stop), api_key=api_key))


@app.command()
def up(
    prompt: Annotated[Optional[str], typer.Option("--run", help="Answer this prompt, then stop.")] = None,
    host: Host = "127.0.0.1",
    port: Port = DEFAULT_PORT,
    device: Device = "auto",
    model: Model = DEMO_MODEL,
    max_tokens: MaxTokens = 64,
    temperature: Temperature = 1.0,
    seed: Seed = None,
    hf_endpoint: Annotated[Optional[str], typer.Option(help="Hub for the worker (default: the hive's built-in /hub with the demo model).")] = None,
    token_delay_ms: Annotated[float, typer.Option(envvar="HIVE_TOKEN_DELAY_MS", min=0, help="Pause after each token.")] = 0.0,
    workers: Annotated[int, typer.Option(envvar="HIVE_WORKERS", min=1, max=64, help="Worker processes; with --device cuda, one per GPU (cuda:0 …).")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the hive's and worker's logs.")] = False,
    redis_url: Annotated[
        Optional[str],
        typer.Option(help="Use this Redis (redis://, or redis+sentinel://) instead of a private one for this run.", show_default=False),
    ] = None,
) -> None:
    """Redis, the hive and its workers on this machine, in the foreground. No GPU, Redis or network needed."""
    from hive.embedded import run_up
    from shared.redis_url import is_sentinel

    _logging("info" if verbose else "warning")
    if redis_url is not None:
        _check_redis(redis_url)
    min_replicas = 1 if redis_url and is_sentinel(redis_url) else 0
    settings = Settings(host=host, port=port, device=device, token_delay_ms=token_delay_ms, redis_min_replicas=min_replicas)
    body = _prompt_body(prompt, model, max_tokens, temperature, seed, []) if prompt is not None else None
    raise typer.Exit(run_up(settings, hf_endpoint, body, verbose, workers, redis_url))


register_admin_commands(app)


def main() -> None:
    app()
