"""A real ``mlflow server`` on 127.0.0.1 for tests (SQLite backend, proxied artifacts under tmp).

Fixtures ``mlflow_server`` (per test) and ``mlflow_server_module`` (per module) yield a started
:class:`MlflowServer`; ``stop()`` / ``start()`` simulate an outage (the port is kept, so clients
reconnect to the same URL). The server is killed at teardown. Load them in a test module with
``pytest_plugins = ["mlflow_server"]`` (tests/ is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """One ``python -m mlflow server`` subprocess (own process group) with its data under ``root``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db_path = self.root / "db.sqlite"
        self.artifacts_dir = self.root / "art"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The tracking URI, e.g. ``http://127.0.0.1:5123``."""
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """True if ``GET /health`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server and wait until ``/health`` answers (raises RuntimeError with the log tail)."""
        if self.running:
            return
        env = dict(os.environ)
        env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", HOST,
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.db_path}",
            "--artifacts-destination", str(self.artifacts_dir),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self.healthy():
                return
            time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy on {self.url}:\n{tail}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM to its process group, then SIGKILL) and wait until the port is closed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
        # workers of the group may outlive the parent briefly
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.healthy(timeout_s=0.5):
            time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A started real MLflow tracking server on 127.0.0.1 (stopped at teardown)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Like ``mlflow_server`` but shared by a test module (do not stop it in a test)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server-module"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
