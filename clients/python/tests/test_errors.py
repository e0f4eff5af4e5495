"""Every error answer the server gives becomes the matching exception, carrying status
and detail; transient failures of idempotent calls are retried."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any, List

import pytest

from conftest import ADMIN_KEY, MAX_METADATA_BYTES, WORKER_KEY, quick_retries
from morag_jobs_client import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    MoragJobsClient,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    TransportError,
    ValidationError,
)
from morag_jobs_client.errors import error_for_answer
from morag_jobs_processes import ServerProcess, free_port


def test_a_wrong_or_missing_key_is_an_authentication_error(server: ServerProcess) -> None:
    # "" sends no key at all (None would fall back to MORAG_JOBS_API_KEY).
    for key in ("not-a-key", "", WORKER_KEY):
        with MoragJobsClient(server.url, key, retry=quick_retries()) as client:
            with pytest.raises(AuthenticationError) as refused:
                client.list_jobs()
            assert refused.value.status == 401
            assert refused.value.detail == "Invalid or missing API key"
            assert refused.value.headers["www-authenticate"] == "Bearer"


def test_unknown_jobs_are_not_found_and_bad_ids_invalid(admin: MoragJobsClient) -> None:
    missing = str(uuid.uuid4())
    for call in (admin.get_job_status, admin.get_job, admin.cancel_job, admin.retry_job):
        with pytest.raises(NotFoundError) as refused:
            call(missing)
        assert refused.value.status == 404
        assert refused.value.detail == f"Job {missing} not found"
    with pytest.raises(ValidationError) as invalid:
        admin.get_job_status("not a job id")
    assert invalid.value.status == 422 and invalid.value.errors
    # The id is one path segment: it cannot reach another route.
    with pytest.raises((NotFoundError, ValidationError)):
        admin.get_job("../statistics")


def test_downloading_a_job_that_is_not_processing_is_forbidden(
    admin: MoragJobsClient, worker: MoragJobsClient, server: ServerProcess
) -> None:
    task = f"ingest-{uuid.uuid4().hex}"
    created = admin.create_job(server.source_file(f"{task}.bin", b"x"), "forbidden-type", task)
    with pytest.raises(PermissionDeniedError) as refused:
        worker.download(created.job_id)
    assert refused.value.status == 403 and created.job_id in str(refused.value.detail)


def test_invalid_requests_name_their_fields(admin: MoragJobsClient, server: ServerProcess) -> None:
    path = server.source_file("valid.bin", b"x")
    cases = [
        (lambda: admin.create_job(path, "Not A Type!", "task"), "body.content_type"),
        (lambda: admin.create_job("/etc/hostname", "audio", "task"), "body.source_file_path"),
        (lambda: admin.create_job(path, "audio", " "), "body.ingestion_task_id"),
        (lambda: admin.list_jobs(status="lost"), "query.status"),
        (lambda: admin.list_jobs(limit=501), "query.limit"),
        (lambda: admin.cleanup(days_old=-1), "query.days_old"),
    ]
    for call, field in cases:
        with pytest.raises(ValidationError) as invalid:
            call()
        assert invalid.value.status == 422
        assert invalid.value.fields() == [field], invalid.value.detail
        assert field in str(invalid.value)
    with pytest.raises(ValidationError) as outside:
        admin.create_job("/etc/hostname", "audio", "task")
    assert "MORAG_REMOTE_ALLOWED_ROOTS" in outside.value.errors[0]["msg"]


def test_oversized_requests(admin: MoragJobsClient, server: ServerProcess) -> None:
    path = server.source_file("large-options.bin", b"x")
    with pytest.raises(PayloadTooLargeError) as too_large:
        admin.create_job(path, "audio", "task", {"notes": "x" * (MAX_METADATA_BYTES + 1)})
    assert too_large.value.status == 413
    assert "MORAG_REMOTE_MAX_METADATA_BYTES" in str(too_large.value.detail)

    with pytest.raises(RequestTooLargeError) as long_url:
        admin.list_jobs(cursor="9" * 9000)
    assert long_url.value.status == 414

    with MoragJobsClient(server.url, "k" * 40_000, retry=quick_retries()) as huge_key:
        with pytest.raises(RequestTooLargeError) as huge_head:
            huge_key.statistics()
    assert huge_head.value.status == 431


def test_no_server_is_a_transport_error_after_the_retries() -> None:
    sleeps: List[float] = []
    port = free_port()  # Nothing listens there.
    client = MoragJobsClient(f"127.0.0.1:{port}", ADMIN_KEY, retry=RetryPolicy(attempts=3), sleep=sleeps.append)
    with pytest.raises(TransportError) as unreachable:
        client.statistics()
    assert f"127.0.0.1:{port}" in str(unreachable.value)
    assert len(sleeps) == 2, "three tries, two waits"
    assert 0 < sleeps[0] < sleeps[1], "exponential backoff"
    # A refused connection never reached the server: even a non-idempotent call is retried.
    sleeps.clear()
    with pytest.raises(TransportError):
        client.retry_job(str(uuid.uuid4()))
    assert len(sleeps) == 2


def probe_is_refused(port: int, held: List[socket.socket]) -> bool:
    """Opens a connection: a refused one is answered 503 at once; an accepted one stays
    silent and is kept in ``held``, where it takes a slot."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.5)
    try:
        answer = sock.recv(64)
    except socket.timeout:
        held.append(sock)
        return False
    sock.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    return True


def fill_connection_slots(port: int, held: List[socket.socket]) -> None:
    """Holds idle connections until two probes in a row are refused: every slot is ours
    (a connection the server still counted, say the health check's, has gone by then)."""
    deadline = time.monotonic() + 20
    while True:
        if probe_is_refused(port, held):
            time.sleep(0.2)
            if probe_is_refused(port, held):
                return
        assert time.monotonic() < deadline, "the server never refused a connection"


def test_over_the_connection_cap_is_503_and_retried_until_a_slot_frees(tmp_path: Any) -> None:
    server = ServerProcess(tmp_path, args=["--admin-api-keys", ADMIN_KEY, "--http-max-connections", "2"]).start()
    held: List[socket.socket] = []
    try:
        fill_connection_slots(server.port, held)
        assert len(held) >= 2
        sleeps: List[float] = []
        with MoragJobsClient(server.url, ADMIN_KEY, retry=RetryPolicy(attempts=2), sleep=sleeps.append) as client:
            with pytest.raises(ServiceUnavailableError) as unavailable:
                client.statistics()
        assert unavailable.value.status == 503 and isinstance(unavailable.value, ServerError)
        assert unavailable.value.retry_after == 1.0
        assert sleeps and sleeps[0] >= 1.0 - 1e-9, "the wait honours Retry-After"

        def free_the_slots(delay: float) -> None:
            while held:
                held.pop().close()
            time.sleep(0.3)

        with MoragJobsClient(server.url, ADMIN_KEY, retry=RetryPolicy(attempts=3), sleep=free_the_slots) as client:
            fill_connection_slots(server.port, held)
            assert client.statistics().total_jobs == 0
            assert not held, "the call succeeded only after the slots were freed"
    finally:
        for sock in held:
            sock.close()
        server.stop()


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (400, {"detail": "bad"}, BadRequestError),
        (408, {"detail": "the request body did not arrive"}, RequestTimeoutError),
        (418, {"detail": "teapot"}, ApiError),
        (500, {"detail": "internal server error"}, ServerError),
        (502, "<html>bad gateway</html>", ServerError),
    ],
)
def test_statuses_the_server_does_not_give_on_demand_map_too(status: int, body: Any, expected: type) -> None:
    # The server answers these only on failures a test cannot bring about on demand (a
    # body that stalls, an internal error, a proxy in front of it): the mapping is checked
    # directly.
    error = error_for_answer(status, body, {"Retry-After": "2"}, "GET", "/x")
    assert type(error) is expected
    assert error.status == status
    assert error.detail == (body["detail"] if isinstance(body, dict) else body)
    assert str(error).startswith(f"GET /x: {status} ")
