"""A stock Celery worker app standing in for MoRAG's ingestion workers in morag-jobs' tests.

It registers the two tasks morag-jobs calls, under MoRAG's names, and each appends one JSON
line with its task id, arguments and start time to the file named by
MORAG_TEST_CELERY_RECORD, so a test can check exactly which tasks ran, how often, and with
what (and the benchmark's celery-latency scenario, when they started).

Run it as: python -m celery -A celery_app worker -Q <queue> --pool solo ...
with MORAG_TEST_CELERY_BROKER (a redis:// URL) and MORAG_TEST_CELERY_RECORD set.
"""

import json
import os
import time

from celery import Celery

app = Celery("morag_jobs_test", broker=os.environ["MORAG_TEST_CELERY_BROKER"])
app.conf.update(
    # The tests share one Redis: no remote control (pidbox keys), no events, no results.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Exactly what the sink sends must arrive: no protocol 1, no pickle.
    accept_content=["json"],
)

RECORD_PATH = os.environ["MORAG_TEST_CELERY_RECORD"]


def record(request, task, args, started_at):
    # `started_at` (seconds since the epoch) is when the task began: the benchmark's
    # latency from a submitted result to the task starting ends there.
    line = json.dumps({"task": task, "task_id": request.id, "args": args, "started_at": started_at})
    # One write per line, appended: lines from one worker never interleave.
    with open(RECORD_PATH, "a", encoding="utf-8") as record_file:
        record_file.write(line + "\n")
        record_file.flush()
        os.fsync(record_file.fileno())


@app.task(bind=True, name="morag.ingest_tasks.continue_ingestion_after_remote_processing")
def continue_ingestion_after_remote_processing(self, ingestion_task_id, processing_result, task_options):
    started_at = time.time()
    record(self.request, self.name, [ingestion_task_id, processing_result, task_options], started_at)


@app.task(bind=True, name="morag.ingest_tasks.handle_remote_job_failure")
def handle_remote_job_failure(self, ingestion_task_id, failure_info):
    started_at = time.time()
    record(self.request, self.name, [ingestion_task_id, failure_info], started_at)
