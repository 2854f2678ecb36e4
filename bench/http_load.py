"""The submit benchmark's load generator: keep-alive connections posting one body to
``POST /v1/inference``, closed loop or open loop at a fixed rate.

Open loop: requests are due at a fixed pace and latency is measured from when each
was due, so a stalled hive is not hidden by the client waiting for it (no
coordinated omission); the achieved rate is the 202s per second.
"""

from __future__ import annotations

import asyncio
import collections
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client for one request shape: the request's bytes
    built once, the answer read by its Content-Length. httpx spends about a core on
    some 250 requests a second, more than the hive does, so it cannot load the hive
    from the same 2 cores (``--client httpx`` measures it anyway)."""

    def __init__(self, host: str, port: int, body: bytes):
        self.host, self.port = host, port
        self.request = (
            f"POST /v1/inference HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> int:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def load(url: str, body: bytes, seconds: float, connections: int, rate: float | None, client_kind: str = "raw") -> dict:
    """``rate`` None: closed loop. Otherwise requests are due every 1/rate s and
    latency counts from when each was due; those still unsent when the run ends are
    counted as ``late`` (the shortfall of the achieved rate)."""
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    ok = 0
    slot = 0
    late = 0
    parsed = httpx.URL(url)
    if client_kind == "raw":
        conns = [RawConnection(parsed.host, parsed.port, body) for _ in range(connections)]
        await asyncio.gather(*(c.open() for c in conns))
        client = None
    else:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        client = httpx.AsyncClient(base_url=url, limits=limits, timeout=10)
        # Open the connections first, so the run measures keep-alive requests.
        await asyncio.gather(*(client.get("/health") for _ in range(connections)))
        conns = [None] * connections
    start = time.perf_counter()
    end = start + seconds

    async def one(conn) -> None:
        nonlocal ok, slot, late
        while True:
            if rate is None:
                due = time.perf_counter()
                if due >= end:
                    return
            else:
                due = start + slot / rate
                if due >= end:
                    return
                slot += 1
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif time.perf_counter() >= end:
                    late += int((end - due) * rate) + 1  # this one and those due after it, unsent
                    slot = int(seconds * rate) + 1
                    return
            try:
                if conn is not None:
                    status = await asyncio.wait_for(conn.post(), 10)
                else:
                    status = (await client.post("/v1/inference", content=body, headers={"content-type": "application/json"})).status_code
                if status == 202:
                    ok += 1
                    latencies.append(time.perf_counter() - due)
                else:
                    errors[str(status)] += 1
            except (TimeoutError, httpx.HTTPError, OSError, asyncio.IncompleteReadError) as e:
                errors[type(e).__name__] += 1
                if conn is not None:
                    return

    cpu = time.process_time()
    await asyncio.gather(*(one(c) for c in conns))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if client is not None:
        await client.aclose()
    else:
        for c in conns:
            c.close()
    return {
        "per_s": ok / elapsed,
        "ok": ok,
        "late": late,
        "seconds": elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * max(latencies, default=float("nan")),
        "errors": dict(errors),
        "client_cpu": cpu / elapsed,
    }
