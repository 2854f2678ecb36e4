"""Submitting a prompt and following its stream from a terminal (``hive run``).

Progress bars (download bytes, layers loaded) go to stderr; the generated text
goes to stdout as it arrives, so ``hive run "..." > out.txt`` keeps only the text.
A dropped connection is resumed with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared.events import STREAM_ERROR_CODES

EXIT_OK, EXIT_JOB_FAILED, EXIT_REJECTED, EXIT_UNREACHABLE = 0, 1, 2, 3
RECONNECTS = 5


class ClientError(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def api_error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


@dataclass
class StreamView:
    """Renders one job's events: rich progress bars, then the tokens."""

    err: Console
    out: TextIO = field(default_factory=lambda: sys.stdout)
    progress: Progress | None = None
    tasks: dict[str, int] = field(default_factory=dict)
    error: dict | None = None

    def _bars(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=self.err,
            )
            self.progress.start()
        return self.progress

    def close_bars(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _update(self, bar: str, completed: float, total: float, detail: str) -> None:
        bars = self._bars()
        if bar not in self.tasks:
            self.tasks[bar] = bars.add_task(bar, total=total, detail=detail)
        bars.update(self.tasks[bar], completed=completed, total=total, detail=detail)

    def handle(self, event: str, data: dict) -> None:
        if event == "queued":
            self.err.print(f"[dim]queued at position {data['position']}[/]")
        elif event == "download":
            if data.get("cached"):
                self.err.print(f"[dim]model cached ({data['bytes_total'] / 2**20:.1f} MiB, {data['files_total']} files)[/]")
                return
            detail = (
                f"{data['bytes_downloaded'] / 2**20:.1f}/{data['bytes_total'] / 2**20:.1f} MiB"
                f" · file {data['files_done']}/{data['files_total']}"
            )
            self._update("download", data["bytes_downloaded"], data["bytes_total"], detail)
        elif event == "loading":
            detail = f"layer {data['layers_loaded']}/{data['layers_total']} · {data['vram_mb']:.1f} MB on {data['device']}"
            self._update("loading", data["layers_loaded"], data["layers_total"], detail)
        elif event == "ready":
            self.close_bars()
            how = "already loaded" if data["warm"] else f"loaded in {data['load_ms']:.0f} ms"
            self.err.print(f"[dim]model ready ({how})[/]")
        elif event == "retry":
            self.err.print(f"[yellow]retrying (attempt {data['attempt']}): {data['reason']}[/]")
        elif event == "started":
            self.err.print(f"[dim]generating on {data['worker']}[/]")
        elif event == "gap":
            lost = data["last"] - data["first"] + 1
            self.err.print(f"[yellow]\n[{lost} events lost in a Redis failover; the job goes on][/]")
        elif event == "token":
            self.out.write(data["t"])
            self.out.flush()
        elif event == "end":
            self.out.write("\n")
            self.out.flush()
            rate = data["tokens_out"] / (data["decode_time_ms"] / 1000) if data["decode_time_ms"] else 0.0
            self.err.print(
                f"[dim]{data['tokens_out']} tokens · first token {data['ttft_ms']:.0f} ms · "
                f"{rate:.0f} tokens/s · stop: {data['stop_reason']}[/]"
            )
        elif event == "error":
            self.close_bars()
            self.error = data
            self.err.print(f"[red]error {data['code']}: {data['message']}[/]")


def follow(client: httpx.Client, sse_url: str, view: StreamView) -> None:
    """Follows the stream to ``[DONE]``, resuming after dropped connections and
    after streams the hive ended while the job went on (it restarted, it lost Redis)."""
    last_id = ""
    for attempt in range(RECONNECTS + 1):
        if attempt:  # a restarting hive or Redis needs a few seconds
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        headers = {"Last-Event-ID": last_id} if last_id else {}
        interrupted = ""
        try:
            with connect_sse(client, "GET", sse_url, headers=headers) as source:
                if source.response.status_code == 503 and attempt < RECONNECTS:
                    source.response.read()
                    view.err.print(f"[yellow]{api_error_message(source.response)}; retrying[/]")
                    continue
                if source.response.status_code != 200:
                    source.response.read()
                    raise ClientError(api_error_message(source.response), EXIT_REJECTED)
                for sse in source.iter_sse():
                    if not sse.data:
                        continue  # keep-alive comment
                    if sse.data == "[DONE]":
                        if interrupted:
                            break
                        return
                    data = json.loads(sse.data)
                    if sse.event == "error" and data.get("code") in STREAM_ERROR_CODES:
                        interrupted = f"{data['code']}: {data['message']}"
                        continue
                    last_id = sse.id or last_id
                    view.handle(sse.event, data)
            interrupted = interrupted or "the stream ended without [DONE]"
        except httpx.TransportError as e:
            interrupted = f"{type(e).__name__}: {e}"
        if attempt == RECONNECTS:
            raise ClientError(f"lost the stream ({interrupted})", EXIT_UNREACHABLE)
        view.err.print(f"[yellow]stream interrupted ({interrupted}); resuming after event {last_id or 0}[/]")


def run_prompt(url: str, body: dict, err: Console | None = None, api_key: str = "") -> int:
    """Submits ``body`` to ``POST /v1/inference`` and renders its stream; returns an exit code."""
    err = err or Console(stderr=True)
    view = StreamView(err)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=60.0), headers=headers) as client:
            try:
                response = client.post("/v1/inference", json=body)
            except httpx.TransportError as e:
                raise ClientError(f"cannot reach the hive at {url} ({e}); is `hive up` or `hive serve` running?", EXIT_UNREACHABLE) from e
            if response.status_code != 202:
                raise ClientError(f"rejected: {api_error_message(response)}", EXIT_REJECTED)
            job = response.json()
            err.print(f"[dim]job {job['job_id']}[/]")
            follow(client, job["sse_url"], view)
    except ClientError as e:
        view.close_bars()
        err.print(f"[red]{e}[/]")
        return e.exit_code
    finally:
        view.close_bars()
    return EXIT_JOB_FAILED if view.error else EXIT_OK
