"""The drop-in RemoteJobService against the real server: MoRAG's two calls, configured by
MORAG_JOBS_URL and MORAG_JOBS_API_KEY alone."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from conftest import ADMIN_KEY
from morag_jobs_client import MoragJobsClient
from morag_jobs_client.morag import CreateRemoteJobRequest, RemoteJob, RemoteJobService
from morag_jobs_processes import ServerProcess


@pytest.fixture
def service(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> RemoteJobService:
    monkeypatch.setenv("MORAG_JOBS_URL", server.url.replace("http://", ""))
    monkeypatch.setenv("MORAG_JOBS_API_KEY", ADMIN_KEY)
    return RemoteJobService()


def test_create_job_answers_like_morags_service(service: RemoteJobService, server: ServerProcess) -> None:
    task = f"celery-{uuid.uuid4()}"
    path = server.source_file(f"{task}.mp3", b"audio")
    request = CreateRemoteJobRequest(source_file_path=path, content_type="audio",
                                     task_options={"remote": True, "language": "en"}, ingestion_task_id=task)
    job = service.create_job(request)
    assert isinstance(job, RemoteJob)
    assert job.status == "pending" and job.created_at is not None and job.id
    assert (job.ingestion_task_id, job.source_file_path, job.content_type) == (task, path, "audio")
    assert job.task_options == {"remote": True, "language": "en"}

    # The same ingestion task asking again (a Celery retry) gets the same job, whether the
    # request is this package's dataclass, MoRAG's pydantic model or a mapping.
    as_pydantic = SimpleNamespace(**vars(request))
    assert service.create_job(as_pydantic).id == job.id
    assert service.create_job(dict(vars(request))).id == job.id
    assert RemoteJobService().create_job(request).id == job.id


def test_get_job_status_reads_the_job_back(service: RemoteJobService, server: ServerProcess) -> None:
    task = f"celery-{uuid.uuid4()}"
    content_type = f"adapter{uuid.uuid4().hex[:8]}"
    path = server.source_file(f"{task}.mp4", b"video")
    job = service.create_job(CreateRemoteJobRequest(path, content_type, {"chunk_size": 4000}, task))
    pending = service.get_job_status(job.id)
    assert pending is not None and pending.status == "pending" and pending.result_data is None
    assert (pending.ingestion_task_id, pending.source_file_path, pending.task_options) == (task, path, {"chunk_size": 4000})

    with MoragJobsClient(server.url, ADMIN_KEY) as worker:
        claimed = worker.poll("adapter-worker", [content_type])
        assert claimed is not None and claimed.job_id == job.id
        running = service.get_job_status(job.id)
        assert running is not None and running.status == "processing" and running.timeout_at is not None
        assert running.worker_id == "adapter-worker" and running.processing_duration >= 0
        worker.submit_result(job.id, success=True, content="transcript", metadata={"model": "x"},
                             processing_time=2.0, lease_id=claimed.lease_id)
    done = service.get_job_status(job.id)
    assert done is not None and done.is_finished and done.status == "completed"
    assert done.result_data == {"content": "transcript", "metadata": {"model": "x"}, "processing_time": 2.0}
    assert done.to_dict()["completed_at"].endswith("+00:00")
    assert service.get_job_status(str(uuid.uuid4())) is None
    assert service.cleanup_expired_jobs() == 0
