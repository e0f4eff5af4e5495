"""The server's answers as typed, immutable objects.

Field names are the server's JSON names (MoRAG's own names where the protocol has them),
timestamps are timezone-aware ``datetime`` objects in UTC. Fields the server adds in later
versions are ignored, so a newer server never breaks an older client.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional

Json = Dict[str, Any]

#: Every job status the server knows, in the order its documentation lists them.
JOB_STATUSES = ("pending", "processing", "completed", "failed", "timeout", "cancelled", "retrying")
#: Statuses a job never leaves by itself (an admin may still retry a failed or timed-out job).
FINISHED_STATUSES = frozenset({"completed", "failed", "timeout", "cancelled"})


def parse_timestamp(value: Any) -> Optional[datetime]:
    """RFC 3339 (what the server writes, ``...Z``) or MoRAG's naive UTC, as aware UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        text = str(value).strip()
        # Python before 3.11 does not read the "Z" suffix.
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _required_timestamp(value: Any) -> datetime:
    parsed = parse_timestamp(value)
    if parsed is None:
        raise ValueError("a required timestamp is missing")
    return parsed


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


@dataclass(frozen=True)
class CreatedJob:
    """The answer to a create: ``replayed`` is true when the server answered a repeat
    (the same ``Idempotency-Key``, or an unfinished job of the same ingestion task) with
    an existing job instead of making a new one."""

    job_id: str
    status: str
    created_at: datetime
    replayed: bool
    idempotency_key: Optional[str]

    @classmethod
    def from_json(cls, data: Json, replayed: bool, idempotency_key: Optional[str]) -> "CreatedJob":
        return cls(
            job_id=str(data["job_id"]),
            status=str(data["status"]),
            created_at=_required_timestamp(data["created_at"]),
            replayed=replayed,
            idempotency_key=idempotency_key,
        )


@dataclass(frozen=True)
class JobStatus:
    """MoRAG's ``JobStatusResponse``: what ``GET /{id}/status`` answers."""

    job_id: str
    status: str
    worker_id: Optional[str]
    created_at: datetime
    started_at: Optional[datetime]
    completed_at: Optional[datetime]
    error_message: Optional[str]
    retry_count: int
    #: While processing: the attempt's execution deadline, the latest it can end.
    estimated_completion: Optional[datetime]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @classmethod
    def from_json(cls, data: Json) -> "JobStatus":
        return cls(**_status_fields(data))


def _status_fields(data: Json) -> Json:
    return dict(
        job_id=str(data["job_id"]),
        status=str(data["status"]),
        worker_id=data.get("worker_id"),
        created_at=_required_timestamp(data["created_at"]),
        started_at=parse_timestamp(data.get("started_at")),
        completed_at=parse_timestamp(data.get("completed_at")),
        error_message=data.get("error_message"),
        retry_count=int(data.get("retry_count") or 0),
        estimated_completion=parse_timestamp(data.get("estimated_completion")),
    )


@dataclass(frozen=True)
class JobSummary(JobStatus):
    """A job in a listing: its status plus what operators filter on."""

    content_type: str
    ingestion_task_id: str
    attempt: int

    @classmethod
    def from_json(cls, data: Json) -> "JobSummary":
        return cls(**_summary_fields(data))


def _summary_fields(data: Json) -> Json:
    fields = _status_fields(data)
    fields.update(
        content_type=str(data["content_type"]),
        ingestion_task_id=str(data["ingestion_task_id"]),
        attempt=int(data.get("attempt") or 0),
    )
    return fields


@dataclass(frozen=True)
class JobPage:
    jobs: List[JobSummary]
    #: Pass to the next ``list_jobs`` call; None on the last page.
    next_cursor: Optional[str]


@dataclass(frozen=True)
class JobResult:
    """A completed job's converted content."""

    content: str
    metadata: Json
    processing_time: Optional[float]


@dataclass(frozen=True)
class HistoryEntry:
    """One transition of a job: from which status to which, when, by whom and why."""

    from_status: Optional[str]
    to_status: str
    at: datetime
    actor: str
    reason: str

    @classmethod
    def from_json(cls, data: Json) -> "HistoryEntry":
        return cls(
            from_status=data.get("from"),
            to_status=str(data["to"]),
            at=_required_timestamp(data["at"]),
            actor=str(data.get("actor", "")),
            reason=str(data.get("reason", "")),
        )


@dataclass(frozen=True)
class Delivery:
    """One job outcome on its way to one sink (ingestion callback, webhook or Celery)."""

    id: int
    #: The id receivers deduplicate by: the ``webhook-id`` header, the Celery task id.
    event_id: str
    sink: str
    job_id: str
    #: ``pending``, ``delivered`` or ``dead``.
    state: str
    attempt_count: int
    next_attempt_at: Optional[datetime]
    last_error: Optional[str]
    created_at: datetime
    updated_at: datetime
    delivered_at: Optional[datetime]

    @classmethod
    def from_json(cls, data: Json) -> "Delivery":
        return cls(**_delivery_fields(data))


def _delivery_fields(data: Json) -> Json:
    return dict(
        id=int(data["id"]),
        event_id=str(data["event_id"]),
        sink=str(data["sink"]),
        job_id=str(data["job_id"]),
        state=str(data["state"]),
        attempt_count=int(data.get("attempt_count") or 0),
        next_attempt_at=parse_timestamp(data.get("next_attempt_at")),
        last_error=data.get("last_error"),
        created_at=_required_timestamp(data["created_at"]),
        updated_at=_required_timestamp(data["updated_at"]),
        delivered_at=parse_timestamp(data.get("delivered_at")),
    )


@dataclass(frozen=True)
class DeliveryAttempt:
    attempt: int
    at: datetime
    outcome: str
    http_status: Optional[int]
    error: Optional[str]

    @classmethod
    def from_json(cls, data: Json) -> "DeliveryAttempt":
        status = data.get("http_status")
        return cls(
            attempt=int(data["attempt"]),
            at=_required_timestamp(data["at"]),
            outcome=str(data["outcome"]),
            http_status=None if status is None else int(status),
            error=data.get("error"),
        )


@dataclass(frozen=True)
class DeliveryDetail(Delivery):
    """A delivery with its attempts, oldest first."""

    attempts: List[DeliveryAttempt]

    @classmethod
    def from_json(cls, data: Json) -> "DeliveryDetail":
        fields = _delivery_fields(data)
        fields["attempts"] = [DeliveryAttempt.from_json(a) for a in data.get("attempts") or []]
        return cls(**fields)


@dataclass(frozen=True)
class DeliveryPage:
    deliveries: List[Delivery]
    next_cursor: Optional[str]


@dataclass(frozen=True)
class JobDetail(JobSummary):
    """Everything about one job: ``GET /api/v1/remote-jobs/{id}``."""

    source_file_path: str
    task_options: Json
    available_at: Optional[datetime]
    execution_deadline: Optional[datetime]
    heartbeat_deadline: Optional[datetime]
    last_heartbeat_at: Optional[datetime]
    progress: Optional[float]
    progress_message: Optional[str]
    updated_at: Optional[datetime]
    #: Set once the job completed.
    result: Optional[JobResult]
    history: List[HistoryEntry]
    #: The job's outcomes on their way to the sinks, newest first.
    deliveries: List[Delivery]

    @classmethod
    def from_json(cls, data: Json) -> "JobDetail":
        fields = _summary_fields(data)
        result = data.get("result")
        fields.update(
            source_file_path=str(data.get("source_file_path", "")),
            task_options=dict(data.get("task_options") or {}),
            available_at=parse_timestamp(data.get("available_at")),
            execution_deadline=parse_timestamp(data.get("execution_deadline")),
            heartbeat_deadline=parse_timestamp(data.get("heartbeat_deadline")),
            last_heartbeat_at=parse_timestamp(data.get("last_heartbeat_at")),
            progress=_optional_float(data.get("progress")),
            progress_message=data.get("progress_message"),
            updated_at=parse_timestamp(data.get("updated_at")),
            result=None
            if result is None
            else JobResult(
                content=str(result.get("content", "")),
                metadata=dict(result.get("metadata") or {}),
                processing_time=_optional_float(result.get("processing_time")),
            ),
            history=[HistoryEntry.from_json(h) for h in data.get("history") or []],
            deliveries=[Delivery.from_json(d) for d in data.get("deliveries") or []],
        )
        return cls(**fields)


@dataclass(frozen=True)
class SinkCounts:
    pending: int
    dead: int


@dataclass(frozen=True)
class DeliveryStatistics:
    per_sink: Dict[str, SinkCounts]
    #: Seconds since the oldest pending delivery was created; None when none is pending.
    oldest_pending_age_seconds: Optional[float]


@dataclass(frozen=True)
class WorkerStatistics:
    """Healthy and stale workers in the registry (see :class:`WorkerRecord`)."""

    healthy: int
    stale: int
    #: Healthy workers per content type of their latest poll; ``*`` counts those that take any type.
    healthy_by_content_type: Dict[str, int]

    @classmethod
    def from_json(cls, data: Json) -> "WorkerStatistics":
        return cls(
            healthy=int(data.get("healthy") or 0),
            stale=int(data.get("stale") or 0),
            healthy_by_content_type={k: int(v) for k, v in (data.get("healthy_by_content_type") or {}).items()},
        )


@dataclass(frozen=True)
class CleanupPass:
    """The monitor's last retention cleanup pass (the statistics' ``cleanup``)."""

    finished_at: datetime
    jobs_deleted: int
    seconds: float
    #: The share of the pass's time its batches kept the store busy.
    store_busy_share: float
    #: The share they were allowed: 0.1, more (up to 0.3) while cleanup catches up.
    store_share_allowed: float
    #: False when the pass ran out of time with finished jobs past retention left:
    #: cleanup cannot keep up with job creation, and storage grows.
    keeping_up: bool
    #: Passes in a row that could not finish.
    passes_behind: int
    #: Free space returned to the file system after the pass (SQLite).
    released_mb: float

    @classmethod
    def from_json(cls, data: Json) -> "CleanupPass":
        return cls(
            finished_at=_required_timestamp(data["finished_at"]),
            jobs_deleted=int(data.get("jobs_deleted") or 0),
            seconds=float(data.get("seconds") or 0.0),
            store_busy_share=float(data.get("store_busy_share") or 0.0),
            store_share_allowed=float(data.get("store_share_allowed") or 0.0),
            keeping_up=bool(data.get("keeping_up", True)),
            passes_behind=int(data.get("passes_behind") or 0),
            released_mb=float(data.get("released_mb") or 0.0),
        )


@dataclass(frozen=True)
class Statistics:
    """The prototype's statistics fields plus the deliveries', the workers' and the
    retention cleanup's state."""

    status_counts: Dict[str, int]
    content_type_counts: Dict[str, int]
    total_jobs: int
    storage_size_mb: float
    avg_processing_times: Dict[str, float]
    recent_jobs_24h: int
    timestamp: datetime
    deliveries: DeliveryStatistics
    workers: WorkerStatistics
    #: None before the monitor's first cleanup pass (within a minute of the server's start).
    cleanup: Optional[CleanupPass]

    @classmethod
    def from_json(cls, data: Json) -> "Statistics":
        deliveries = data.get("deliveries") or {}
        cleanup = data.get("cleanup")
        return cls(
            status_counts={k: int(v) for k, v in (data.get("status_counts") or {}).items()},
            content_type_counts={k: int(v) for k, v in (data.get("content_type_counts") or {}).items()},
            total_jobs=int(data.get("total_jobs") or 0),
            storage_size_mb=float(data.get("storage_size_mb") or 0.0),
            avg_processing_times={k: float(v) for k, v in (data.get("avg_processing_times") or {}).items()},
            recent_jobs_24h=int(data.get("recent_jobs_24h") or 0),
            timestamp=_required_timestamp(data["timestamp"]),
            deliveries=DeliveryStatistics(
                per_sink={
                    sink: SinkCounts(pending=int(c.get("pending") or 0), dead=int(c.get("dead") or 0))
                    for sink, c in (deliveries.get("per_sink") or {}).items()
                },
                oldest_pending_age_seconds=_optional_float(deliveries.get("oldest_pending_age_seconds")),
            ),
            workers=WorkerStatistics.from_json(data.get("workers") or {}),
            cleanup=None if cleanup is None else CleanupPass.from_json(cleanup),
        )


@dataclass(frozen=True)
class CleanupResult:
    """A cleanup's answer: ``cleaned_jobs`` after a real run, ``would_clean_jobs`` after a dry run."""

    days_old: int
    dry_run: bool
    cleaned_jobs: Optional[int]
    would_clean_jobs: Optional[int]

    @classmethod
    def from_json(cls, data: Json) -> "CleanupResult":
        dry_run = bool(data.get("dry_run", False))
        return cls(
            days_old=int(data["days_old"]),
            dry_run=dry_run,
            cleaned_jobs=None if dry_run else int(data.get("cleaned_jobs") or 0),
            would_clean_jobs=int(data["would_clean_jobs"]) if dry_run else None,
        )


@dataclass(frozen=True)
class Health:
    """``GET /health``: ``healthy`` is false while the store cannot write (the server answers 503)."""

    healthy: bool
    status: str
    store: str
    timestamp: Optional[datetime]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], http_status: int) -> "Health":
        return cls(
            healthy=http_status == 200 and data.get("status") == "healthy",
            status=str(data.get("status", "")),
            store=str(data.get("store", "")),
            timestamp=parse_timestamp(data.get("timestamp")),
        )


@dataclass(frozen=True)
class WorkerRecord:
    """One worker process in the registry (``GET /api/v1/workers``): a worker id and,
    for workers that send ``X-Morag-Worker-Instance``, one record per process start."""

    worker_id: str
    #: None for a worker that sends no instance id (MoRAG's remote-converter).
    instance: Optional[str]
    #: ``healthy`` or ``stale`` (silent for longer than ``stale_after_seconds``).
    status: str
    #: From its latest poll; empty means any type; None when it never polled.
    content_types: Optional[List[str]]
    #: ``X-Morag-Worker-Version``, else the worker's User-Agent.
    version: Optional[str]
    address: Optional[str]
    first_seen_at: datetime
    last_seen_at: datetime
    seconds_since_last_seen: float
    #: How long it may stay silent before it counts as stale, as things stand.
    stale_after_seconds: float
    poll_wait_seconds: float
    sends_heartbeats: bool
    jobs_in_flight: int
    completed: int
    failed: int

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    @classmethod
    def from_json(cls, data: Json) -> "WorkerRecord":
        content_types = data.get("content_types")
        return cls(
            worker_id=str(data["worker_id"]),
            instance=data.get("instance"),
            status=str(data["status"]),
            content_types=None if content_types is None else [str(t) for t in content_types],
            version=data.get("version"),
            address=data.get("address"),
            first_seen_at=_required_timestamp(data["first_seen_at"]),
            last_seen_at=_required_timestamp(data["last_seen_at"]),
            seconds_since_last_seen=float(data.get("seconds_since_last_seen") or 0.0),
            stale_after_seconds=float(data.get("stale_after_seconds") or 0.0),
            poll_wait_seconds=float(data.get("poll_wait_seconds") or 0.0),
            sends_heartbeats=bool(data.get("sends_heartbeats", False)),
            jobs_in_flight=int(data.get("jobs_in_flight") or 0),
            completed=int(data.get("completed") or 0),
            failed=int(data.get("failed") or 0),
        )


@dataclass(frozen=True)
class WorkerList:
    """The worker registry, most recently seen first, with the healthy and stale counts."""

    workers: List[WorkerRecord]
    healthy: int
    stale: int
    timestamp: datetime

    @classmethod
    def from_json(cls, data: Json) -> "WorkerList":
        return cls(
            workers=[WorkerRecord.from_json(w) for w in data.get("workers") or []],
            healthy=int(data.get("healthy") or 0),
            stale=int(data.get("stale") or 0),
            timestamp=_required_timestamp(data["timestamp"]),
        )


@dataclass(frozen=True)
class ClaimedJob:
    """A job a poll handed to this worker, with its lease and deadlines."""

    job_id: str
    #: A path below the server's base URL, as MoRAG's protocol has it.
    source_file_url: str
    content_type: str
    task_options: Json
    #: Send it with heartbeats, the result and a release.
    lease_id: Optional[str]
    attempt: Optional[int]
    execution_deadline: Optional[datetime]
    heartbeat_timeout_seconds: Optional[int]
    heartbeat_interval_seconds: Optional[int]

    @classmethod
    def from_json(cls, data: Json) -> "ClaimedJob":
        def optional_int(name: str) -> Optional[int]:
            value = data.get(name)
            return None if value is None else int(value)

        return cls(
            job_id=str(data["job_id"]),
            source_file_url=str(data["source_file_url"]),
            content_type=str(data["content_type"]),
            task_options=dict(data.get("task_options") or {}),
            lease_id=data.get("lease_id"),
            attempt=optional_int("attempt"),
            execution_deadline=parse_timestamp(data.get("execution_deadline")),
            heartbeat_timeout_seconds=optional_int("heartbeat_timeout_seconds"),
            heartbeat_interval_seconds=optional_int("heartbeat_interval_seconds"),
        )


@dataclass(frozen=True)
class HeartbeatAnswer:
    job_id: str
    status: str
    #: True when the job was cancelled: stop working on it.
    cancelled: bool
    execution_deadline: Optional[datetime]
    heartbeat_deadline: Optional[datetime]

    @classmethod
    def from_json(cls, data: Json) -> "HeartbeatAnswer":
        return cls(
            job_id=str(data["job_id"]),
            status=str(data["status"]),
            cancelled=bool(data.get("cancelled", False)),
            execution_deadline=parse_timestamp(data.get("execution_deadline")),
            heartbeat_deadline=parse_timestamp(data.get("heartbeat_deadline")),
        )


@dataclass(frozen=True)
class SubmitAnswer:
    """The answer to a result: the job's new status, and whether its outcome was handed
    off to a configured sink."""

    status: str
    ingestion_continued: bool

    @classmethod
    def from_json(cls, data: Json) -> "SubmitAnswer":
        return cls(status=str(data["status"]), ingestion_continued=bool(data.get("ingestion_continued", False)))
