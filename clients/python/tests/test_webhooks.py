"""The Standard Webhooks verifier on its own (the test against the server's real
deliveries is in test_client.py)."""

from __future__ import annotations

import base64

import pytest

from morag_jobs_client.webhooks import WebhookVerificationError, WebhookVerifier, parse_secret, sign

# The example of the Standard Webhooks reference libraries (also src/delivery/signing.rs).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MESSAGE_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(signature: str = SIGNATURE, timestamp: int = TIMESTAMP) -> dict:
    return {"Webhook-Id": MESSAGE_ID, "Webhook-Timestamp": str(timestamp), "Webhook-Signature": signature}


def verifier(now: float = TIMESTAMP, **kwargs) -> WebhookVerifier:
    return WebhookVerifier(SECRET, clock=lambda: now, **kwargs)


def test_the_reference_example_verifies() -> None:
    assert sign(parse_secret(SECRET), MESSAGE_ID, TIMESTAMP, BODY) == SIGNATURE
    assert verifier().verify(BODY, headers()) == {"test": 2432232314}
    # Several signatures (a key rotation): one match is enough.
    assert verifier().verify(BODY, headers("v1,bm90IHRoaXMgb25l " + SIGNATURE + " v2,other"))


@pytest.mark.parametrize(
    "body, hdrs",
    [
        (b'{"test": 2432232315}', headers()),
        (BODY, headers("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE")),
        (BODY, headers("v2," + SIGNATURE[3:])),
        (BODY, headers("")),
        (BODY, {"webhook-timestamp": str(TIMESTAMP), "webhook-signature": SIGNATURE}),
        (BODY, headers(timestamp="soon")),  # type: ignore[arg-type]
    ],
)
def test_tampered_or_incomplete_deliveries_are_refused(body: bytes, hdrs: dict) -> None:
    with pytest.raises(WebhookVerificationError):
        verifier().verify(body, hdrs)


def test_the_timestamp_must_be_within_the_tolerance() -> None:
    assert verifier(now=TIMESTAMP + 300).verify(BODY, headers())
    assert verifier(now=TIMESTAMP - 300).verify(BODY, headers())
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier(now=TIMESTAMP + 301).verify(BODY, headers())
    with pytest.raises(WebhookVerificationError, match="future"):
        verifier(now=TIMESTAMP - 301).verify(BODY, headers())
    assert verifier(now=TIMESTAMP + 3000, tolerance_seconds=3600).verify(BODY, headers())


def test_secrets_with_and_without_the_prefix() -> None:
    assert parse_secret("whsec_" + base64.b64encode(b"key bytes").decode()) == b"key bytes"
    assert parse_secret("plain secret") == b"plain secret"
    for bad in ("whsec_***", "whsec_", ""):
        with pytest.raises(ValueError):
            parse_secret(bad)
    plain = WebhookVerifier("plain secret", clock=lambda: TIMESTAMP)
    signed = sign(b"plain secret", MESSAGE_ID, TIMESTAMP, BODY)
    assert plain.verify(BODY, headers(signed))
    assert "secret" not in repr(plain) and "Mf" not in repr(verifier())
