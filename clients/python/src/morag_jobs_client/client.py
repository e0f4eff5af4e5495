"""A typed, synchronous client for every endpoint of a morag-jobs server.

Retries: a request that certainly never reached the server (the connection was refused)
is always tried again. A request that may have reached it (a timeout, a dropped
connection, a 502/503/504 answer) is tried again only when repeating it cannot do harm:
reads, heartbeats, cleanups, and creates, which always carry an ``Idempotency-Key`` (the same
key on every try, so a create whose answer was lost is answered with the job it made).
Retries wait with exponential backoff and jitter, and at least the server's
``Retry-After``.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import httpx

from . import errors
from .models import (
    CleanupResult,
    ClaimedJob,
    CreatedJob,
    Delivery,
    DeliveryDetail,
    DeliveryPage,
    Health,
    HeartbeatAnswer,
    JobDetail,
    JobPage,
    JobStatus,
    JobSummary,
    Statistics,
    SubmitAnswer,
    WorkerList,
)

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:8700"
JOBS_PATH = "/api/v1/remote-jobs"
DELIVERIES_PATH = "/api/v1/deliveries"
WORKERS_PATH = "/api/v1/workers"
#: The worker registry's headers (the server's ``morag_jobs_client::wire`` names them too).
WORKER_ID_HEADER = "X-Morag-Worker-Id"
WORKER_INSTANCE_HEADER = "X-Morag-Worker-Instance"
WORKER_VERSION_HEADER = "X-Morag-Worker-Version"
#: What a worker using this package reports as its version.
WORKER_VERSION = f"morag-jobs-client-python/{__version__}"
#: Statuses that mean "try again later" rather than "this request is wrong".
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

T = TypeVar("T")


def normalize_base_url(url: str) -> str:
    """``host:port`` or a full URL, without the trailing slash; ``http://`` when no scheme."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class RetryPolicy:
    """How often and how patiently calls are retried.

    ``attempts`` counts the first try; the default waits about 8 seconds in all, enough
    to ride out a server restart. The delay before try n+1 is
    ``min(backoff_base * 2**(n-1), backoff_max)``, less a random part of up to a quarter
    (so many clients that failed together do not come back together), and at least the
    server's ``Retry-After`` (capped at ``backoff_max``).
    """

    def __init__(self, attempts: int = 6, backoff_base: float = 0.25, backoff_max: float = 5.0) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max

    def delay(self, tries_made: int, retry_after: Optional[float] = None) -> float:
        delay: float = min(self.backoff_base * (2.0 ** (tries_made - 1)), self.backoff_max)
        delay -= random.uniform(0, delay / 4)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay


class MoragJobsClient:
    """One server, one API key, one pooled HTTP connection set; safe to share between threads.

    ``base_url`` defaults to ``MORAG_JOBS_URL`` (else ``http://127.0.0.1:8700``),
    ``api_key`` to ``MORAG_JOBS_API_KEY`` (admin calls need an admin key, worker calls a
    worker or admin key; ``""`` sends none). Use it as a context manager, or call :meth:`close`.

    A worker passes ``worker_id``: every request then carries the worker registry's headers
    (``X-Morag-Worker-Id``, ``X-Morag-Worker-Instance`` with ``worker_instance``, a fresh
    UUID per client, and ``X-Morag-Worker-Version``), so the server counts its heartbeats
    and results for it and lists each process start as a record of its own
    (:meth:`workers`). Without it the client calls like MoRAG's remote-converter: the
    registry knows the worker only by its polls' ``worker_id``.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 30.0,
        retry: Optional[RetryPolicy] = None,
        http_client: Optional[httpx.Client] = None,
        sleep: Callable[[float], None] = time.sleep,
        worker_id: Optional[str] = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url or os.environ.get("MORAG_JOBS_URL") or DEFAULT_URL)
        if api_key is None:
            api_key = os.environ.get("MORAG_JOBS_API_KEY") or None
        self._api_key = api_key
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)
        self.worker_id = worker_id
        self.worker_instance: Optional[str] = str(uuid.uuid4()) if worker_id is not None else None

    def __repr__(self) -> str:
        # The key is a secret: never part of a representation that may reach a log.
        return f"MoragJobsClient({self.base_url!r}, api_key={'***' if self._api_key else None})"

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "MoragJobsClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- The ingestion side -----------------------------------------------------------

    def create_job(
        self,
        source_file_path: str,
        content_type: str,
        ingestion_task_id: str,
        task_options: Optional[Mapping[str, Any]] = None,
        *,
        idempotency_key: Optional[str] = None,
    ) -> CreatedJob:
        """Creates a job for a file the server can read (inside its allowed roots).

        Every create carries an ``Idempotency-Key`` (a fresh UUID unless one is given), the
        same on every retry, so a create whose answer was lost never makes a second job.
        Pass your own key to make a repeat of the whole call (say, a re-run task) answer
        with the original job; the same key with a different request raises
        :class:`~morag_jobs_client.errors.IdempotencyKeyReusedError`.
        """
        key = idempotency_key or f"morag-jobs-client-{uuid.uuid4()}"
        body = {
            "source_file_path": str(source_file_path),
            "content_type": content_type,
            "task_options": dict(task_options or {}),
            "ingestion_task_id": ingestion_task_id,
        }
        response = self._request(
            "POST", f"{JOBS_PATH}/", json=body, headers={"Idempotency-Key": key}, idempotent=True
        )
        replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
        return CreatedJob.from_json(self._json(response), replayed=replayed, idempotency_key=key)

    def get_job_status(self, job_id: str) -> JobStatus:
        """MoRAG's status fields (no result content)."""
        return JobStatus.from_json(self._get(f"{JOBS_PATH}/{_segment(job_id)}/status"))

    def get_job(self, job_id: str) -> JobDetail:
        """Everything about a job: options, deadlines, result, history and deliveries."""
        return JobDetail.from_json(self._get(f"{JOBS_PATH}/{_segment(job_id)}"))

    def list_jobs(
        self,
        status: Optional[str] = None,
        content_type: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> JobPage:
        """One page of jobs, newest first; pass ``next_cursor`` back for the next page."""
        data = self._get(
            JOBS_PATH,
            params=_params(status=status, content_type=content_type, limit=limit, cursor=cursor),
        )
        return JobPage(
            jobs=[JobSummary.from_json(job) for job in data.get("jobs") or []],
            next_cursor=data.get("next_cursor"),
        )

    def iter_jobs(
        self, status: Optional[str] = None, content_type: Optional[str] = None, page_size: int = 100
    ) -> Iterator[JobSummary]:
        """Every job matching the filters, page by page."""
        return _paginate(lambda cursor: self.list_jobs(status, content_type, page_size, cursor), "jobs")

    def cancel_job(self, job_id: str, reason: Optional[str] = None) -> JobStatus:
        """Cancels a job. A job that completed, failed or timed out keeps its outcome (the
        server records the cancellation in its history and hands nothing off again); a job
        already cancelled raises :class:`~morag_jobs_client.errors.ConflictError`, which is
        why a cancel whose answer was lost is not sent again."""
        body = {"reason": reason} if reason is not None else {}
        response = self._request("POST", f"{JOBS_PATH}/{_segment(job_id)}/cancel", json=body, idempotent=False)
        return JobStatus.from_json(self._json(response))

    def retry_job(self, job_id: str) -> JobStatus:
        """Makes a failed or timed-out job pending again (409 otherwise)."""
        response = self._request("POST", f"{JOBS_PATH}/{_segment(job_id)}/retry", idempotent=False)
        return JobStatus.from_json(self._json(response))

    def statistics(self) -> Statistics:
        return Statistics.from_json(self._get(f"{JOBS_PATH}/statistics"))

    def cleanup(self, days_old: Optional[int] = None, dry_run: bool = False) -> CleanupResult:
        """Deletes finished jobs older than ``days_old`` days (the server's default: 7);
        with ``dry_run`` only counts them."""
        params = _params(days_old=days_old, dry_run="true" if dry_run else None)
        response = self._request("POST", f"{JOBS_PATH}/cleanup", params=params, idempotent=True)
        return CleanupResult.from_json(self._json(response))

    def workers(self) -> WorkerList:
        """The worker registry: one record per worker process, most recently seen first,
        each judged healthy or stale (admin key)."""
        return WorkerList.from_json(self._get(WORKERS_PATH))

    # --- Deliveries --------------------------------------------------------------------

    def list_deliveries(
        self,
        state: Optional[str] = None,
        sink: Optional[str] = None,
        job_id: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> DeliveryPage:
        """One page of deliveries; ``state`` is pending, delivered or dead, ``sink`` webhook,
        ingestion_callback or celery."""
        data = self._get(
            DELIVERIES_PATH,
            params=_params(state=state, sink=sink, job_id=job_id, limit=limit, cursor=cursor),
        )
        return DeliveryPage(
            deliveries=[Delivery.from_json(d) for d in data.get("deliveries") or []],
            next_cursor=data.get("next_cursor"),
        )

    def iter_deliveries(
        self,
        state: Optional[str] = None,
        sink: Optional[str] = None,
        job_id: Optional[str] = None,
        page_size: int = 100,
    ) -> Iterator[Delivery]:
        return _paginate(
            lambda cursor: self.list_deliveries(state, sink, job_id, page_size, cursor), "deliveries"
        )

    def get_delivery(self, delivery_id: int) -> DeliveryDetail:
        """A delivery with its attempts log."""
        return DeliveryDetail.from_json(self._get(f"{DELIVERIES_PATH}/{int(delivery_id)}"))

    def redrive_delivery(self, delivery_id: int) -> Delivery:
        """Makes a dead delivery pending again with a fresh attempt budget (409 unless dead)."""
        response = self._request("POST", f"{DELIVERIES_PATH}/{int(delivery_id)}/redrive", idempotent=False)
        return Delivery.from_json(self._json(response))

    # --- Health and the worker protocol ------------------------------------------------

    def health(self) -> Health:
        """The server's health; ``healthy`` is false (not an exception) while its store
        cannot write."""
        response = self._request("GET", "/health", idempotent=True, accept_statuses=(503,))
        return Health.from_json(self._json(response), response.status_code)

    def poll(
        self,
        worker_id: str,
        content_types: Iterable[str] = (),
        *,
        wait: Optional[float] = None,
    ) -> Optional[ClaimedJob]:
        """Claims the oldest due job of the given types (any type when empty), or returns
        None; ``wait`` (up to 30 s) long-polls for one.

        Not retried once sent: a poll whose answer was lost may have claimed a job, which
        then runs into its execution timeout and is retried by the server.
        """
        params = _params(
            worker_id=worker_id,
            content_types=",".join(content_types) or None,
            max_jobs=1,
            wait=None if wait is None else f"{wait:g}",
        )
        # A long poll may take its whole wait before the answer starts.
        timeout = None if wait is None else (self._http.timeout.read or 30.0) + wait
        response = self._request(
            "GET", f"{JOBS_PATH}/poll", params=params, idempotent=False, timeout=timeout
        )
        data = self._json(response)
        if not data or data.get("job_id") is None:
            return None
        return ClaimedJob.from_json(data)

    def download(self, job: Union[ClaimedJob, str]) -> bytes:
        """The source file of a job this worker is processing (403 otherwise)."""
        path = job.source_file_url if isinstance(job, ClaimedJob) else f"{JOBS_PATH}/{_segment(job)}/download"
        return self._request("GET", path, idempotent=True).content

    def heartbeat(
        self, job_id: str, lease_id: str, progress: Optional[float] = None, message: Optional[str] = None
    ) -> HeartbeatAnswer:
        body: Dict[str, Any] = {"lease_id": lease_id}
        if progress is not None:
            body["progress"] = progress
        if message is not None:
            body["message"] = message
        # A heartbeat only moves deadlines: sending it twice does no harm.
        response = self._request("POST", f"{JOBS_PATH}/{_segment(job_id)}/heartbeat", json=body, idempotent=True)
        return HeartbeatAnswer.from_json(self._json(response))

    def submit_result(
        self,
        job_id: str,
        *,
        success: bool,
        content: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        processing_time: Optional[float] = None,
        error_message: Optional[str] = None,
        lease_id: Optional[str] = None,
        retryable: Optional[bool] = None,
    ) -> SubmitAnswer:
        """Submits a success (content, metadata) or a failure (error_message); with
        ``retryable=False`` a failure is final at once."""
        body: Dict[str, Any] = {"success": success}
        if success:
            body.update(content=content or "", metadata=dict(metadata or {}))
            if processing_time is not None:
                body["processing_time"] = processing_time
        else:
            body["error_message"] = error_message or "failed"
        if lease_id is not None:
            body["lease_id"] = lease_id
        if retryable is not None:
            body["retryable"] = retryable
        # A repeated result for the same attempt is refused (409), so a lost answer is not
        # retried blindly: the caller can read the job's status instead.
        response = self._request("PUT", f"{JOBS_PATH}/{_segment(job_id)}/result", json=body, idempotent=False)
        return SubmitAnswer.from_json(self._json(response))

    def release(self, job_id: str, lease_id: str, reason: Optional[str] = None) -> JobStatus:
        """Hands a claimed job back (pending again at once, no retry counted)."""
        body: Dict[str, Any] = {"lease_id": lease_id}
        if reason is not None:
            body["reason"] = reason
        response = self._request("POST", f"{JOBS_PATH}/{_segment(job_id)}/release", json=body, idempotent=False)
        return JobStatus.from_json(self._json(response))

    # --- Plumbing ----------------------------------------------------------------------

    def _get(self, path: str, params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        return self._json(self._request("GET", path, params=params, idempotent=True))

    def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Optional[Mapping[str, Any]] = None,
        json: Any = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        accept_statuses: Sequence[int] = (),
    ) -> httpx.Response:
        """Sends one request with retries; returns a 2xx answer (or one of
        ``accept_statuses``), raises :class:`errors.ApiError` for an error answer and
        :class:`errors.TransportError` when no answer came."""
        all_headers = {"Accept": "application/json"}
        if self._api_key:
            all_headers["Authorization"] = f"Bearer {self._api_key}"
        if self.worker_id is not None and self.worker_instance is not None:
            all_headers[WORKER_ID_HEADER] = self.worker_id
            all_headers[WORKER_INSTANCE_HEADER] = self.worker_instance
            all_headers[WORKER_VERSION_HEADER] = WORKER_VERSION
        all_headers.update(headers or {})
        url = self.base_url + path
        extra: Dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = timeout
        tries = 0
        while True:
            tries += 1
            last_try = tries >= self.retry.attempts
            try:
                response = self._http.request(method, url, params=params, json=json, headers=all_headers, **extra)
            except httpx.TransportError as error:
                # A refused connection never reached the server: safe to repeat anything.
                never_sent = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout))
                if last_try or not (never_sent or idempotent):
                    raise errors.TransportError(
                        f"{method} {path}: no answer from {self.base_url} ({type(error).__name__}: {error})",
                        cause=error,
                    ) from error
                self._sleep(self.retry.delay(tries))
                continue
            status = response.status_code
            if 200 <= status < 300 or status in accept_statuses:
                return response
            if idempotent and status in RETRYABLE_STATUSES and not last_try:
                self._sleep(self.retry.delay(tries, errors.parse_retry_after(response.headers.get("retry-after"))))
                continue
            raise errors.error_for_answer(status, _decode(response), response.headers, method=method, path=path)

    @staticmethod
    def _json(response: httpx.Response) -> Dict[str, Any]:
        data = _decode(response)
        if not isinstance(data, dict):
            raise errors.MoragJobsError(
                f"expected a JSON object from {response.request.method} {response.request.url.path}, got {data!r:.200}"
            )
        return data


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _params(**values: Any) -> Dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _segment(value: str) -> str:
    """A path segment, percent-encoded, so an id can never change the route."""
    from urllib.parse import quote

    return quote(str(value), safe="")


def _paginate(fetch: Callable[[Optional[str]], Any], field: str) -> Iterator[Any]:
    cursor: Optional[str] = None
    while True:
        page = fetch(cursor)
        yield from getattr(page, field)
        cursor = page.next_cursor
        if not cursor:
            return
