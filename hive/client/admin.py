"""The admin commands of the `hive` CLI: the cluster at a glance (``hive status``),
and its workers, jobs, models and queues (``hive jobs ls``, ``hive jobs tail`` …).

Every command talks to a hive over HTTP (``--url``/``HIVE_URL``, ``--api-key``/
``HIVE_API_KEY``). Tables go to stdout, progress bars and messages to stderr, the
tokens of a followed job to stdout as they arrive; ``--json`` prints the hive's
JSON answer on stdout unchanged, for scripts. Exit codes, as ``hive run``'s: 0 done;
1 the followed job failed or was cancelled, the hive is unhealthy, or a purge was
declined; 2 the hive rejected the request (any 4xx: bad input, no such job, no or
wrong key) or the command line was wrong; 3 the hive cannot be reached or cannot
serve (5xx). httpx is imported only when a command runs: ``hive --help`` stays fast.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Optional
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from hive.client.connection import HiveApi, execute
from hive.client.tables import (
    ago,
    out,
    print_json,
    queue_table,
    size,
    status_table,
    styled,
    workers_table,
)
from shared.settings import DEFAULT_PORT

if TYPE_CHECKING:
    from hive.client.run import StreamView

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
EXIT_UNHEALTHY = EXIT_DECLINED = 1

Url = Annotated[str, typer.Option("--url", envvar="HIVE_URL", help="The hive to talk to.")]
ApiKey = Annotated[str, typer.Option("--api-key", envvar="HIVE_API_KEY", help="API key for a hive that wants one.", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print the hive's JSON answer on stdout.")]
JobId = Annotated[str, typer.Argument(help="The job's id (as `hive jobs ls` shows it).", show_default=False)]
ModelId = Annotated[str, typer.Argument(help="Hub repo id (org/name).", show_default=False)]

def _job_view(err: Console) -> StreamView:
    """client.StreamView, which ends a pull job (no tokens) with a line of its own."""
    from hive.client.run import StreamView

    class JobView(StreamView):
        def handle(self, event: str, data: dict) -> None:
            if event == "end" and data.get("stop_reason") == "pulled":
                self.close_bars()
                self.err.print("[green]pulled[/]")
            else:
                super().handle(event, data)

    return JobView(err)


def _follow(api: HiveApi, job_id: str, err: Console, after: int = 0) -> int:
    """Renders the job's stream from the start (or after event ``after``) to its end:
    progress bars on stderr, tokens on stdout. 0 when it completed, else 1."""
    from hive.client.run import EXIT_JOB_FAILED, EXIT_OK, follow

    view = _job_view(err)
    try:
        follow(api.http, f"/v1/inference/{job_id}/stream" + (f"?last_event_id={after}" if after else ""), view)
    finally:
        view.close_bars()
    return EXIT_JOB_FAILED if view.error else EXIT_OK


def _rejected(message: str) -> Exception:
    from hive.client.run import EXIT_REJECTED, ClientError

    return ClientError(message, EXIT_REJECTED)


def _no_such_job(job_id: str) -> str:
    return f"no such job: {job_id} (unknown, expired, or another key's)"


# hive status


def status(url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """The hive, Redis, workers and queues at a glance; exits 1 when the hive is unhealthy."""

    def action(api: HiveApi, err: Console) -> int:
        health = api.call("GET", "/health", answers=(503,))
        answer: dict = {"url": api.url, "health": health}
        if health.get("status") == "ok":
            answer["workers"] = api.call("GET", "/v1/workers")["workers"]
            answer.update(api.call("GET", "/v1/queues"))
        if as_json:
            print_json(answer)
        else:
            status_table(answer)
        return 0 if health.get("status") == "ok" else EXIT_UNHEALTHY

    execute(url, api_key, action)


def workers_ls(url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """The live workers: device, state, current job (admin keys), memory and models."""

    def action(api: HiveApi, err: Console) -> None:
        answer = api.call("GET", "/v1/workers")
        if as_json:
            print_json(answer)
        elif answer["workers"]:
            out(workers_table(answer["workers"]))
        else:
            err.print("no live workers")

    execute(url, api_key, action)


# hive jobs


def jobs_ls(
    state: Annotated[
        Optional[str],
        typer.Option(
            help="Only jobs in this state: queued, downloading, loading, running, completed, failed or cancelled.", show_default=False
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many, newest first.")] = 50,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = "",
    as_json: AsJson = False,
) -> None:
    """The newest jobs (yours; every key's with an admin key)."""

    def action(api: HiveApi, err: Console) -> None:
        params: dict = {"limit": limit} | ({"state": state} if state else {})
        answer = api.call("GET", "/v1/jobs", params=params)
        if as_json:
            return print_json(answer)
        if not answer["jobs"]:
            return err.print("no jobs")
        table = Table(Column("job", no_wrap=True), "kind", "state", "model", "worker", "created", "tokens", "end", box=None)
        for job in answer["jobs"]:
            end = job.get("error", {}).get("code") or job.get("stop_reason")
            table.add_row(job["job_id"], job["kind"], styled(job["state"]), styled(job["model"]),
                          styled(job["worker"]), ago(job["created_at"]), styled(job["tokens_out"]), styled(end))  # fmt: skip
        out(table)

    execute(url, api_key, action)


def jobs_show(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """A job's state, timings and output."""

    def action(api: HiveApi, err: Console) -> None:
        job = api.call("GET", f"/v1/inference/{job_id}", not_found=_no_such_job(job_id))
        if as_json:
            return print_json(job)
        grid = Table.grid(padding=(0, 2))
        grid.add_row("job", Text(f"{job['job_id']} ({job['kind']}, attempt {job['attempt']})"))
        grid.add_row("state", styled(job["state"]))
        grid.add_row("model", Text(f"{job['model']}@{job['revision'] or 'main'}"))
        grid.add_row("worker", styled(job["worker"]))
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created_at"])) if job["created_at"] else "-"
        grid.add_row("created", f"{created} ({ago(job['created_at'])})")
        names = {"queue_ms": "queue", "load_ms": "load", "ttft_ms": "first token", "decode_time_ms": "decode", "total_ms": "total"}
        timings = " · ".join(f"{names[k]} {v:.0f} ms" for k, v in job["timings"].items() if v is not None)
        grid.add_row("timings", timings or "-")
        if job["kind"] == "inference":
            grid.add_row("tokens", f"{job['prompt_tokens'] or 0} in · {job['tokens_out'] or 0} out · stop: {job['stop_reason'] or '-'}")
        if "error" in job:
            grid.add_row("error", Text(f"{job['error']['code']}: {job['error']['message']}", style="red"))
        out(grid)
        if "output" in job:
            out(Text("output", style="bold"))
            typer.echo(job["output"])

    execute(url, api_key, action)


def jobs_tail(
    job_id: JobId,
    from_id: Annotated[int, typer.Option(min=0, help="Start after this event id (0: from the job's first event).")] = 0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Follow a job's stream to its end (progress bars, then tokens); exits 1 when it failed or was cancelled."""

    def action(api: HiveApi, err: Console) -> int:
        job = api.call("GET", f"/v1/inference/{job_id}", not_found=_no_such_job(job_id))
        err.print(Text(f"job {job_id} ({job['kind']}, {job['state']})", style="dim"))
        return _follow(api, job_id, err, from_id)

    execute(url, api_key, action)


def jobs_cancel(job_id: JobId, url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """Cancel a job in any phase; exits 2 when it had already finished."""

    def action(api: HiveApi, err: Console) -> None:
        answer = api.call("DELETE", f"/v1/inference/{job_id}", not_found=_no_such_job(job_id))
        if as_json:
            return print_json(answer)
        if answer["state"] == "cancelled":
            err.print(f"job {job_id} cancelled")
        else:
            err.print(f"job {job_id} cancelling: its worker stops it within a token, a chunk or a layer")

    execute(url, api_key, action)


# hive models


def models_ls(url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """The models the workers hold in memory or in their hub caches (and the hive's /hub cache)."""

    def action(api: HiveApi, err: Console) -> None:
        answer = api.call("GET", "/v1/models")
        if as_json:
            return print_json(answer)
        if not answer["data"]:
            return err.print("no models loaded or cached")
        table = Table("model", "revisions", "size", "loaded on", "cached on", box=None)
        for m in answer["data"]:
            table.add_row(styled(m["id"]), styled(", ".join(m["revisions"])), size(m["size_bytes"]),
                          styled(", ".join(m["loaded_on"])), styled(", ".join(m["cached_on"])))  # fmt: skip
        out(table)

    execute(url, api_key, action)


def _model_id(model: str) -> str:
    """The hive validates repo ids; this catches what would not even reach the right URL."""
    org, _, name = model.partition("/")
    if not org or not name or "/" in name:
        raise typer.BadParameter(f"{model!r} is not a hub repo id (org/name)", param_hint="MODEL")
    return model


def models_pull(
    model: ModelId,
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit (default: main).", show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Download a model into a worker's hub cache ahead of its first job, with a progress bar (admin)."""
    body = {"model": _model_id(model)} | ({"revision": revision} if revision else {})

    def action(api: HiveApi, err: Console) -> int:
        job = api.call("POST", "/v1/models/pull", json=body)
        err.print(Text(f"job {job['job_id']}", style="dim"))
        return _follow(api, job["job_id"], err)

    execute(url, api_key, action)


def models_rm(model: ModelId, url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """Delete a model from the workers' hub caches and the hive's (admin); exits 2 while it is loaded."""
    path = f"/v1/models/{quote(_model_id(model))}"

    def action(api: HiveApi, err: Console) -> None:
        answer = api.call("DELETE", path, not_found=f"no worker has {model} loaded or cached")
        if as_json:
            return print_json(answer)
        err.print(Text(f"deleting {model} from {', '.join(answer['deleting_on']) or 'no cache'}"))

    execute(url, api_key, action)


# hive queue


def queue_ls(url: Url = DEFAULT_URL, api_key: ApiKey = "", as_json: AsJson = False) -> None:
    """The cluster's shared queue and the workers' own queues, with how many jobs wait on each."""

    def action(api: HiveApi, err: Console) -> None:
        answer = api.call("GET", "/v1/queues")
        if as_json:
            return print_json(answer)
        out(queue_table(answer))

    execute(url, api_key, action)


def queue_purge(
    name: Annotated[Optional[str], typer.Argument(help="The queue (default: every queue of the cluster).", show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = "",
    as_json: AsJson = False,
) -> None:
    """Cancel every job waiting on a queue (admin): each one's stream ends with CANCELLED."""

    def action(api: HiveApi, err: Console) -> Optional[int]:
        queues = api.call("GET", "/v1/queues")["queues"]
        if name is not None and name not in {q["name"] for q in queues}:
            raise _rejected(f"no queue {name} in this cluster (see `hive queue ls`)")
        chosen = [q for q in queues if q["length"] and (name is None or q["name"] == name)]
        waiting = sum(q["length"] for q in chosen)
        if not yes and waiting:
            try:
                confirmed = typer.confirm(f"Cancel the {waiting} jobs waiting on {', '.join(q['name'] for q in chosen)}?", err=True)
            except typer.Abort:
                confirmed = False
            if not confirmed:
                err.print("nothing purged")
                return EXIT_DECLINED
        results = [api.call("POST", f"/v1/queues/{quote(q['name'], safe=':,@')}/purge") for q in chosen]
        if as_json:
            return print_json({"purged": results})
        for r in results:
            skipped = f", {len(r['skipped'])} skipped (no Hive job, or already finished)" if r["skipped"] else ""
            err.print(Text(f"{r['queue']}: {len(r['cancelled'])} cancelled, {len(r['cancelling'])} cancelling{skipped}"))
        if not results:
            err.print("nothing waiting")

    execute(url, api_key, action)


def register(app: typer.Typer) -> None:
    """Adds the admin commands to ``app``."""
    app.command("status")(status)
    groups = {
        "workers": ("The live workers.", {"ls": workers_ls}),
        "jobs": ("Jobs: list, show, follow, cancel.", {"ls": jobs_ls, "show": jobs_show, "tail": jobs_tail, "cancel": jobs_cancel}),
        "models": ("Models in the workers' memory and caches.", {"ls": models_ls, "pull": models_pull, "rm": models_rm}),
        "queue": ("The cluster's queues.", {"ls": queue_ls, "purge": queue_purge}),
    }
    for group, (help_text, commands) in groups.items():
        sub = typer.Typer(no_args_is_help=True, help=help_text)
        for command, function in commands.items():
            sub.command(command)(function)
        app.add_typer(sub, name=group)
