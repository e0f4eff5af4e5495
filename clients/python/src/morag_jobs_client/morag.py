"""A drop-in replacement for MoRAG's in-process ``RemoteJobService``.

MoRAG's ingestion (``morag/ingest_tasks.py``) creates remote jobs with
``RemoteJobService().create_job(CreateRemoteJobRequest(...))`` and reads them back with
``RemoteJobService().get_job_status(job_id)``. This module offers the same two calls,
backed by a morag-jobs server over HTTP, so switching is an import change plus two
settings:

- ``MORAG_JOBS_URL``: the server, e.g. ``http://jobs.internal:8700``;
- ``MORAG_JOBS_API_KEY``: an admin key of that server (``MORAG_ADMIN_API_KEYS``).

``create_job`` accepts MoRAG's own pydantic ``CreateRemoteJobRequest``, this module's
dataclass of the same name, or a mapping with the same four fields, and returns a
:class:`RemoteJob` with MoRAG's field names (``id``, ``status``, ``created_at``, ...).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Mapping, Optional, Tuple

from .client import MoragJobsClient
from .errors import NotFoundError
from .models import FINISHED_STATUSES, JobDetail


@dataclass
class CreateRemoteJobRequest:
    """MoRAG's request model, field for field."""

    source_file_path: str
    content_type: str
    task_options: Dict[str, Any] = field(default_factory=dict)
    ingestion_task_id: str = ""


@dataclass
class RemoteJob:
    """MoRAG's ``RemoteJob`` (``morag_core.models.remote_job``), field for field.

    ``result_data`` is ``{"content", "metadata", "processing_time"}`` once the job
    completed, as MoRAG's repository wrote it. ``timeout_at`` is the running attempt's
    execution deadline.
    """

    id: str
    ingestion_task_id: str
    source_file_path: str
    content_type: str
    task_options: Dict[str, Any]
    status: str = "pending"
    worker_id: Optional[str] = None
    created_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    error_message: Optional[str] = None
    result_data: Optional[Dict[str, Any]] = None
    retry_count: int = 0
    max_retries: int = 3
    timeout_at: Optional[datetime] = None

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def is_expired(self) -> bool:
        return self.timeout_at is not None and datetime.now(timezone.utc) > self.timeout_at

    @property
    def processing_duration(self) -> float:
        if not self.started_at:
            return 0.0
        end = self.completed_at or datetime.now(timezone.utc)
        return (end - self.started_at).total_seconds()

    def can_retry(self) -> bool:
        return self.retry_count < self.max_retries and self.status in ("failed", "timeout")

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        for name in ("created_at", "started_at", "completed_at", "timeout_at"):
            if data[name] is not None:
                data[name] = data[name].isoformat()
        return data

    @classmethod
    def from_detail(cls, detail: JobDetail) -> "RemoteJob":
        result = None
        if detail.result is not None:
            result = {
                "content": detail.result.content,
                "metadata": detail.result.metadata,
                "processing_time": detail.result.processing_time or 0.0,
            }
        return cls(
            id=detail.job_id,
            ingestion_task_id=detail.ingestion_task_id,
            source_file_path=detail.source_file_path,
            content_type=detail.content_type,
            task_options=detail.task_options,
            status=detail.status,
            worker_id=detail.worker_id,
            created_at=detail.created_at,
            started_at=detail.started_at,
            completed_at=detail.completed_at,
            error_message=detail.error_message,
            result_data=result,
            retry_count=detail.retry_count,
            timeout_at=detail.execution_deadline if detail.status == "processing" else None,
        )


_shared_clients: Dict[Tuple[int, str, Optional[str]], MoragJobsClient] = {}
_shared_clients_lock = threading.Lock()


def shared_client(base_url: Optional[str] = None, api_key: Optional[str] = None) -> MoragJobsClient:
    """One client (one connection pool) per process and server, so the many short-lived
    ``RemoteJobService()`` objects MoRAG makes reuse connections. Keyed by process id as
    well: a Celery prefork child never uses its parent's sockets."""
    url = base_url or os.environ.get("MORAG_JOBS_URL") or ""
    key = api_key if api_key is not None else (os.environ.get("MORAG_JOBS_API_KEY") or None)
    cache_key = (os.getpid(), url, key)
    with _shared_clients_lock:
        client = _shared_clients.get(cache_key)
        if client is None:
            client = MoragJobsClient(url or None, key)
            _shared_clients[cache_key] = client
        return client


def idempotency_key_for(request: CreateRemoteJobRequest) -> str:
    """A key that is the same whenever the same ingestion task asks for the same file and
    content type: a Celery task that runs again (a retry, a redelivery after a worker
    crash) gets the job it already made instead of a second one."""
    parts = "\x1f".join([request.ingestion_task_id, request.content_type, request.source_file_path])
    return "morag-ingest-" + hashlib.sha256(parts.encode("utf-8")).hexdigest()


def _as_request(request: Any) -> CreateRemoteJobRequest:
    if isinstance(request, CreateRemoteJobRequest):
        return request
    if isinstance(request, Mapping):
        get = request.get
    else:
        # MoRAG's pydantic model, or anything else with the four attributes.
        def get(name: str, default: Any = None) -> Any:
            return getattr(request, name, default)

    return CreateRemoteJobRequest(
        source_file_path=str(get("source_file_path")),
        content_type=str(get("content_type")),
        task_options=dict(get("task_options") or {}),
        ingestion_task_id=str(get("ingestion_task_id")),
    )


class RemoteJobService:
    """MoRAG's ``RemoteJobService``, backed by a morag-jobs server.

    With no arguments it reads ``MORAG_JOBS_URL`` and ``MORAG_JOBS_API_KEY``, like
    MoRAG's ``RemoteJobService()`` needs no arguments.
    """

    def __init__(
        self,
        client: Optional[MoragJobsClient] = None,
        *,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> None:
        self.client = client or shared_client(base_url, api_key)

    def create_job(self, request: Any) -> RemoteJob:
        """Creates the job and returns it as MoRAG's ``RemoteJob`` (status ``pending``).

        Raises :class:`~morag_jobs_client.errors.ValidationError` when the server refuses
        the request (a source outside its allowed roots, say) and
        :class:`~morag_jobs_client.errors.TransportError` when it cannot be reached.
        """
        request = _as_request(request)
        created = self.client.create_job(
            request.source_file_path,
            request.content_type,
            request.ingestion_task_id,
            request.task_options,
            idempotency_key=idempotency_key_for(request),
        )
        return RemoteJob(
            id=created.job_id,
            ingestion_task_id=request.ingestion_task_id,
            source_file_path=request.source_file_path,
            content_type=request.content_type,
            task_options=dict(request.task_options),
            status=created.status,
            created_at=created.created_at,
        )

    def get_job_status(self, job_id: str) -> Optional[RemoteJob]:
        """The job, or None when the server has no such job (MoRAG checks ``if not job``)."""
        try:
            return RemoteJob.from_detail(self.client.get_job(job_id))
        except NotFoundError:
            return None

    def cleanup_old_jobs(self, days_old: int = 7) -> int:
        """Deletes finished jobs older than ``days_old`` days; returns how many went."""
        return self.client.cleanup(days_old=days_old).cleaned_jobs or 0

    def cleanup_expired_jobs(self) -> int:
        """Nothing to do: the server's monitor times out expired jobs by itself, within
        about a second of their deadline. Kept so MoRAG's callers keep working."""
        return 0
