"""jobs/train_pose.py: 2 epochs on a tiny generated dataset on CPU (Ray Train), loss decreases, MLflow links.

The dataset (3 volumes x 24 images of 32², written with the sinks' ShardSink) has a bright blob whose
position encodes (alpha, beta) on a per-volume background; its provenance run is opened with the real
drrfarm.tracking (default SQLite store under the dataset folder), as the farm does, and its id is in the
Parquet file metadata.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from drrfarm.sinks import ShardSink

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def load_job():
    spec = importlib.util.spec_from_file_location("train_pose", ROOT / "jobs" / "train_pose.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_pose"] = mod
    spec.loader.exec_module(mod)
    return mod


def make_pose_dataset(url: str, run_id: str, n_volumes: int = 3, per_volume: int = 24) -> None:
    sink = ShardSink(url, rows_per_row_group=8)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    poses = [(a, b) for a in np.linspace(-30, 30, 6) for b in np.linspace(-20, 20, 4)][:per_volume]
    for v in range(n_volumes):
        vid = f"patient{v:02d}"
        body = 1.0 + 0.3 * rng.random() + 0.5 * np.exp(-((xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2) / 120.0)
        imgs, rows = [], []
        for i, (a, b) in enumerate(poses):
            cu, cv = SIZE / 2 + a / 30 * SIZE / 4, SIZE / 2 - b / 20 * SIZE / 4
            blob = 2.0 * np.exp(-((xx - cu) ** 2 + (yy - cv) ** 2) / 8.0)
            imgs.append((body + blob + 0.05 * rng.random((SIZE, SIZE))).astype(np.float32))
            rows.append({"volume_id": vid, "image_index": i, "seed": 1000 * v + i, "alpha_deg": float(a),
                         "beta_deg": float(b), "gamma_deg": 0.0, "kvp": (60.0, 120.0)[i % 2], "photons": None,
                         "image_scale": 16.0 / 65535, "output": "line_integral", "detector": "ideal"})
        sink.write_shard(f"sw-{vid}", np.stack(imgs), rows,
                         {"mlflow_run_id": run_id, "spec_sha256": "ab" * 32, "sweep_id": "sw"})


@pytest.mark.slow  # ~30-35 s on 2 busy cores: Ray Train start-up and shutdown, MLflow SQLite set-up
def test_train_pose_two_epochs_loss_decreases_and_links_dataset(ray_local, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from drrfarm.tracking.store import resolve_tracking_uri
    from drrfarm.tracking.tracker import open_tracker

    url = str(tmp_path / "sweep")
    tracker = open_tracker(True, "drrfarm-pose-test", None, url, "ab" * 32)  # the sweep's provenance run
    tracker.flush()
    dataset_run = tracker.run_id
    assert dataset_run
    make_pose_dataset(url, dataset_run)
    tracker.finish(status="FINISHED")

    job = load_job()
    out = tmp_path / "summary.json"
    rc = job.main(["--dataset", url, "--epochs", "2", "--batch-size", "8", "--image-size", "32",
                   "--val-fraction", "0.34", "--storage-path", str(tmp_path / "ray_results"),
                   "--output-json", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    hist = summary["history"]
    assert len(hist) == 2 and hist[1]["train_loss"] < hist[0]["train_loss"]
    assert "val_loss" in hist[1] and hist[0]["train_images"] == 48  # 2 volumes x 24 images
    assert len(summary["val_volumes"]) == 1 and not set(summary["val_volumes"]) & set(summary["train_volumes"])
    assert summary["checkpoint"] and (Path(summary["checkpoint"]) / "model.pt").exists()

    # MLflow: same experiment as the dataset run, dataset linked as input and by tag, metrics per epoch
    client = MlflowClient(resolve_tracking_uri(None, url))
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.experiment_id == client.get_run(dataset_run).info.experiment_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["drrfarm.dataset_run_id"] == dataset_run
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and url in inputs[0].dataset.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1]
    assert run.data.params["train_volumes"] and run.data.params["dataset_run_id"] == dataset_run
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/pose_cnn.pt"]


def test_train_pose_bad_dataset(tmp_path, capsys):
    job = load_job()
    assert job.main(["--dataset", str(tmp_path / "nothing"), "--no-tracking"]) == 2
    assert "no committed shards" in capsys.readouterr().err


def test_train_pose_local_trainer_reports_throughput(ray_local, tmp_path):
    """--trainer local: the same loop in this process (no Ray Train, e.g. a Ray without ray.tune), fed by Ray Data
    (uint16 images made float on the device), with images/s per epoch and a checkpoint."""
    url = str(tmp_path / "sweep")
    make_pose_dataset(url, "", n_volumes=2, per_volume=12)
    job = load_job()
    out = tmp_path / "summary.json"
    rc = job.main(["--dataset", url, "--epochs", "2", "--batch-size", "8", "--image-size", "16", "--trainer", "local",
                   "--no-tracking", "--val-fraction", "0.5", "--materialize", "no",
                   "--storage-path", str(tmp_path / "results"), "--output-json", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    hist = summary["history"]
    assert summary["trainer"] == "local" and summary["workers"] == 1 and len(hist) == 2
    assert hist[0]["train_images"] == 12 and "val_loss" in hist[1]  # one volume each side
    assert hist[1]["train_images_per_s"] > 0 and "gpu_util_pct" not in hist[1]  # on CPU: no GPU sampling
    assert (Path(summary["checkpoint"]) / "model.pt").exists()


def test_steady_window_and_gpu_samples_count_only_the_middle_of_an_epoch() -> None:
    job = load_job()
    # 10 batches of 64 images; a slow start (the read's start-up) and a slow last batch (the drain)
    marks = [(2.0, 64)] + [(2.0 + 0.1 * i, 64 * (i + 1)) for i in range(1, 9)] + [(5.0, 640)]
    start, end, images = job.steady_window(marks)
    assert (start, images) == (2.0, 64 * 8) and end == pytest.approx(2.8)  # batches 1 (10 %) to 9 (90 %)
    assert images / (end - start) == pytest.approx(640.0)
    assert job.steady_window(marks[:2]) is None
    samples = [(1.0, 0.0), (2.1, 90.0), (2.5, 40.0), (2.7, 100.0), (4.0, 0.0)]
    assert job.utilisation_summary(samples, start, end) == (pytest.approx(230 / 3), pytest.approx(2 / 3))
    assert job.utilisation_summary(samples) == (pytest.approx(46.0), pytest.approx(0.4))
    nan = job.utilisation_summary([], start, end)
    assert all(v != v for v in nan)
