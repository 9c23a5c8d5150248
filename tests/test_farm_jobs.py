"""Integration: ``ray job submit`` runs ``jobs/sweep.py`` against a local head started with ``ray start``.

The head is started with ``ray start --head --block`` in its own process group on 127.0.0.1 (free ports,
its own temp dir), and stopped by signalling that group only — never ``ray stop``, which would stop
every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_farm import assert_exactly_once, base_spec, write_phantom, write_spec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A head node from the ``ray`` CLI; yields the dashboard (job API) address."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's unix socket paths must fit
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the Ray dashboard (job API) did not come up within 120 s")
            time.sleep(1.0)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(1.0)
        with contextlib.suppress(ProcessLookupError):  # anything left in its process group
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_jobs_sweep(ray_head: str, tmp_path: Path) -> None:
    write_phantom(tmp_path / "a.nii.gz")
    write_phantom(tmp_path / "b.nii.gz", bone_shift=3)
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "tiny.yaml", base_spec(tmp_path, tmp_path / "ignored",
                                                        tracking={"enabled": True, "experiment": "job-test"}))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
           "python", "jobs/sweep.py", str(spec), "--output", str(out), "--summary-json", str(tmp_path / "sum.json")]
    r = subprocess.run(cmd, env=ray_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in (r.stdout + r.stderr)
    summary = yaml.safe_load((tmp_path / "sum.json").read_text())
    assert summary["complete"] and summary["images_rendered"] == 32 and summary["run_id"]
    assert_exactly_once(spec, str(out))
    assert (out / "mlruns.db").is_file() and (out / "manifest.json").is_file()
