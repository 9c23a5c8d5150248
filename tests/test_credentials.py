"""Credentials stay where they belong: the driver's AWS keys reach no Ray runtime env (visible in the
dashboard and the job's config), no Ray log, no MLflow param or tag and no file of the dataset, unless the
user opts in with ``forward_credentials`` / ``--forward-credentials``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_farm import base_spec, write_phantom, write_spec

KEY_ID = "AKIADRRFARMTESTKEY01"
SECRET = "drrfarm+test/Secret0123456789abcdefXYZ"
TOKEN = "drrfarmSessionToken9876543210zyxwvu"


@pytest.fixture()
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from drrfarm.farm.driver import FORWARDED_ENV

    for name in FORWARDED_ENV:  # only what the test sets
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-test-1")


def test_forwarded_env_holds_keys_only_when_asked(aws_env: None) -> None:
    from drrfarm.farm.driver import forwarded_env

    default = forwarded_env()
    assert default == {"AWS_DEFAULT_REGION": "eu-test-1"}
    opted = forwarded_env(credentials=True)
    assert opted["AWS_ACCESS_KEY_ID"] == KEY_ID and opted["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert opted["AWS_SESSION_TOKEN"] == TOKEN


def test_sweep_keeps_keys_out_of_ray_tracking_and_the_dataset(aws_env: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from drrfarm.farm import worker
    from drrfarm.farm.driver import run_sweep

    write_phantom(tmp_path / "a.nii.gz")
    write_phantom(tmp_path / "b.nii.gz", bone_shift=3)
    out = tmp_path / "out"
    spec = base_spec(tmp_path, out, tracking={"enabled": True, "experiment": "credentials"})
    spec["volumes"] = spec["volumes"][:1]
    spec_path = write_spec(tmp_path / "s.yaml", spec)
    runtime_envs: list[Any] = []
    real_options = worker.actor_options

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        opts = real_options(*args, **kwargs)
        runtime_envs.append(opts.get("runtime_env"))
        return opts

    monkeypatch.setattr(worker, "actor_options", spy)
    ray.shutdown()
    summary = run_sweep(spec_path, num_actors=1, progress=False)
    assert summary.complete and summary.run_id
    assert runtime_envs and runtime_envs[0] == {"env_vars": {"AWS_DEFAULT_REGION": "eu-test-1"}}

    secrets = [s.encode() for s in (KEY_ID, SECRET, TOKEN)]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".parquet" for p in files)
    assert any(p.name.startswith("mlruns") for p in files)  # the local MLflow store: params, tags, artifacts
    for path in files:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), f"a credential reached {path}"
    logs = Path("/tmp/ray/session_latest/logs")
    if logs.is_dir():  # Ray's own logs of this session (runtime envs are logged there when forwarded)
        for path in logs.rglob("*"):
            if path.is_file() and path.stat().st_size < 50 << 20:
                data = path.read_bytes()
                assert not any(s in data for s in secrets), f"a credential reached Ray's log {path}"
    doc = json.loads((out / "manifest.json").read_text())
    assert KEY_ID not in json.dumps(doc)
