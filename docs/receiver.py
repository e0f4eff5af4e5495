"""A minimal receiver for morag-jobs deliveries (the ingestion callback or a job's
webhook_url), standard library only. It checks the Standard Webhooks signature and
ignores a delivery it has already processed (deliveries are at least once; the
webhook-id is the event's stable id).

    MORAG_WEBHOOK_SECRET=whsec_... python3 docs/receiver.py 8800
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["MORAG_WEBHOOK_SECRET"]
KEY = base64.b64decode(SECRET[len("whsec_"):]) if SECRET.startswith("whsec_") else SECRET.encode()
TOLERANCE_SECONDS = 5 * 60
seen = set()  # Use a database table with a unique key in production.


def verified(headers, body):
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, entry.split(",", 1)[1])
        for entry in headers.get("webhook-signature", "").split()
        if entry.startswith("v1,")
    )


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if not verified(self.headers, body):
            self.send_response(401)
            self.end_headers()
            return
        event_id = self.headers["webhook-id"]
        # One event goes to every sink under the same id: deduplicate per endpoint.
        if (self.path, event_id) not in seen:
            event = json.loads(body)
            # Hand over to ingestion here: continue with event["processing_result"]
            # (webhook: event["result"]) or handle event["failure_info"].
            print(event_id, event.get("event") or event.get("status"), event.get("job_id"), flush=True)
            seen.add((self.path, event_id))
        self.send_response(204)  # Any 2xx: delivered. 410: never send again.
        self.end_headers()


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
