"""Real processes for the Python tests: the morag-jobs server binary (started, killed with
SIGKILL, restarted on the same port and data), and a TCP proxy that loses answers.

The Rust test `tests/it/python_client.rs` runs pytest with:

- ``MORAG_JOBS_BIN``: the server binary cargo built;
- ``MORAG_JOBS_TEST_DATABASE_URLS``: comma-separated PostgreSQL databases, one per server a
  test module starts, when the suite runs on PostgreSQL (``MORAG_TEST_STORE=postgres``);
  empty or unset: every server uses SQLite in its own data directory.

By hand: ``MORAG_JOBS_BIN=target/debug/morag-jobs PYTHONPATH=clients/python/src:tests/python
python -m pytest clients/python/tests``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import httpx

_database_urls: List[str] = [
    url for url in os.environ.get("MORAG_JOBS_TEST_DATABASE_URLS", "").split(",") if url.strip()
]
_database_urls_lock = threading.Lock()


def server_binary() -> str:
    binary = os.environ.get("MORAG_JOBS_BIN")
    if not binary or not Path(binary).exists():
        raise RuntimeError(
            "MORAG_JOBS_BIN must name the morag-jobs binary (cargo build; target/debug/morag-jobs)"
        )
    return binary


def next_database_url() -> Optional[str]:
    """A PostgreSQL database of its own for the next server, or None for SQLite."""
    if not os.environ.get("MORAG_JOBS_TEST_DATABASE_URLS"):
        return None
    with _database_urls_lock:
        if not _database_urls:
            raise RuntimeError(
                "every database in MORAG_JOBS_TEST_DATABASE_URLS is taken: start fewer servers "
                "or have tests/it/python_client.rs create more"
            )
        return _database_urls.pop(0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment() -> Dict[str, str]:
    """The test's environment without any MORAG_ setting, so a developer's exports
    cannot change the servers and workers the tests start."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}


class ServerProcess:
    """`morag-jobs serve` on a loopback port with its own data directory (and database)."""

    def __init__(
        self,
        data_dir: Path,
        args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        database_url: Optional[str] = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir = (self.data_dir / "files").resolve()
        self.port = free_port()
        self.args = list(args)
        self.env = dict(env or {})
        self.database_url = database_url if database_url is not None else next_database_url()
        self.log_path = self.data_dir / "server.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        env = clean_environment()
        env.update(self.env)
        if self.database_url:
            env["MORAG_DATABASE_URL"] = self.database_url
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [server_binary(), "serve", "--addr", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir), *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become healthy:\n{self.log()}")
            time.sleep(0.05)

    def kill_9(self) -> None:
        """SIGKILL: no chance to flush, finish a request or close anything."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_9()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def source_file(self, name: str, data: bytes) -> str:
        """Writes a file inside the server's default allowed root and returns its path."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        path = self.files_dir / name
        path.write_bytes(data)
        return str(path)


class AnswerDroppingProxy:
    """A TCP proxy in front of a server that forwards every request, but for the first
    ``drop`` connections closes the connection instead of passing the answer back: the
    server did the work, the client never hears of it (a lost answer)."""

    def __init__(self, upstream_port: int, drop: int = 1) -> None:
        self.upstream_port = upstream_port
        self.remaining_drops = drop
        self.connections = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                drop = self.remaining_drops > 0
                if drop:
                    self.remaining_drops -= 1
            threading.Thread(target=self._serve, args=(client, drop), daemon=True).start()

    def _serve(self, client: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pump_requests() -> None:
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    upstream.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=pump_requests, daemon=True).start()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if drop:
                    # The server answered: it has done the work. The client hears nothing.
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                # shutdown first: it sends the FIN at once and wakes the thread blocked in
                # recv on this socket, which close alone would not.
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
