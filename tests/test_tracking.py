"""drrfarm.tracking: a simulated sweep's tracker calls, read back through MlflowClient.

Uses the default SQLite store under the output folder and a real ``mlflow server`` on 127.0.0.1
(tests/mlflow_server.py), which is stopped to simulate an outage.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from drrfarm.errors import TrackingError
from drrfarm.tracking.params import flatten_params
from drrfarm.tracking.redaction import redact
from drrfarm.tracking.store import resolve_tracking_uri
from drrfarm.tracking.tracker import (
    OUTPUT_URL_TAG,
    SPEC_SHA_TAG,
    MlflowTracker,
    NullTracker,
    open_tracker,
)

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

SPEC_SHA = "5" * 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAKE_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYFAKEKEY"
FAKE_KEY_ID = "AKIAFAKEKEYID0000042"
URL_PASSWORD = "hunter2-pw-5521"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written to CWD by mistake stays in tmp and is visible


def _spec(volume_uri: str = "/data/ct/chest.nii.gz") -> dict:
    return {
        "name": "chest-demo",
        "experiment": "drrfarm-test",
        "volumes": [{"path": volume_uri, "segmentation": {"method": "thresholds"}}],
        "carm": {"sdd_mm": 1020.0, "sid_mm": 530.0, "height": 64, "width": 48, "pixel_mm": 0.8},
        "poses": {"alpha_deg": [-30, 0, 30], "beta_deg": [0, 10]},
        "spectra": ["90KV_AL40", "mono:60"],
        "physics": {"detector": "ideal", "photons": None, "solid_angle": True},
        "notes": "x" * 7000,
    }


def _images(n: int = 6, h: int = 16, w: int = 12) -> np.ndarray:
    """(n,h,w) uint8 test images: a distinct gradient per image."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([((xx * 7 + yy * 3 + 40 * i) % 256).astype(np.uint8) for i in range(n)])


def _contact_sheet(images: np.ndarray, cols: int = 3) -> bytes:
    n, h, w = images.shape
    rows = -(-n // cols)
    sheet = np.zeros((rows * h, cols * w), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(sheet, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _volumes(uri: str = "/data/ct/chest.nii.gz") -> list[dict]:
    return [
        {"uri": uri, "sha256": "a" * 64, "shape": (64, 64, 40), "spacing_mm": (0.8, 0.8, 2.5)},
        {"uri": "s3://bucket/ct/pelvis.nii.gz", "sha256": "b" * 64, "shape": (32, 32, 20), "spacing": (1, 1, 1)},
    ]


def _simulate_sweep(tracker, spec: dict, spec_path: Path, images: np.ndarray, extra: dict | None = None) -> dict:
    """The calls the farm driver makes during one sweep. Returns what was logged at finish."""
    tracker.log_spec(spec, spec_path, {"images": 12, "shards": 2, "poses": 6, "spectra": 2, "volumes": 2})
    tracker.log_tags({"drrfarm.sweep_id": "sweep-1", "gpu.worker_names": ["NVIDIA H100", "NVIDIA H100"]})
    tracker.log_inputs(_volumes(spec["volumes"][0]["path"]))
    for step in range(5):
        tracker.log_metrics(
            {
                "images_done": 3 * step,
                "images_per_s": 1.5 + step,
                "actor": {"a0": {"images_per_s": 0.5 + step}, "a1": {"images_per_s": 1.0}},
                "retries": 0,
                "failures": 0,
                "gpu_mem_bytes": 1_000_000 + step,
            },
            step=step,
        )
    manifest = {"shards": {"shard-00000": {"rows": 6, "sha256": "c" * 64}, "shard-00001": {"rows": 6}}}
    summary = {"images": 12, "wall_s": 3.2, "images_per_s": 3.75, "status": "ok"}
    manifest.update(extra or {})
    summary.update(extra or {})
    tracker.finish(manifest, _contact_sheet(images), summary, status="FINISHED")
    return {"manifest": manifest, "summary": summary}


def _download_all(client: MlflowClient, run_id: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, "", str(dst)))


# ---------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------


def test_importing_tracking_does_not_import_mlflow() -> None:
    code = "import sys, drrfarm.tracking.tracker; assert 'mlflow' not in sys.modules, 'mlflow imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_redact_urls_env_secrets_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890")
    monkeypatch.setenv("FEATURE_SECRET_ENABLED", "1")  # trivial values are not secrets
    obj = {
        "a": f"s3://AKIA:{FAKE_SECRET}@bucket/x.nii.gz",
        "b": [f"https://alice:{URL_PASSWORD}@host:8443/p?x=1", "plain 1"],
        "c": ("header tok-1234567890 end",),
        "password": "whatever",
        "url": "https://h/obj?X-Amz-Signature=abcdef&other=1",
        "n": 1,
    }
    out = redact(obj)
    assert out["a"] == "s3://***@bucket/x.nii.gz"
    assert out["b"] == ["https://***@host:8443/p?x=1", "plain 1"]
    assert out["c"] == ("header *** end",)
    assert out["password"] == "***"
    assert out["url"] == "https://h/obj?X-Amz-Signature=***&other=1"
    assert out["n"] == 1
    assert redact(FAKE_SECRET) == "***"
    assert redact("s3://bucket/key@v2/x") == "s3://bucket/key@v2/x"  # '@' in a path is not userinfo
    assert redact("aws_secret_access_key: abc123\nother: 1") == "aws_secret_access_key: ***\nother: 1"


def test_flatten_params_dotted_json_lists_and_truncation() -> None:
    params = flatten_params(_spec())
    assert params["carm.sdd_mm"] == "1020.0"
    assert params["carm.height"] == "64"
    assert json.loads(params["poses.alpha_deg"]) == [-30, 0, 30]
    assert json.loads(params["volumes"]) == [
        {"path": "/data/ct/chest.nii.gz", "segmentation": {"method": "thresholds"}}
    ]
    assert params["physics.photons"] == "null"
    assert params["physics.solid_angle"] == "true"
    assert len(params["notes"]) <= 6000 and "truncated, 7000 chars" in params["notes"]
    assert flatten_params({"a b/c?": 1}) == {"a b_c_": "1"}


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert resolve_tracking_uri(None, str(out)) == f"sqlite:///{out}/mlruns.db"
    assert resolve_tracking_uri(None, out.as_uri()) == f"sqlite:///{out}/mlruns.db"
    assert resolve_tracking_uri(None, "s3://bucket/out") == f"sqlite:///{Path.cwd()}/mlruns.db"
    assert resolve_tracking_uri("http://127.0.0.1:1", str(out)) == "http://127.0.0.1:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(None, str(out)) == "http://mlflow.example:5000"


def test_unsupported_tracking_uri_is_a_tracking_error(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="no-tracking"):
        open_tracker(True, "drrfarm", "foo://bar", str(tmp_path / "out"), SPEC_SHA)
    with pytest.raises(TrackingError, match="no-tracking"):  # MLflow 3 refuses the plain file store
        open_tracker(True, "drrfarm", str(tmp_path / "filestore"), str(tmp_path / "out"), SPEC_SHA)


# ---------------------------------------------------------------------------------------------------
# A sweep, read back
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["default-sqlite", "server"])
def test_sweep_is_logged_and_read_back(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = tmp_path / "dataset"
    spec = _spec()
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text("name: chest-demo\ncarm:\n  sdd_mm: 1020.0\n")
    images = _images()
    if store == "server":
        server = request.getfixturevalue("mlflow_server_module")
        tracking_uri, read_uri = server.url, server.url
    else:
        tracking_uri, read_uri = None, f"sqlite:///{out}/mlruns.db"

    tracker = open_tracker(True, "drrfarm-test", tracking_uri, str(out), SPEC_SHA)
    assert isinstance(tracker, MlflowTracker)
    assert tracker.run_id is not None
    logged = _simulate_sweep(tracker, spec, spec_path, images)
    assert tracker.pending == 0
    if store == "default-sqlite":
        assert (out / "mlruns.db").is_file() and (out / "mlartifacts").is_dir()
        assert not any(Path.cwd().iterdir()), "nothing may be written to the working directory"

    client = MlflowClient(tracking_uri=read_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "drrfarm-test"

    # params: flattened spec + counts + inputs
    p = run.data.params
    assert p["carm.sdd_mm"] == "1020.0" and p["name"] == "chest-demo"
    assert json.loads(p["spectra"]) == ["90KV_AL40", "mono:60"]
    assert len(p["notes"]) <= 6000
    assert {p[f"counts.{k}"] for k in ("images", "shards", "poses", "spectra", "volumes")} == {"12", "2", "6"}
    assert p["input.0.sha256"] == "a" * 64 and p["input.1.sha256"] == "b" * 64
    assert json.loads(p["input.0.shape"]) == [64, 64, 40]
    assert json.loads(p["input.1.spacing_mm"]) == [1, 1, 1]

    # tags: identity, environment, user tags
    t = run.data.tags
    assert t[SPEC_SHA_TAG] == SPEC_SHA
    assert t[OUTPUT_URL_TAG] == str(out.resolve())
    import drrfarm

    assert t["drrfarm.version"] == drrfarm.__version__
    assert t["python.version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert "ray.version" in t and "gpu.names" in t
    assert t["input.0.sha256"] == "a" * 64
    assert t["drrfarm.sweep_id"] == "sweep-1"
    assert json.loads(t["gpu.worker_names"]) == ["NVIDIA H100", "NVIDIA H100"]
    assert t["drrfarm.status"] == "FINISHED"

    # inputs: the CTs as MLflow dataset inputs, sha256 in the profile
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 2
    by_sha = {json.loads(d.dataset.profile)["sha256"]: d for d in inputs}
    assert set(by_sha) == {"a" * 64, "b" * 64}
    d0 = by_sha["a" * 64]
    assert d0.dataset.digest == "a" * 32
    assert json.loads(d0.dataset.source)["uri"] == "/data/ct/chest.nii.gz"
    assert d0.dataset.source_type == "local"
    assert by_sha["b" * 64].dataset.source_type == "s3"
    assert {tg.key: tg.value for tg in d0.tags}["drrfarm.sha256"] == "a" * 64

    # metrics over time
    hist = client.get_metric_history(tracker.run_id, "images_done")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(s, 3.0 * s) for s in range(5)]
    assert run.data.metrics["actor.a0.images_per_s"] == 4.5
    assert {"images_per_s", "actor.a1.images_per_s", "retries", "failures", "gpu_mem_bytes"} <= set(run.data.metrics)

    # artifacts
    names = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert {"spec", "manifest.json", "contact_sheet.png", "summary.json", "dataset_location.json"} <= names
    root = _download_all(client, tracker.run_id, tmp_path / "download")
    assert (root / "spec" / "sweep.yaml").read_text() == spec_path.read_text()
    assert json.loads((root / "manifest.json").read_text()) == logged["manifest"]
    assert json.loads((root / "summary.json").read_text()) == logged["summary"]
    location = json.loads((root / "dataset_location.json").read_text())
    assert location["output_url"] == str(out.resolve()) and location["mlflow_run_id"] == tracker.run_id
    png = (root / "contact_sheet.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        sheet = np.asarray(im)
    assert sheet.shape == (2 * 16, 3 * 12)
    np.testing.assert_array_equal(sheet[16:32, 12:24], images[4])  # image 4 is row 1, column 1

    # the tracker restores the MLflow HTTP settings it uses
    import os

    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_resume_reuses_the_run(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    first = open_tracker(True, "drrfarm", None, str(out), SPEC_SHA)
    first.log_spec({"a": 1}, None, {"images": 4})
    first.log_metrics({"images_done": 2}, step=0)
    first.finish(None, None, {"images": 2}, status="KILLED")
    run_id = first.run_id
    assert run_id

    again = open_tracker(True, "drrfarm", None, str(out) + "/", SPEC_SHA)  # same folder, other spelling
    assert again.run_id == run_id and again.resumed
    again.log_spec({"a": 1}, None, {"images": 4})  # re-logging identical params is fine
    again.log_metrics({"images_done": 4}, step=1)
    again.finish({"shards": {}}, None, {"images": 4})

    other_out = open_tracker(True, "drrfarm", f"sqlite:///{out}/mlruns.db", str(tmp_path / "other"), SPEC_SHA)
    other_spec = open_tracker(True, "drrfarm", None, str(out), "6" * 64)
    assert len({run_id, other_out.run_id, other_spec.run_id}) == 3
    for tr in (other_out, other_spec):
        tr.finish(None, None, None)

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlruns.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["drrfarm.resume_count"] == "1"
    assert [m.value for m in sorted(client.get_metric_history(run_id, "images_done"), key=lambda m: m.step)] == [
        2.0,
        4.0,
    ]
    assert len(client.search_runs([run.info.experiment_id], max_results=100)) == 3


def test_disabled_logs_nothing(tmp_path: Path, mlflow_server_module) -> None:
    out = tmp_path / "dataset"
    for uri in (None, mlflow_server_module.url):
        tracker = open_tracker(False, "drrfarm-disabled", uri, str(out), SPEC_SHA)
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        _simulate_sweep(tracker, _spec(), tmp_path / "missing.yaml", _images())
        assert tracker.run_id is None
    assert not out.exists(), "disabled tracking must not create the output folder or a database"
    assert not any(Path.cwd().iterdir())
    client = MlflowClient(tracking_uri=mlflow_server_module.url)
    assert client.get_experiment_by_name("drrfarm-disabled") is None


def test_no_secret_reaches_params_tags_inputs_or_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    caplog.set_level(logging.INFO, logger="drrfarm.tracking")
    s3_url = f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@bucket/ct/chest.nii.gz"
    http_url = f"https://alice:{URL_PASSWORD}@data.example/ct/chest.nii.gz"
    output_url = f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@bucket/out"
    spec = _spec(s3_url)
    spec["mirror"] = http_url
    spec["storage"] = {"endpoint": "http://minio:9000", "aws_secret_access_key": FAKE_SECRET}
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(
        f"volumes:\n  - path: {s3_url}\nmirror: {http_url}\nstorage:\n  aws_secret_access_key: {FAKE_SECRET}\n"
    )
    db = tmp_path / "track" / "mlruns.db"
    tracker = open_tracker(True, "drrfarm", f"sqlite:///{db}", output_url, SPEC_SHA)
    assert tracker.run_id
    tracker.log_tags({"source": http_url, "note": f"creds {FAKE_KEY_ID}/{FAKE_SECRET}"})
    extra = {"output_url": output_url, "mirror": http_url, "env": {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}}
    _simulate_sweep(tracker, spec, spec_path, _images(), extra=extra)

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(tracker.run_id)
    assert run.data.tags[OUTPUT_URL_TAG] == "s3://***@bucket/out"
    assert run.data.params["mirror"] == "https://***@data.example/ct/chest.nii.gz"
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for d in run.inputs.dataset_inputs:
        ds = d.dataset
        texts += [ds.name, ds.source, ds.profile or "", json.dumps({t.key: t.value for t in d.tags})]
    root = _download_all(client, tracker.run_id, tmp_path / "download")
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"sweep.yaml", "manifest.json", "summary.json", "dataset_location.json"}
    texts += [p.read_bytes().decode("latin-1") for p in files]
    texts.append(db.read_bytes().decode("latin-1"))  # everything MLflow stored, raw
    texts.append(caplog.text)
    blob = "\n".join(texts)
    for secret in (FAKE_SECRET, FAKE_KEY_ID, URL_PASSWORD, "alice:"):
        assert secret not in blob, f"{secret!r} leaked"
    assert "s3://***@bucket/ct/chest.nii.gz" in blob  # redacted, not dropped


# ---------------------------------------------------------------------------------------------------
# Outages
# ---------------------------------------------------------------------------------------------------


def test_stopped_server_never_blocks_or_raises(tmp_path: Path, mlflow_server, caplog: pytest.LogCaptureFixture) -> None:
    tracker = open_tracker(True, "drrfarm", mlflow_server.url, str(tmp_path / "out"), SPEC_SHA, finish_timeout_s=3)
    run_id = tracker.run_id
    assert run_id
    tracker.log_metrics({"images_done": 1}, step=0)
    mlflow_server.stop()
    assert not mlflow_server.healthy()

    caplog.set_level(logging.WARNING, logger="drrfarm.tracking")
    t0 = time.monotonic()
    for step in range(5, 200):
        tracker.log_metrics({"images_done": step}, step=step)
    assert tracker.flush() is False
    assert tracker.pending > 0
    _simulate_sweep(tracker, _spec(), tmp_path / "missing.yaml", _images())  # ends with finish()
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"tracker calls took {elapsed:.1f}s with the server down"
    assert tracker.run_id == run_id
    assert tracker.pending == 0  # finish gave up and dropped the buffer
    text = caplog.text
    assert "unreachable" in text and "not logged" in text


@pytest.mark.slow
def test_server_down_at_start_then_back(tmp_path: Path, mlflow_server, caplog: pytest.LogCaptureFixture) -> None:
    mlflow_server.stop()
    caplog.set_level(logging.WARNING, logger="drrfarm.tracking")
    t0 = time.monotonic()
    tracker = open_tracker(True, "drrfarm", mlflow_server.url, str(tmp_path / "out"), SPEC_SHA, finish_timeout_s=60)
    assert tracker.run_id is None  # no run yet: the sweep goes on
    tracker.log_spec({"a": 1}, None, {"images": 3})
    for step in range(3):
        tracker.log_metrics({"images_done": step + 1}, step=step)
    assert time.monotonic() - t0 < 15
    assert tracker.pending > 0 and "unreachable" in caplog.text

    mlflow_server.start()
    assert tracker.flush() is True  # buffered calls go out once the server is back
    assert tracker.run_id is not None and tracker.pending == 0
    tracker.finish({"shards": {}}, None, {"images": 3})

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["counts.images"] == "3"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "images_done")] == [0, 1, 2]
    assert "reachable again" in caplog.text


def test_buffer_is_bounded_and_unreachable_store_is_fast(tmp_path: Path) -> None:
    from mlflow_server import free_port

    t0 = time.monotonic()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = open_tracker(True, "drrfarm", url, str(tmp_path / "out"), SPEC_SHA, max_pending=10, finish_timeout_s=1)
    assert tracker.run_id is None
    for step in range(100):
        tracker.log_metrics({"images_done": step}, step=step)
    tracker.log_tags({"x": "y"})
    assert tracker.pending <= 10
    tracker.finish({"shards": {}}, b"not a png", {"images": 0})
    assert tracker.pending == 0
    tracker.log_metrics({"images_done": 1}, step=1)  # after finish: ignored, no error
    assert time.monotonic() - t0 < 20


def test_hung_server_costs_one_short_timeout_per_backoff(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # accepts TCP, never answers HTTP
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        tracker = open_tracker(
            True, "drrfarm", url, str(tmp_path / "out"), SPEC_SHA, http_timeout_s=2, finish_timeout_s=1
        )
        t_open = time.monotonic() - t0
        assert tracker.run_id is None
        t1 = time.monotonic()
        for step in range(50):  # within the backoff window: buffered, no network
            tracker.log_metrics({"images_done": step}, step=step)
        assert time.monotonic() - t1 < 5
        tracker.finish(None, None, {"images": 0})
        assert time.monotonic() - t0 < 30, f"open took {t_open:.1f}s"
