"""The functions RQ runs. The hive enqueues them by dotted name, so it never imports this."""

from __future__ import annotations

_runtime = None


def install_runtime(runtime) -> None:
    """Called once by the worker process before it takes jobs."""
    global _runtime
    _runtime = runtime


def run_inference(job_id: str, spec: dict) -> None:
    if _runtime is None:
        raise RuntimeError("run_inference runs inside `hive worker`, which installs the runtime first")
    _runtime.run_job(job_id, spec)
