"""Every call of MoragJobsClient against the real server binary."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Dict, List, Tuple

import pytest

from conftest import ADMIN_KEY, WEBHOOK_SECRET, WORKER_KEY, quick_retries
from morag_jobs_client import (
    AuthenticationError,
    ConflictError,
    CreatedJob,
    IdempotencyKeyReusedError,
    MoragJobsClient,
    NotFoundError,
    ValidationError,
    WebhookVerificationError,
    WebhookVerifier,
    WorkerRecord,
)
from morag_jobs_client.client import WORKER_VERSION
from morag_jobs_processes import AnswerDroppingProxy, ServerProcess, free_port


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create(admin: MoragJobsClient, server: ServerProcess, content_type: str, **options: Any) -> CreatedJob:
    task = unique("ingest")
    path = server.source_file(f"{task}.bin", b"source bytes " + task.encode())
    return admin.create_job(path, content_type, task, options)


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_health_answers_healthy(admin: MoragJobsClient) -> None:
    health = admin.health()
    assert health.healthy and health.status == "healthy" and health.store == "ok"
    assert health.timestamp is not None


def test_create_status_detail_and_listing(admin: MoragJobsClient, server: ServerProcess) -> None:
    content_type = unique("type")[:32]
    task = unique("ingest")
    path = server.source_file(f"{task}.mp3", b"fake audio")
    created = admin.create_job(path, content_type, task, {"language": "en", "webhook_url": None})
    assert created.status == "pending" and not created.replayed
    assert created.idempotency_key and created.created_at.tzinfo is not None

    status = admin.get_job_status(created.job_id)
    assert (status.job_id, status.status, status.retry_count) == (created.job_id, "pending", 0)
    assert status.created_at == created.created_at and status.worker_id is None
    assert not status.finished

    detail = admin.get_job(created.job_id)
    assert detail.content_type == content_type and detail.ingestion_task_id == task
    assert detail.source_file_path == path
    assert detail.task_options == {"language": "en", "webhook_url": None}
    assert detail.result is None and detail.deliveries == []
    assert [(h.from_status, h.to_status) for h in detail.history] == [(None, "pending")]

    others = [create(admin, server, content_type) for _ in range(2)]
    page = admin.list_jobs(status="pending", content_type=content_type, limit=2)
    assert len(page.jobs) == 2 and page.next_cursor is not None
    assert page.jobs[0].content_type == content_type
    every = list(admin.iter_jobs(status="pending", content_type=content_type, page_size=1))
    assert sorted(job.job_id for job in every) == sorted([created.job_id] + [o.job_id for o in others])
    assert admin.list_jobs(status="completed", content_type=content_type).jobs == []


def test_a_worker_claims_downloads_heartbeats_and_completes(
    admin: MoragJobsClient, worker: MoragJobsClient, server: ServerProcess
) -> None:
    content_type = unique("w")[:32]
    created = create(admin, server, content_type, chunk_size=2000)
    claimed = worker.poll("py-worker", [content_type])
    assert claimed is not None and claimed.job_id == created.job_id
    assert claimed.task_options == {"chunk_size": 2000} and claimed.lease_id and claimed.attempt == 1
    assert claimed.source_file_url == f"/api/v1/remote-jobs/{created.job_id}/download"
    assert worker.download(claimed).startswith(b"source bytes ")
    assert worker.download(created.job_id) == worker.download(claimed)

    beat = worker.heartbeat(claimed.job_id, claimed.lease_id, progress=40, message="decoding")
    assert beat.status == "processing" and not beat.cancelled and beat.heartbeat_deadline is not None
    processing = admin.get_job(created.job_id)
    assert (processing.progress, processing.progress_message) == (40.0, "decoding")
    assert admin.get_job_status(created.job_id).estimated_completion is not None

    answer = worker.submit_result(
        claimed.job_id, success=True, content="transcript ✓", metadata={"pages": 2},
        processing_time=1.5, lease_id=claimed.lease_id,
    )
    assert answer.status == "completed" and answer.ingestion_continued is False
    done = admin.get_job(created.job_id)
    assert done.status == "completed" and done.worker_id == "py-worker"
    assert done.result is not None
    assert (done.result.content, done.result.metadata, done.result.processing_time) == ("transcript ✓", {"pages": 2}, 1.5)
    assert worker.poll("py-worker", [content_type]) is None
    assert worker.poll("py-worker", [content_type], wait=0.2) is None

    # A second result for the same attempt is refused and changes nothing.
    with pytest.raises(ConflictError) as refused:
        worker.submit_result(claimed.job_id, success=False, error_message="late", lease_id=claimed.lease_id)
    assert refused.value.status == 409 and refused.value.current_status == "completed"


def test_release_cancel_and_retry(admin: MoragJobsClient, worker: MoragJobsClient, server: ServerProcess) -> None:
    content_type = unique("r")[:32]
    released = create(admin, server, content_type)
    claimed = worker.poll("py-worker", [content_type])
    assert claimed is not None and claimed.lease_id
    assert worker.release(claimed.job_id, claimed.lease_id, reason="shutting down").status == "pending"
    with pytest.raises(ConflictError):
        worker.heartbeat(claimed.job_id, claimed.lease_id)

    cancelled = admin.cancel_job(released.job_id, reason="no longer needed")
    assert cancelled.status == "cancelled" and cancelled.completed_at is not None
    with pytest.raises(ConflictError) as again:
        admin.cancel_job(released.job_id)
    assert again.value.current_status == "cancelled"
    with pytest.raises(ConflictError) as refused:
        admin.retry_job(released.job_id)
    assert refused.value.current_status == "cancelled"
    assert "only failed or timed-out jobs can be retried" in str(refused.value.detail)

    failing = create(admin, server, content_type)
    claimed = worker.poll("py-worker", [content_type])
    assert claimed is not None and claimed.job_id == failing.job_id
    answer = worker.submit_result(failing.job_id, success=False, error_message="corrupt file",
                                  lease_id=claimed.lease_id, retryable=False)
    assert answer.status == "failed"
    failed = admin.get_job_status(failing.job_id)
    assert failed.status == "failed" and failed.error_message == "corrupt file"
    # A manual retry makes the job due again at once.
    assert admin.retry_job(failing.job_id).status in ("pending", "retrying")
    again = worker.poll("py-worker", [content_type])
    assert again is not None and again.job_id == failing.job_id and again.attempt == 2


def test_statistics(admin: MoragJobsClient, server: ServerProcess) -> None:
    before = admin.statistics()
    content_type = unique("s")[:32]
    create(admin, server, content_type)
    after = admin.statistics()
    assert after.total_jobs == before.total_jobs + 1
    assert after.content_type_counts[content_type] == 1
    assert after.status_counts["pending"] == before.status_counts["pending"] + 1
    assert set(after.status_counts) >= {"pending", "processing", "completed", "failed", "timeout", "cancelled", "retrying"}
    assert after.recent_jobs_24h >= 1 and after.timestamp.tzinfo is not None
    assert after.storage_size_mb >= 0


def test_the_worker_registry_lists_identified_and_morag_style_workers(
    admin: MoragJobsClient, worker: MoragJobsClient, server: ServerProcess
) -> None:
    audio, video = unique("wa")[:32], unique("wv")[:32]
    audio_job = create(admin, server, audio)
    video_job = create(admin, server, video)

    # A worker that names itself in the registry's headers: heartbeats and results are
    # counted for it, and this process start is a record of its own.
    identified_id = unique("py-identified")
    with MoragJobsClient(server.url, WORKER_KEY, retry=quick_retries(), worker_id=identified_id) as identified:
        assert identified.worker_instance
        claimed = identified.poll(identified_id, [audio])
        assert claimed is not None and claimed.job_id == audio_job.job_id and claimed.lease_id
        identified.heartbeat(claimed.job_id, claimed.lease_id, progress=50)
        identified.submit_result(claimed.job_id, success=True, content="text", lease_id=claimed.lease_id)
        instance = identified.worker_instance

    # A worker like MoRAG's remote-converter: no registry headers, no lease; its result is
    # counted for the job's worker.
    morag_id = unique("morag-style")
    claimed = worker.poll(morag_id, [video])
    assert claimed is not None and claimed.job_id == video_job.job_id
    worker.submit_result(claimed.job_id, success=False, error_message="cannot decode", retryable=False)

    listing = admin.workers()
    by_id: Dict[str, List[WorkerRecord]] = {}
    for record in listing.workers:
        by_id.setdefault(record.worker_id, []).append(record)
    [mine] = by_id[identified_id]
    assert (mine.instance, mine.version, mine.content_types) == (instance, WORKER_VERSION, [audio])
    assert mine.healthy and mine.status == "healthy" and mine.address == "127.0.0.1"
    assert (mine.jobs_in_flight, mine.completed, mine.failed, mine.sends_heartbeats) == (0, 1, 0, True)
    assert mine.first_seen_at <= mine.last_seen_at <= listing.timestamp
    # A poll without ``wait`` counts as ten seconds; three of them are allowed.
    assert (mine.poll_wait_seconds, mine.stale_after_seconds) == (0.0, 30.0)
    assert 0 <= mine.seconds_since_last_seen < mine.stale_after_seconds

    [morag] = by_id[morag_id]
    assert morag.instance is None and morag.content_types == [video] and morag.healthy
    assert morag.version is not None and morag.version.startswith("python-httpx/"), "the User-Agent stands in"
    assert (morag.jobs_in_flight, morag.completed, morag.failed, morag.sends_heartbeats) == (0, 0, 1, False)
    # Most recently seen first.
    assert listing.workers.index(morag) < listing.workers.index(mine)
    assert listing.healthy + listing.stale == len(listing.workers)
    assert listing.healthy == sum(record.healthy for record in listing.workers) >= 2

    workers = admin.statistics().workers
    assert workers.healthy_by_content_type[audio] == workers.healthy_by_content_type[video] == 1
    assert workers.healthy >= 2 and workers.stale >= 0

    # The listing is an admin call.
    with pytest.raises(AuthenticationError):
        worker.workers()


def test_an_invalid_worker_id_header_is_refused(server: ServerProcess) -> None:
    with MoragJobsClient(server.url, WORKER_KEY, retry=quick_retries(), worker_id="x" * 129) as too_long:
        with pytest.raises(ValidationError) as refused:
            too_long.poll("fine", [])
    assert refused.value.status == 422 and "header.x-morag-worker-id" in refused.value.fields()


def test_idempotent_creates_make_one_job(admin: MoragJobsClient, server: ServerProcess) -> None:
    task = unique("ingest")
    path = server.source_file(f"{task}.wav", b"audio")
    key = unique("key")
    first = admin.create_job(path, "audio", task, {"language": "de"}, idempotency_key=key)
    repeat = admin.create_job(path, "audio", task, {"language": "de"}, idempotency_key=key)
    assert not first.replayed and repeat.replayed
    assert (repeat.job_id, repeat.created_at, repeat.idempotency_key) == (first.job_id, first.created_at, key)

    with pytest.raises(IdempotencyKeyReusedError) as reused:
        admin.create_job(path, "audio", task, {"language": "fr"}, idempotency_key=key)
    assert reused.value.status == 422 and "header.Idempotency-Key" in reused.value.fields()

    # Without a key of the caller's, a repeat of an unfinished job's ingestion task, file
    # and type is answered with that job (the server's MORAG_CREATE_MATCH_UNFINISHED).
    unkeyed = admin.create_job(path, "audio", task, {"language": "de"})
    assert unkeyed.replayed and unkeyed.job_id == first.job_id and unkeyed.idempotency_key != key


def test_a_create_whose_answer_was_lost_is_retried_with_the_same_key(server: ServerProcess) -> None:
    proxy = AnswerDroppingProxy(server.port, drop=1)
    try:
        with MoragJobsClient(proxy.url, ADMIN_KEY, retry=quick_retries()) as through_proxy:
            task = unique("ingest")
            path = server.source_file(f"{task}.wav", b"audio")
            created = through_proxy.create_job(path, "audio", task)
            assert proxy.connections == 2, "the first answer was lost, the second try got one"
            assert created.replayed, "the retry was answered with the job the first try made"
            with MoragJobsClient(server.url, ADMIN_KEY) as direct:
                jobs = [job for job in direct.iter_jobs(content_type="audio") if job.ingestion_task_id == task]
            assert [job.job_id for job in jobs] == [created.job_id]
    finally:
        proxy.close()


def test_cleanup_counts_and_deletes_finished_jobs(tmp_path: Any) -> None:
    # The monitor's cleanup every second, so its first pass shows in the statistics soon
    # (it deletes nothing here: the retention is days).
    server = ServerProcess(tmp_path, args=["--admin-api-keys", ADMIN_KEY, "--cleanup-interval", "1"]).start()
    try:
        with MoragJobsClient(server.url, ADMIN_KEY, retry=quick_retries()) as admin:
            finished = create(admin, server, "audio")
            admin.cancel_job(finished.job_id)
            unfinished = create(admin, server, "audio")
            dry = admin.cleanup(days_old=0, dry_run=True)
            assert (dry.dry_run, dry.would_clean_jobs, dry.cleaned_jobs, dry.days_old) == (True, 1, None, 0)
            assert admin.get_job_status(finished.job_id).status == "cancelled"
            assert admin.cleanup(days_old=30).cleaned_jobs == 0
            done = admin.cleanup(days_old=0)
            assert (done.dry_run, done.cleaned_jobs, done.would_clean_jobs) == (False, 1, None)
            with pytest.raises(NotFoundError):
                admin.get_job(finished.job_id)
            assert admin.get_job_status(unfinished.job_id).status == "pending"

            last_pass = wait_until(lambda: admin.statistics().cleanup, what="the monitor's first cleanup pass")
            assert last_pass.keeping_up and last_pass.passes_behind == 0 and last_pass.jobs_deleted == 0
            assert 0 < last_pass.store_share_allowed <= 0.3 and 0 <= last_pass.store_busy_share <= 1
            assert last_pass.seconds >= 0 and last_pass.released_mb >= 0
            assert last_pass.finished_at <= admin.statistics().timestamp
    finally:
        server.stop()


class _Receiver:
    """A webhook receiver on a loopback port that verifies every delivery with the
    package's verifier and answers 401 to one that does not verify; `gone_url` answers
    410 Gone, which dead-letters a delivery at once."""

    def __init__(self, verifier: WebhookVerifier) -> None:
        received: List[Tuple[Dict[str, str], Any]] = []
        refused: List[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/gone":
                    self.send_response(410)
                    self.end_headers()
                    return
                try:
                    event = verifier.verify(body, dict(self.headers))
                except WebhookVerificationError as error:
                    refused.append(str(error))
                    self.send_response(401)
                else:
                    received.append((dict(self.headers), event))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.refused = refused
        self.http = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        self.gone_url = f"http://127.0.0.1:{self.http.server_address[1]}/gone"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_deliveries_list_show_and_redrive_and_signatures_verify(
    admin: MoragJobsClient, worker: MoragJobsClient, server: ServerProcess
) -> None:
    receiver = _Receiver(WebhookVerifier(WEBHOOK_SECRET))
    try:
        content_type = unique("d")[:32]
        delivered_job = create(admin, server, content_type, webhook_url=receiver.url)
        # A receiver answering 410 Gone dead-letters its delivery at once.
        dead_job = create(admin, server, content_type, webhook_url=receiver.gone_url)
        for _ in range(2):
            claimed = worker.poll("py-worker", [content_type])
            assert claimed is not None
            worker.submit_result(claimed.job_id, success=True, content="text", lease_id=claimed.lease_id)

        delivered = wait_until(
            lambda: admin.list_deliveries(job_id=delivered_job.job_id, state="delivered").deliveries,
            what="the webhook delivery",
        )
        assert len(delivered) == 1 and delivered[0].sink == "webhook" and delivered[0].delivered_at
        headers, event = receiver.received[0]
        assert receiver.refused == []
        assert headers["webhook-id"] == delivered[0].event_id
        assert event["task_id"] == admin.get_job(delivered_job.job_id).ingestion_task_id
        assert event["status"] == "SUCCESS" and event["result"]["content"] == "text"
        with pytest.raises(ConflictError) as not_dead:
            admin.redrive_delivery(delivered[0].id)
        assert "only a dead delivery can be redriven" in str(not_dead.value.detail)

        dead = wait_until(
            lambda: admin.list_deliveries(job_id=dead_job.job_id, state="dead").deliveries,
            what="the dead delivery",
        )
        detail = admin.get_delivery(dead[0].id)
        assert detail.state == "dead" and detail.attempts and detail.attempts[-1].outcome
        assert detail.attempts[-1].http_status == 410
        redriven = admin.redrive_delivery(dead[0].id)
        assert (redriven.id, redriven.state, redriven.attempt_count) == (dead[0].id, "pending", 0)

        page = admin.list_deliveries(sink="webhook", limit=1)
        assert len(page.deliveries) == 1 and page.next_cursor is not None
        ours = {d.job_id for d in admin.iter_deliveries(sink="webhook", page_size=1)}
        assert {delivered_job.job_id, dead_job.job_id} <= ours
        assert [d.id for d in admin.get_job(delivered_job.job_id).deliveries] == [delivered[0].id]
        stats = admin.statistics()
        assert "webhook" in stats.deliveries.per_sink

        with pytest.raises(NotFoundError) as missing:
            admin.get_delivery(987654321)
        assert missing.value.detail == "Delivery 987654321 not found"
        with pytest.raises(ValidationError) as bad_state:
            admin.list_deliveries(state="lost")
        assert bad_state.value.fields() == ["query.state"]

        # A receiver refuses a delivery signed with another secret.
        stranger = WebhookVerifier("whsec_" + "c2VjcmV0LW9mLXNvbWVvbmUtZWxzZQ==")
        with pytest.raises(WebhookVerificationError):
            headers, _ = receiver.received[0]
            stranger.verify(json.dumps(event).encode(), headers)
    finally:
        receiver.close()
