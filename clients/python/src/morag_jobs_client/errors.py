"""Exceptions for everything that can go wrong talking to a morag-jobs server.

Every error answer of the server is JSON of the shape ``{"detail": ...}``; the client turns
it into an :class:`ApiError` subclass chosen by the status code, carrying the status, the
detail and the whole body. A request that got no answer at all (the server is down, the
network failed, a timeout) raises :class:`TransportError` once the retries are spent.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Type


class MoragJobsError(Exception):
    """The base of every exception this package raises."""


class TransportError(MoragJobsError):
    """No answer from the server: it is unreachable, closed the connection or timed out.

    ``cause`` is the underlying ``httpx`` exception.
    """

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause


class ApiError(MoragJobsError):
    """The server answered with an error status.

    ``status`` is the HTTP status, ``detail`` the body's ``detail`` (a string, or for a
    422 FastAPI's list of ``{"loc", "msg", "type"}``), ``body`` the whole decoded body
    and ``headers`` the answer's headers (lower-case names).
    """

    def __init__(
        self,
        status: int,
        detail: Any,
        body: Any = None,
        headers: Optional[Mapping[str, str]] = None,
        method: str = "",
        path: str = "",
    ) -> None:
        self.status = status
        self.detail = detail
        self.body = body
        self.headers: Dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status} {_detail_text(detail)}")


class BadRequestError(ApiError):
    """400: the request could not be read."""


class AuthenticationError(ApiError):
    """401: the API key is missing or wrong (or lacks admin rights for an admin call)."""


class PermissionDeniedError(ApiError):
    """403: for example a download of a job that is not being processed."""


class NotFoundError(ApiError):
    """404: no such job, delivery, file or route."""


class RequestTimeoutError(ApiError):
    """408: the request body did not arrive within the server's body timeout."""


class ConflictError(ApiError):
    """409: the job or delivery is not in a state that allows the request.

    ``current_status`` is the job's status when the server names it (a stale lease, a
    retry of a job that did not fail, ...).
    """

    @property
    def current_status(self) -> Optional[str]:
        if isinstance(self.body, dict):
            value = self.body.get("current_status")
            return value if isinstance(value, str) else None
        return None


class PayloadTooLargeError(ApiError):
    """413: the body, the content or the metadata is over a server limit (named in the detail)."""


class RequestTooLargeError(ApiError):
    """414 or 431: the URL or the request head is over the server's limits."""


class ValidationError(ApiError):
    """422: a field of the request is invalid. ``errors`` lists FastAPI's entries."""

    @property
    def errors(self) -> List[Dict[str, Any]]:
        if isinstance(self.detail, list):
            return [entry for entry in self.detail if isinstance(entry, dict)]
        return []

    def fields(self) -> List[str]:
        """The dotted locations of the invalid fields, e.g. ``["body.content_type"]``."""
        return [".".join(str(part) for part in entry.get("loc", [])) for entry in self.errors]


class IdempotencyKeyReusedError(ValidationError):
    """422: the ``Idempotency-Key`` was used with a different request in the last 24 hours."""


class ServerError(ApiError):
    """5xx: the server failed; retried by the client for idempotent calls."""


class ServiceUnavailableError(ServerError):
    """503: the store is temporarily unavailable or the server is over its connection cap.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    @property
    def retry_after(self) -> Optional[float]:
        return parse_retry_after(self.headers.get("retry-after"))


_BY_STATUS: Dict[int, Type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    413: PayloadTooLargeError,
    414: RequestTooLargeError,
    422: ValidationError,
    431: RequestTooLargeError,
    503: ServiceUnavailableError,
}


def error_for_answer(
    status: int,
    body: Any,
    headers: Optional[Mapping[str, str]] = None,
    method: str = "",
    path: str = "",
) -> ApiError:
    """The exception for an error answer: the class chosen by status, carrying the detail.

    A body that is not the server's ``{"detail": ...}`` (a proxy's HTML page, say) is kept
    whole as the detail, so nothing the server said is lost.
    """
    detail = body.get("detail", body) if isinstance(body, dict) else body
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ApiError
    if cls is ValidationError and _names_idempotency_key(detail):
        cls = IdempotencyKeyReusedError
    return cls(status, detail, body=body, headers=headers, method=method, path=path)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header in its delta-seconds form; None otherwise."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _names_idempotency_key(detail: Any) -> bool:
    if not isinstance(detail, list):
        return False
    for entry in detail:
        if isinstance(entry, dict):
            loc = [str(part).lower() for part in entry.get("loc", [])]
            if "idempotency-key" in loc:
                return True
    return False


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        parts = []
        for entry in detail:
            if isinstance(entry, dict):
                loc = ".".join(str(part) for part in entry.get("loc", []))
                parts.append(f"{loc}: {entry.get('msg', '')}" if loc else str(entry.get("msg", "")))
            else:
                parts.append(str(entry))
        return "; ".join(parts)
    return str(detail)
