"""A real S3-compatible server on 127.0.0.1 for tests (moto's server mode), as a pytest fixture.

``s3_server`` starts moto's threaded WSGI server on a free loopback port, creates a bucket and points
the standard AWS environment chain at it for the duration of the test (``AWS_ENDPOINT_URL``, dummy
keys, region; via ``monkeypatch``). It can be stopped and started again mid-test to simulate an
outage: ``stop()`` closes the listening socket *and* every open keep-alive connection, so clients see
connection refused/reset exactly as with a crashed server; the stored objects survive because moto
keeps its state in this process.

Credentials: moto accepts any access key by default. ``enable_auth()`` creates an IAM user with an
access key (allowed ``s3:*``), switches the test's environment to that key and turns moto's request
authentication on, so that an unknown key is rejected with ``InvalidAccessKeyId`` (403).

Register with ``pytest_plugins = ["s3server"]`` (tests/ is on ``sys.path`` under pytest's default
rootdir-relative import mode) or import the fixture into a test module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

BUCKET = "drrfarm-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_server_class():  # moto imported lazily: only tests that use the fixture pay for it
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class _TrackingHandler(MotoRequestHandler):
        """Records its client socket so that stop() can cut keep-alive connections, and every request
        (method, path, Range header) for tests that count them."""

        live: set[socket.socket]
        lock: threading.Lock
        seen: list[tuple[str, str, str | None]]

        def run_wsgi(self) -> None:
            with self.lock:
                self.seen.append((self.command, self.path, self.headers.get("Range")))
            super().run_wsgi()

        def setup(self) -> None:
            super().setup()
            with self.lock:
                self.live.add(self.connection)

        def finish(self) -> None:
            with self.lock:
                self.live.discard(self.connection)
            super().finish()

    class RestartableMotoServer(ThreadedMotoServer):
        """ThreadedMotoServer whose stop() really takes the endpoint down and whose start() reuses the port."""

        def __init__(self, port: int) -> None:
            super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
            self._handler = type("Handler", (_TrackingHandler,),
                                 {"live": set(), "lock": threading.Lock(), "seen": []})
            self.running = False

        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=self._handler)
            self._server_ready_event.set()
            self._server.serve_forever()

        def start(self) -> None:
            super().start()
            self.running = True

        def stop(self) -> None:
            if not self.running:
                return
            super().stop()
            assert self._server is not None
            self._server.server_close()  # stop accepting: new connections are refused
            with self._handler.lock:
                conns = list(self._handler.live)
                self._handler.live.clear()
            for conn in conns:  # cut keep-alive connections held by clients' pools
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    conn.close()
            self.running = False

    return RestartableMotoServer


@dataclass
class S3Server:
    """Handle given to tests: endpoint, bucket, outage control and optional authentication."""

    endpoint_url: str
    bucket: str
    port: int
    _server: object
    _monkeypatch: pytest.MonkeyPatch
    _auth_on: bool = field(default=False)

    @property
    def url(self) -> str:
        """``s3://<bucket>`` -- the root of the test bucket."""
        return f"s3://{self.bucket}"

    def stop(self) -> None:
        """Take the endpoint down (connections refused, open ones reset); objects are kept."""
        self._server.stop()  # type: ignore[attr-defined]

    def start(self) -> None:
        """Bring the endpoint back on the same port."""
        self._server.start()  # type: ignore[attr-defined]

    def client(self, **kwargs):
        """A boto3 S3 client for this endpoint, with the environment's credentials."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **kwargs)

    def requests(self, clear: bool = False) -> list[tuple[str, str, str | None]]:
        """The requests served so far (or since the last ``clear``): (method, path with query, Range header)."""
        handler = self._server._handler  # type: ignore[attr-defined]
        with handler.lock:
            out = list(handler.seen)
            if clear:
                handler.seen.clear()
        return out

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def _set_auth_count(self, count: float) -> None:
        req = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=str(count).encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            json.loads(resp.read())

    def enable_auth(self) -> tuple[str, str]:
        """Turn on moto's authentication with a fresh IAM key (set in the env); returns (key id, secret)."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint_url, region_name="us-east-1")
        iam.create_user(UserName="drrfarm-writer")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="drrfarm-writer", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="drrfarm-writer")["AccessKey"]
        self._monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        self._monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        self._set_auth_count(0)
        self._auth_on = True
        return key["AccessKeyId"], key["SecretAccessKey"]

    def disable_auth(self) -> None:
        if self._auth_on:
            self._set_auth_count(float("inf"))
            self._auth_on = False


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1:<free port> with bucket ``drrfarm-test``; AWS_* env points at it."""
    pytest.importorskip("moto.server")
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    port = _free_port()
    server = _make_server_class()(port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "drrfarm-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "drrfarm-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    handle = S3Server(endpoint, BUCKET, port, server, monkeypatch)
    handle.create_bucket(BUCKET)
    fsspec.AbstractFileSystem.clear_instance_cache()  # no s3fs instance bound to an older endpoint
    try:
        yield handle
    finally:
        with contextlib.suppress(Exception):
            if not server.running:
                server.start()
            handle.disable_auth()
        server.stop()
        from moto.moto_api._internal.models import moto_api_backend

        moto_api_backend.reset()  # drop buckets/objects/IAM users between tests
        fsspec.AbstractFileSystem.clear_instance_cache()
