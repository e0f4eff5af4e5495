"""Fixtures: a real morag-jobs server (the binary in MORAG_JOBS_BIN) with an admin and a
worker key, and clients for both roles."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]
# The package from this checkout and the process helpers, also when run by hand.
for path in (REPOSITORY / "clients/python/src", REPOSITORY / "tests/python"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from morag_jobs_client import MoragJobsClient, RetryPolicy  # noqa: E402
from morag_jobs_processes import ServerProcess  # noqa: E402

ADMIN_KEY = "admin-key-for-tests"
WORKER_KEY = "worker-key-for-tests"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#: Task options above this many bytes are refused with 413 (kept small so the test is cheap).
MAX_METADATA_BYTES = 64 * 1024


def quick_retries(attempts: int = 3) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, backoff_base=0.05, backoff_max=0.2)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("server"),
        args=[
            "--admin-api-keys", ADMIN_KEY,
            "--worker-api-keys", WORKER_KEY,
            "--max-metadata-bytes", str(MAX_METADATA_BYTES),
            "--webhook-secret", WEBHOOK_SECRET,
            # One attempt per delivery, so the deliveries test gets a dead one at once.
            "--delivery-max-attempts", "1",
            "--max-retries", "1",
            "--delivery-poll-interval-ms", "200",
        ],
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def admin(server: ServerProcess) -> Iterator[MoragJobsClient]:
    with MoragJobsClient(server.url, ADMIN_KEY, retry=quick_retries()) as client:
        yield client


@pytest.fixture(scope="session")
def worker(server: ServerProcess) -> Iterator[MoragJobsClient]:
    with MoragJobsClient(server.url, WORKER_KEY, retry=quick_retries()) as client:
        yield client
