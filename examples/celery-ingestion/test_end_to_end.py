"""The Celery ingestion example end to end, with real processes: a morag-jobs server with
the Celery sink, a Celery worker running ingestion_app.py, a `morag-jobs worker` running
convert.sh, Redis as the broker. The server is killed with SIGKILL in the middle and
restarted; MoRAG's own remote-converter requests run against the same server.

Everything of one run (the Celery queue, kombu's binding, the dedup markers) lives under
one unique Redis key stem, deleted at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import httpx
import pytest
import redis
from celery import Celery

from morag_jobs_client import MoragJobsClient
from morag_jobs_processes import ServerProcess, clean_environment, server_binary

EXAMPLE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("MORAG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_KEY = "example-admin-key"
WORKER_KEY = "example-worker-key"
INGEST = "morag.ingest_tasks.ingest_file_task"
CONTINUE = "morag.ingest_tasks.continue_ingestion_after_remote_processing"
FAILURE = "morag.ingest_tasks.handle_remote_job_failure"
MARK = "ingestion_example.mark"
OPTIONS = {"remote": True, "language": "en"}


@pytest.fixture
def stem() -> Iterator[str]:
    stem = f"morag-jobs-example-{uuid.uuid4()}"
    yield stem
    broker = redis.Redis.from_url(REDIS_URL)
    for key in broker.scan_iter(match=f"*{stem}*"):
        broker.delete(key)
    # A worker stopped hard may leave a message of ours in kombu's shared unacked hash.
    for tag, message in broker.hgetall("unacked").items():
        if stem.encode() in message:
            broker.hdel("unacked", tag)
            broker.zrem("unacked_index", tag)
    assert list(broker.scan_iter(match=f"*{stem}*")) == []


class Process:
    """A child process with its output in a log file, stopped with SIGTERM at the end."""

    def __init__(self, argv: List[str], env: Dict[str, str], log_path: Path, cwd: Path = EXAMPLE) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def read_records(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    # The last piece has no newline yet: a line still being written is not a record yet.
    return [json.loads(line) for line in lines[:-1]]


def wait_for(condition: Callable[[], Any], what: str, timeout: float, watched: List[Process]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for process in watched:
            assert process.alive(), f"a process exited while waiting for {what}:\n{process.log()}"
        if time.monotonic() > deadline:
            logs = "\n---\n".join(p.log() for p in watched)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.1)


def test_twenty_ingests_convert_continue_once_each_across_a_server_kill(tmp_path: Path, stem: str) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    record_path = tmp_path / "record.jsonl"
    server = ServerProcess(
        tmp_path / "server",
        args=[
            "--admin-api-keys", ADMIN_KEY,
            "--worker-api-keys", WORKER_KEY,
            "--allowed-roots", str(uploads),
            "--max-retries", "0",
        ],
        env={
            "MORAG_CELERY_BROKER_URL": REDIS_URL,
            "MORAG_CELERY_QUEUE": stem,
            "MORAG_CELERY_DEDUP_KEY_PREFIX": f"{stem}:sent:",
            # A delivery cut off by the kill is taken over after this plus 10 s.
            "MORAG_DELIVERY_ATTEMPT_TIMEOUT_MS": "1000",
            "MORAG_DELIVERY_BACKOFF_BASE_MS": "100",
            "MORAG_DELIVERY_BACKOFF_MAX_MS": "500",
        },
    ).start()
    env = clean_environment()
    env.update(
        MORAG_JOBS_URL=server.url,
        MORAG_JOBS_API_KEY=ADMIN_KEY,
        MORAG_EXAMPLE_BROKER_URL=REDIS_URL,
        MORAG_EXAMPLE_QUEUE=stem,
        MORAG_EXAMPLE_RECORD=str(record_path),
        MORAG_EXAMPLE_RESULT_PREFIX=f"{stem}:",
        PYTHONDONTWRITEBYTECODE="1",
        # The Celery worker imports the client package from this checkout.
        PYTHONPATH=os.pathsep.join(filter(None, [str(EXAMPLE.parents[1] / "clients/python/src"), os.environ.get("PYTHONPATH")])),
    )
    celery_worker = Process(
        [sys.executable, "-m", "celery", "-A", "ingestion_app", "worker", "--pool", "solo", "-Q", stem,
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
         "--hostname", f"{stem}@%h"],
        env, tmp_path / "celery.log",
    )
    converter = Process(
        [server_binary(), "worker", "--url", server.url, "--api-key", WORKER_KEY, "--worker-id", "example-gpu",
         "--content-types", "audio", "--concurrency", "4", "--poll-wait", "2s", "--shutdown-grace", "5s",
         "--exec", f"sh {EXAMPLE / 'convert.sh'} {{input}}"],
        clean_environment(), tmp_path / "converter.log",
    )
    watched = [celery_worker, converter]
    sender = Celery("example-test", broker=REDIS_URL)
    admin = MoragJobsClient(server.url, ADMIN_KEY)

    def send(name: str, *args: Any) -> str:
        return sender.send_task(name, args=list(args), queue=stem, serializer="json").id

    def records(task: str) -> List[Dict[str, Any]]:
        return [r for r in read_records(record_path) if r["task"] == task]

    try:
        texts: Dict[str, str] = {}
        failing_task = None
        audio_tasks: List[str] = []

        def ingest(name: str, text: str, content_type: str = "audio") -> str:
            path = uploads / name
            path.write_text(text)
            task_id = send(INGEST, str(path), content_type, OPTIONS)
            texts[task_id] = text
            return task_id

        for n in range(10):
            audio_tasks.append(ingest(f"talk-{n}.mp3", f"hello from talk {n}\n"))
        failing_task = ingest("broken.mp3", "CANNOT CONVERT this one\n")
        wait_for(lambda: len(records(CONTINUE)) >= 3, "the first continuations", 60, watched)

        # SIGKILL in the middle: jobs pending and processing, deliveries on their way, and
        # ten more ingests arriving while the server is down (their creates are retried).
        server.kill_9()
        for n in range(10, 20):
            audio_tasks.append(ingest(f"talk-{n}.mp3", f"hello from talk {n}\n"))
        time.sleep(1.0)
        server.start()

        wait_for(lambda: len(records(CONTINUE)) >= 20 and len(records(FAILURE)) >= 1,
                 "20 continuations and a failure", 90, watched)

        # MoRAG's unchanged remote-converter, request by request as it sends them
        # (tests/it/morag_client.rs): /health first, a poll with the comma encoded, the
        # download at the base URL plus source_file_url, a PUT result without a lease,
        # never a heartbeat; its failure body is {success, error_message} only.
        video_ok = ingest("lecture.mp4", "a lecture\n", "video")
        video_bad = ingest("corrupt.mp4", "garbage\n", "video")
        wait_for(lambda: {r["task_id"] for r in records(INGEST)} >= {video_ok, video_bad},
                 "the video ingests", 30, watched)
        job_of = {r["task_id"]: r["args"][3]["remote_job_id"] for r in records(INGEST)}
        morag = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {WORKER_KEY}"}, timeout=30)
        assert morag.get("/health").status_code == 200
        for expected, success in ((job_of[video_ok], True), (job_of[video_bad], False)):
            polled = morag.get("/api/v1/remote-jobs/poll?worker_id=morag-gpu&content_types=audio%2Cvideo&max_jobs=1")
            assert polled.status_code == 200
            job = polled.json()
            assert job["job_id"] == expected, job
            download = morag.get(job["source_file_url"])
            assert download.status_code == 200
            if success:
                payload = {"success": True, "content": download.text.upper(), "metadata": {"model": "whisper"},
                           "processing_time": 3.25}
            else:
                payload = {"success": False, "error_message": "Processing exception: ffmpeg missing"}
            answer = morag.put(f"/api/v1/remote-jobs/{expected}/result", json=payload)
            assert answer.status_code == 200, answer.text
        idle = morag.get("/api/v1/remote-jobs/poll?worker_id=morag-gpu&content_types=audio%2Cvideo&max_jobs=1")
        assert idle.json()["job_id"] is None
        morag.close()

        # Everything handed off: every delivery delivered; then a mark sent last runs after
        # every task queued before it, so the counts below are final.
        wait_for(lambda: not admin.list_deliveries(state="pending").deliveries, "every delivery", 60, watched)
        assert admin.list_deliveries(state="dead").deliveries == []
        label = f"drained-{uuid.uuid4()}"
        send(MARK, label)
        wait_for(lambda: any(r["args"] == [label] for r in records(MARK)), "the mark", 30, watched)

        ingests = records(INGEST)
        job_of = {r["task_id"]: r["args"][3]["remote_job_id"] for r in ingests}
        assert Counter(r["task_id"] for r in ingests) == Counter({t: 1 for t in texts}), "each ingest ran once"
        remote_jobs = [r["args"][3]["remote_job_id"] for r in ingests]
        assert len(set(remote_jobs)) == len(texts) == 23, "one job per ingest"
        assert admin.statistics().total_jobs == 23

        continued = records(CONTINUE)
        failed = records(FAILURE)
        ran_for = Counter(r["args"][0] for r in continued + failed)
        assert all(count == 1 for count in ran_for.values()), f"a task ran twice: {ran_for}"
        assert set(r["args"][0] for r in continued) == set(audio_tasks) | {video_ok}
        for run in continued:
            ingestion_task_id, processing_result, task_options, read_back = run["args"]
            text = texts[ingestion_task_id]
            expected = "transcript of audio: " + text.upper() if ingestion_task_id != video_ok else text.upper()
            assert processing_result["success"] is True
            assert processing_result["content"] == expected
            assert task_options == OPTIONS
            # The continuation read its job back through the adapter, as MoRAG's does.
            assert read_back["id"] == job_of[ingestion_task_id]
            assert read_back["status"] == "completed"
            assert read_back["result_content"] == expected
            assert Path(read_back["source_file_path"]).parent == uploads.resolve()
            assert read_back["content_type"] == ("video" if ingestion_task_id == video_ok else "audio")
        assert len(continued) == 21

        assert sorted(r["args"][0] for r in failed) == sorted([failing_task, video_bad])
        failures = {r["args"][0]: r["args"][1] for r in failed}
        assert failures[failing_task]["job_id"] == job_of[failing_task]
        assert failures[failing_task]["reason"] == "failed"
        assert "unsupported codec" in failures[failing_task]["error_message"]
        assert failures[video_bad]["error_message"] == "Processing exception: ffmpeg missing"
    finally:
        admin.close()
        converter.stop()
        celery_worker.stop()
        server.stop()
