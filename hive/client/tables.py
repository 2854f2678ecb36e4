"""How the admin CLI shows the hive's answers: rich tables on stdout (full width
when piped), JSON as the hive sent it, states in colour."""

from __future__ import annotations

import json
import time

import typer
from rich.console import Console, Group
from rich.table import Column, Table
from rich.text import Text

STATE_STYLES = {
    "queued": "dim", "downloading": "blue", "loading": "blue", "running": "cyan",
    "completed": "green", "failed": "red", "cancelled": "yellow",
    "idle": "green", "busy": "cyan",
}  # fmt: skip


def print_json(answer: object) -> None:
    typer.echo(json.dumps(answer, indent=2))


def out(*renderables) -> None:
    console = Console()
    if not console.is_terminal:  # piped: rows as long as they need, no ellipses
        console.width = max(console.width, 240)
    console.print(*renderables)


def styled(value: object) -> Text:
    """A table cell; text from the hive is never read as rich markup."""
    text = "-" if value is None or value == "" or value == [] else str(value)
    return Text(text, style=STATE_STYLES.get(text, ""))


def ago(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def size(n: float | None) -> str:
    if not n:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def status_table(answer: dict) -> None:
    health = answer["health"]
    grid = Table.grid(padding=(0, 2))
    grid.add_row("hive", Text(f"{answer['url']} · ", style="bold").append(styled(health.get("status"))))
    grid.add_row("redis", styled(health.get("redis")))
    if "workers" in answer:
        workers = answer["workers"]
        states = sorted({w["state"] for w in workers})
        summary = ", ".join(f"{sum(w['state'] == s for w in workers)} {s}" for s in states)
        grid.add_row("workers", Text(f"{len(workers)} live" + (f": {summary}" if summary else "")))
        shared, *own = answer["queues"]
        on_own = sum(q["length"] for q in own)
        grid.add_row("queue", Text(f"{shared['name']}: {shared['length']} waiting, {on_own} on workers' own queues"))
        grid.add_row("streams", Text(f"{health.get('followers', 0)} followers on this hive"))
    out(grid)
    if answer.get("workers"):
        out(workers_table(answer["workers"]))


# hive workers


def workers_table(workers: list[dict]) -> Table:
    columns = (Column("worker", no_wrap=True), "device", "state", "slots", "jobs", Column("memory", no_wrap=True), "models loaded", "heartbeat")
    table = Table(*columns, box=None)
    for w in workers:
        memory = f"{size(w['memory']['used'])} / {size(w['memory']['budget'])}"
        models = ", ".join(m["model"] for m in w["models"])
        slots = f"{w.get('running', 0)}/{w.get('capacity', 1)}"
        # Admin keys see the jobs (id and phase); others the count only.
        jobs = "\n".join(f"{j['job_id']} {j['phase']}" for j in w.get("jobs") or []) or None
        table.add_row(styled(w["id"]), styled(w["device"]), styled(w["state"]), slots, styled(jobs),
                      memory, styled(models), ago(w["last_heartbeat"]))  # fmt: skip
    return table


def queue_table(answer: dict) -> Group:
    """The queues, then each API key's jobs waiting and running (fair share serves
    the keys in turn)."""
    table = Table("queue", "worker", "waiting", box=None, caption=f"{answer['waiting']} jobs waiting in all", caption_justify="left")
    for q in answer["queues"]:
        worker = "(shared)" if q["worker"] is None else q["worker"] + ("" if q["worker_alive"] else " (gone)")
        table.add_row(styled(q["name"]), styled(worker), str(q["length"]))
    per_key = Table("key", "waiting", "running", box=None)
    for k in answer.get("keys") or []:
        per_key.add_row(styled(k["key"]), str(k["waiting"]), str(k["running"]))
    return Group(table, Text(""), per_key) if answer.get("keys") else Group(table)
