"""A minimal Celery app standing in for MoRAG's ingestion workers.

Its ingest task does what MoRAG's ``ingest_file_task`` does for remote processing: it
creates a remote job through ``RemoteJobService`` (here the drop-in from
``morag_jobs_client.morag``, configured by ``MORAG_JOBS_URL`` and ``MORAG_JOBS_API_KEY``)
and returns at once. morag-jobs later runs one of the two continuation tasks, under
MoRAG's task names, through its Celery sink. Every task appends what it received to a
JSON-lines file, so you (and the test) can see exactly what ran, how often, with what.

Settings (environment):

- ``MORAG_JOBS_URL``, ``MORAG_JOBS_API_KEY``: the morag-jobs server and an admin key;
- ``MORAG_EXAMPLE_BROKER_URL``: the Redis broker (default ``redis://127.0.0.1:6379/0``),
  the same as the server's ``MORAG_CELERY_BROKER_URL``;
- ``MORAG_EXAMPLE_QUEUE``: the queue (default ``celery``), the same as the server's
  ``MORAG_CELERY_QUEUE``;
- ``MORAG_EXAMPLE_RECORD``: the JSON-lines file (default ``ingestion-record.jsonl``);
- ``MORAG_EXAMPLE_RESULT_PREFIX``: a prefix for the result backend's Redis keys (default
  none), so a run can clean up after itself.

Like MoRAG, the app keeps task results in Redis: the continuation finds the remote job id in
the result of the ingest task that created the job, and reads the job back with
``RemoteJobService().get_job_status``, as MoRAG's continuation does.

Run it: ``celery -A ingestion_app worker --pool solo -Q "$MORAG_EXAMPLE_QUEUE"``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from celery import Celery

from morag_jobs_client import ServiceUnavailableError, TransportError
from morag_jobs_client.morag import CreateRemoteJobRequest, RemoteJobService

BROKER_URL = os.environ.get("MORAG_EXAMPLE_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("MORAG_EXAMPLE_QUEUE", "celery")
RECORD_PATH = os.environ.get("MORAG_EXAMPLE_RECORD", "ingestion-record.jsonl")
RESULT_PREFIX = os.environ.get("MORAG_EXAMPLE_RESULT_PREFIX", "")
#: The content types MoRAG hands to remote workers.
REMOTE_CONTENT_TYPES = ("audio", "video")

app = Celery("ingestion_example", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(
    task_default_queue=QUEUE,
    result_backend_transport_options={"global_keyprefix": RESULT_PREFIX} if RESULT_PREFIX else {},
    # morag-jobs sends JSON task messages; accept nothing else.
    accept_content=["json"],
    task_serializer="json",
    # A shared Redis: no remote control keys, no events.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def record(task: str, task_id: Optional[str], args: List[Any]) -> None:
    """Appends one JSON line; one write per line, so lines never interleave."""
    line = json.dumps({"task": task, "task_id": task_id, "args": args})
    with open(RECORD_PATH, "a", encoding="utf-8") as record_file:
        record_file.write(line + "\n")
        record_file.flush()
        os.fsync(record_file.fileno())


# The client already retries for about 8 seconds; a server down for longer (a slow
# restart) makes Celery run the task again later. That is safe: the adapter's
# Idempotency-Key is derived from the task id, so a rerun gets the job the first run made.
@app.task(
    bind=True,
    name="morag.ingest_tasks.ingest_file_task",
    autoretry_for=(TransportError, ServiceUnavailableError),
    retry_backoff=2,
    max_retries=6,
)
def ingest_file_task(
    self: Any, file_path: str, content_type: Optional[str] = None, task_options: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    options = task_options or {}
    if options.get("remote", False) and content_type in REMOTE_CONTENT_TYPES:
        remote_job = RemoteJobService().create_job(
            CreateRemoteJobRequest(
                source_file_path=file_path,
                content_type=content_type,
                task_options=options,
                ingestion_task_id=self.request.id,
            )
        )
        record(self.name, self.request.id, [file_path, content_type, options, {"remote_job_id": remote_job.id}])
        # As MoRAG: return at once; morag-jobs continues the pipeline when the job is done.
        return {
            "success": True,
            "content": "",
            "metadata": {"remote_job_id": remote_job.id, "remote_processing": True, "status": "pending_remote_processing"},
            "processing_time": 0.0,
            "error_message": None,
        }
    # MoRAG would process the file locally here; the example only stands in for the
    # remote path.
    record(self.name, self.request.id, [file_path, content_type, options, {"local": True}])
    return {"success": True, "content": "", "metadata": {"remote_processing": False}, "processing_time": 0.0, "error_message": None}


@app.task(
    bind=True,
    name="morag.ingest_tasks.continue_ingestion_after_remote_processing",
    ignore_result=True,
    max_retries=12,
)
def continue_ingestion_after_remote_processing(
    self: Any, ingestion_task_id: str, processing_result: Dict[str, Any], task_options: Dict[str, Any]
) -> None:
    # The outcome names the ingestion task; the ingest task's result names its remote job.
    ingest = app.AsyncResult(ingestion_task_id)
    if not ingest.ready():
        # With several worker processes, the job can finish before the ingest task that
        # created it has stored its result: come back shortly.
        raise self.retry(countdown=2)
    remote_job_id = ingest.result["metadata"]["remote_job_id"]
    remote_job = RemoteJobService().get_job_status(remote_job_id)
    # MoRAG chunks, embeds and stores processing_result["content"] here.
    read_back = None
    if remote_job is not None:
        read_back = {
            "id": remote_job.id,
            "status": remote_job.status,
            "content_type": remote_job.content_type,
            "source_file_path": remote_job.source_file_path,
            "result_content": (remote_job.result_data or {}).get("content"),
        }
    record(self.name, self.request.id, [ingestion_task_id, processing_result, task_options, read_back])


@app.task(bind=True, name="morag.ingest_tasks.handle_remote_job_failure", ignore_result=True)
def handle_remote_job_failure(self: Any, ingestion_task_id: str, failure_info: Dict[str, Any]) -> None:
    # MoRAG marks the ingestion failed here (or falls back to local processing).
    record(self.name, self.request.id, [ingestion_task_id, failure_info])


@app.task(bind=True, name="ingestion_example.mark", ignore_result=True)
def mark(self: Any, label: str) -> None:
    """Records a label: sent last, it shows that everything queued before it has run."""
    record(self.name, self.request.id, [label])
