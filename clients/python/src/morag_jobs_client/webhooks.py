"""Verifying Standard Webhooks signatures (https://www.standardwebhooks.com/) on deliveries
of the ingestion callback and per-job webhooks, for Python receivers.

The server signs ``"{webhook-id}.{webhook-timestamp}.{body}"`` with HMAC-SHA256 and sends
``webhook-signature: v1,<base64>``. A receiver checks that the timestamp is recent (a
replayed old delivery is refused), that one of the signatures matches in constant time,
and then deduplicates by ``webhook-id`` (deliveries are at least once)::

    verifier = WebhookVerifier(os.environ["MORAG_WEBHOOK_SECRET"])
    try:
        event = verifier.verify(request.body, request.headers)
    except WebhookVerificationError:
        return 401
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, Callable, Mapping, Optional

#: How far a delivery's timestamp may be from now, either way, by default.
DEFAULT_TOLERANCE_SECONDS = 5 * 60
SECRET_PREFIX = "whsec_"


class WebhookVerificationError(Exception):
    """The delivery is not authentic, or too old or too new to be trusted."""


def parse_secret(secret: str) -> bytes:
    """The key bytes: ``whsec_`` + base64 as the spec writes it, any other text as its
    UTF-8 bytes (as the server reads ``MORAG_WEBHOOK_SECRET``)."""
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError("the part after whsec_ is not base64") from error
    else:
        key = secret.encode("utf-8")
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one message, as the server computes it."""
    signed = message_id.encode("utf-8") + b"." + str(timestamp).encode("ascii") + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


class WebhookVerifier:
    """Verifies deliveries signed with one secret (``MORAG_WEBHOOK_SECRET`` on the server)."""

    def __init__(
        self,
        secret: str,
        *,
        tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = parse_secret(secret)
        self.tolerance_seconds = tolerance_seconds
        self._clock = clock

    def __repr__(self) -> str:
        return f"WebhookVerifier(tolerance_seconds={self.tolerance_seconds})"

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Any:
        """Checks the delivery and returns its decoded JSON body; raises
        :class:`WebhookVerificationError` when anything is wrong. ``body`` must be the raw
        bytes as received (re-encoded JSON would not match the signature)."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        message_id = _header(headers, "webhook-id")
        timestamp_text = _header(headers, "webhook-timestamp")
        signatures = _header(headers, "webhook-signature")
        if not message_id or not timestamp_text or not signatures:
            raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
        try:
            timestamp = int(timestamp_text)
        except ValueError:
            raise WebhookVerificationError("webhook-timestamp is not a whole number of seconds") from None
        now = self._clock()
        if timestamp < now - self.tolerance_seconds:
            raise WebhookVerificationError("the delivery's timestamp is too old")
        if timestamp > now + self.tolerance_seconds:
            raise WebhookVerificationError("the delivery's timestamp is too far in the future")
        expected = sign(self._key, message_id, timestamp, body).split(",", 1)[1].encode("ascii")
        # Several space-separated signatures may be sent (during a key rotation); every
        # one is compared, each in constant time.
        matched = False
        for entry in signatures.split():
            version, _, value = entry.partition(",")
            if version == "v1":
                matched |= hmac.compare_digest(expected, value.encode("ascii", "replace"))
        if not matched:
            raise WebhookVerificationError("no signature matches")
        try:
            return json.loads(body)
        except ValueError:
            raise WebhookVerificationError("the body is not JSON") from None


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    value = headers.get(name)
    if value is None:
        # Plain dicts are case-sensitive; HTTP header names are not.
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value
