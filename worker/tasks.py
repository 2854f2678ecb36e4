"""The functions RQ runs. The hive enqueues them by dotted name, so it never imports this."""

from __future__ import annotations

_runtime = None


def install_runtime(runtime) -> None:
    """Called once by the worker process before it takes jobs."""
    global _runtime
    _runtime = runtime


def _installed():
    if _runtime is None:
        raise RuntimeError("worker tasks run inside `hive worker`, which installs the runtime first")
    return _runtime


def run_inference(job_id: str, spec: dict) -> None:
    _installed().run_job(job_id, spec)


def run_pull(job_id: str, spec: dict) -> None:
    """Downloads the model into this worker's hub cache (POST /v1/models/pull)."""
    _installed().run_job(job_id, spec, kind="pull")


def run_embedding(job_id: str, spec: dict) -> None:
    """One vector per input of an EmbeddingRequest (POST /v1/embeddings)."""
    _installed().run_job(job_id, spec, kind="embedding")
