"""Example training job: a small CNN regressing the C-arm angles (alpha, beta) from the DRRs of a sweep.

Locally (starts a private Ray on 127.0.0.1; CPU unless the machine has a GPU)::

    python jobs/train_pose.py --dataset ./drrfarm-demo        # 30 epochs, about 2 minutes on 2 cores

On a cluster, one Ray Train worker per GPU (``--workers`` defaults to the cluster's GPU count)::

    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/train_pose.py --dataset s3://bucket/datasets/run1 --tracking-uri http://mlflow:5000 \
            --storage-path s3://bucket/ray-train

What it does: reads the dataset with :func:`drrfarm.data.read_drrs` (the stored uint16 images, only
committed shards), splits it by patient (:func:`drrfarm.data.split_by_volume` -- a single-volume
dataset such as the demo has no validation split), normalises the angles to about [-1, 1] from the
training rows' range, and trains with Ray Train's ``TorchTrainer`` (``ray.train.get_dataset_shard``
feeds each worker its share). The uint16 images and their scales go to the worker's device, where
:func:`drrfarm.data.to_float_line_integrals` makes the float32 line integrals (half the bytes through the
loader and PCIe); images are then resized to ``--image-size`` and standardised per image.

``--trainer local`` runs the same loop in this process on one device (GPU 0), Ray Data still reading and
decoding on the cluster's CPUs -- for one-GPU machines and Ray installs without ``ray.tune``, which Ray
Train's worker API imports (``auto``, the default, picks it then).

``--stream SPEC`` trains on a sweep spec rendered on the fly instead of a stored dataset
(:func:`drrfarm.data.stream_split_by_volume`: the farm's render actors, one per GPU -- sharing it with a Ray
Train worker -- or on the CPUs the trainer leaves; the same images, seeds and columns as the stored sweep of
that spec, nothing written; every epoch renders again)::

    python jobs/train_pose.py --stream jobs/specs/example.yaml --trainer local

Throughput: every epoch reports ``train_images_per_s`` and, on a GPU, ``gpu_util_pct`` (mean of the GPU's
utilisation sampled by ``nvidia-smi`` every 0.2 s while the epoch trains) and ``gpu_busy_frac`` (share of
those samples at >= 50 %); the ``steady_`` twins of all three count only the middle of the epoch, from the batch
that completes 10 % of its images to the one that completes 90 % (without the read's start-up and the pipeline's
drain, which a short epoch magnifies). The loss is summed on the device, so the loop never waits for the GPU;
batches arrive in pinned host memory (``--no-pin-memory`` turns it off), so their copy to the GPU is a DMA that
does not hold the host thread.

Provenance: an MLflow run in the *dataset's* experiment (found from the dataset's provenance run,
whose id is in the Parquet file metadata / manifest; ``--experiment`` overrides), with the arguments,
split and normalisation as params, per-epoch metrics, the model weights as an artifact, the dataset
as its input (``mlflow.log_input``, source = the dataset URL) and the tag ``drrfarm.dataset_run_id``.
The tracking URI defaults to the one the sweep used (``MLFLOW_TRACKING_URI``, else the SQLite store
under a local dataset folder); give ``--tracking-uri`` on a cluster. Metrics are logged by this
driver process after training (from the rank-0 worker's history), so workers need no MLflow access.

Exit status: 0 trained, 2 bad arguments/dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("drrfarm.train_pose")

TARGETS = ("alpha_deg", "beta_deg")
DATASET_RUN_TAG = "drrfarm.dataset_run_id"
MATERIALIZE_AUTO_BYTES = 1 << 30
GPU_SAMPLE_MS = 200


# ---------------------------------------------------------------------------------------------------------
# Model and per-batch preprocessing (run on the workers)


def build_model(width: int = 16) -> Any:
    """A small CNN: 4 x (conv 3x3, GroupNorm, ReLU, stride-2) -> global average -> linear (2 outputs)."""
    import torch.nn as nn

    chans = [1, width, 2 * width, 4 * width, 4 * width]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans[:-1], chans[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, cout),
                   nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], len(TARGETS))]
    return nn.Sequential(*layers)


def preprocess(images: Any, image_size: int) -> Any:
    """(B, H, W) float line integrals -> (B, 1, S, S), area-resized and standardised per image."""
    import torch.nn.functional as F

    x = images.float().unsqueeze(1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return (x - mean) / std


def targets(batch: dict[str, Any], norm: dict[str, list[float]]) -> Any:
    """(B, 2) normalised (alpha, beta): (angle - centre) / half_range."""
    import torch

    cols = [(batch[name].float() - norm["centre"][i]) / norm["half_range"][i] for i, name in enumerate(TARGETS)]
    return torch.stack(cols, dim=1)


def utilisation_summary(samples: Sequence[tuple[float, float]], start: float = -math.inf, end: float = math.inf
                        ) -> tuple[float, float]:
    """(mean %, share of samples >= 50 %) of the (time, utilisation %) samples taken in [start, end]; NaN if none."""
    got = [v for t, v in samples if start <= t <= end]
    if not got:
        return float("nan"), float("nan")
    return sum(got) / len(got), sum(v >= 50 for v in got) / len(got)


def steady_window(marks: Sequence[tuple[float, int]], lo: float = 0.1, hi: float = 0.9
                  ) -> tuple[float, float, int] | None:
    """(start, end, images) between the batches that complete ``lo`` and ``hi`` of an epoch's images;
    ``marks``: (time, images so far) per batch. None for an epoch of fewer than three batches."""
    if len(marks) < 3:
        return None
    total = marks[-1][1]
    a = next(m for m in marks if m[1] >= lo * total)
    b = next(m for m in marks if m[1] >= hi * total)
    return (a[0], b[0], b[1] - a[1]) if b[0] > a[0] else None


class GpuUtilisation:
    """Samples one GPU's utilisation (``nvidia-smi -lms``, else ``torch.cuda.utilization``) in the background;
    :meth:`take` returns the (time.perf_counter(), utilisation %) samples since the previous call."""

    def __init__(self, device: Any) -> None:
        import subprocess
        import threading

        self.samples: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.proc = None
        self.device = device
        gpu = str(device.index or 0)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if visible and visible[0] and int(gpu) < len(visible):
            gpu = visible[int(gpu)].strip()  # the physical GPU (index or UUID) behind the visible one
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", gpu,
                 "-lms", str(GPU_SAMPLE_MS)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True, name="gpu-utilisation")
        self.thread.start()

    def _read(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            for line in self.proc.stdout:
                try:
                    v = float(line.strip())
                except ValueError:
                    continue
                with self.lock:
                    self.samples.append((time.perf_counter(), v))
            return
        import torch

        while not self.stop.wait(GPU_SAMPLE_MS / 1000):
            try:
                v = float(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no NVML: no samples
                return
            with self.lock:
                self.samples.append((time.perf_counter(), v))

    def take(self) -> list[tuple[float, float]]:
        with self.lock:
            got, self.samples = self.samples, []
        return got

    def close(self) -> None:
        self.stop.set()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def fit(config: dict[str, Any], train_data: Any, val_data: Any, device: Any, *, rank: int = 0, world: int = 1,
        prepare_model: Any = None, report: Any = None) -> tuple[list[dict[str, float]], Any]:
    """The training loop, shared by the Ray Train workers and ``--trainer local``: (per-epoch history, model).

    ``train_data`` / ``val_data``: anything with Ray Data's ``iter_torch_batches`` (a dataset shard or a
    ``ray.data.Dataset``; ``val_data`` may be None). ``report(metrics, model, last)`` is called after every
    epoch (Ray Train: ``ray.train.report`` with the last checkpoint).
    """
    import torch
    import torch.distributed as dist

    from drrfarm.data import to_float_line_integrals

    torch.manual_seed(int(config["seed"]))
    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes
    model = build_model(int(config["width"])).to(device)
    if prepare_model is not None:
        model = prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    norm = config["norm"]
    size = int(config["image_size"])
    bs = int(config["batch_size"])
    augment = None
    if config.get("augment"):
        from drrfarm.augment import XrayAugment

        augment = XrayAugment(blur_sigma_px=(0.0, 1.0), photons=(2e3, 5e4), p=0.5,
                              seed=int(config["seed"]) * 1000 + rank)

    def reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(t)
        return t.tolist()

    prefetch = int(config.get("prefetch_batches") or 4)
    pin = device.type == "cuda" and bool(config.get("pin_memory", True))
    monitor = GpuUtilisation(device) if device.type == "cuda" and rank == 0 else None
    history: list[dict[str, float]] = []
    try:
        for epoch in range(int(config["epochs"])):
            t0 = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            n = 0
            marks: list[tuple[float, int]] = []  # (time, images so far) after each step is queued
            if monitor is not None:
                monitor.take()
            for batch in train_data.iter_torch_batches(
                batch_size=bs, device=device, prefetch_batches=prefetch, pin_memory=pin,
                local_shuffle_buffer_size=int(config["shuffle_buffer"]) or None,
                local_shuffle_seed=int(config["seed"]) + epoch if config["shuffle_buffer"] else None,
            ):
                images = to_float_line_integrals(batch)  # uint16 x scale, on the device
                if augment is not None:
                    images = augment(images, batch.get("photons"))
                x = preprocess(images, size)
                y = targets(batch, norm)
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(y)
                n += len(y)
                marks.append((time.perf_counter(), n))
            train_s = time.perf_counter() - t0
            tot_loss, tot_n = reduce([float(loss_sum), float(n)])
            metrics: dict[str, float] = {"epoch": float(epoch), "train_loss": tot_loss / max(tot_n, 1.0),
                                         "train_images": tot_n, "train_s": train_s,
                                         "train_images_per_s": tot_n / max(train_s, 1e-9)}
            window = steady_window(marks)
            if window is not None:
                metrics["steady_images_per_s"] = window[2] / (window[1] - window[0])
            if monitor is not None:
                samples = monitor.take()
                util, busy = utilisation_summary(samples)
                metrics.update(gpu_util_pct=util, gpu_busy_frac=busy)
                if window is not None:
                    util, busy = utilisation_summary(samples, window[0], window[1])
                    metrics.update(steady_gpu_util_pct=util, steady_gpu_busy_frac=busy)
            if val_data is not None:
                model.eval()
                sums = [0.0, 0.0, 0.0, 0.0]  # loss*n, n, |d alpha| deg, |d beta| deg
                with torch.no_grad():
                    for batch in val_data.iter_torch_batches(batch_size=bs, device=device, prefetch_batches=prefetch):
                        y = targets(batch, norm)
                        pred = model(preprocess(to_float_line_integrals(batch), size))
                        sums[0] += float(torch.nn.functional.mse_loss(pred, y)) * len(y)
                        sums[1] += len(y)
                        err = (pred - y).abs()
                        sums[2] += float(err[:, 0].sum()) * norm["half_range"][0]
                        sums[3] += float(err[:, 1].sum()) * norm["half_range"][1]
                s = reduce(sums)
                if s[1] > 0:
                    metrics.update(val_loss=s[0] / s[1], val_mae_alpha_deg=s[2] / s[1],
                                   val_mae_beta_deg=s[3] / s[1])
            metrics["epoch_s"] = time.perf_counter() - t0
            history.append(metrics)
            if report is not None:
                report(metrics, model, epoch == int(config["epochs"]) - 1)
    finally:
        if monitor is not None:
            monitor.close()
    return history, model


def _model_blob(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    return {"state_dict": getattr(model, "module", model).state_dict(), "norm": config["norm"],
            "width": int(config["width"]), "image_size": int(config["image_size"])}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker loop: returns (rank 0) the per-epoch history and the final weights."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(metrics: dict[str, float], model: Any, last: bool) -> None:
        checkpoint = None
        with tempfile.TemporaryDirectory(prefix="drrfarm-pose-") as tmp:
            if last and rank == 0:
                torch.save(_model_blob(model, config), os.path.join(tmp, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    history, model = fit(config, ray.train.get_dataset_shard("train"),
                         ray.train.get_dataset_shard("val") if config["has_val"] else None,
                         ray.train.torch.get_device(), rank=rank, world=world,
                         prepare_model=ray.train.torch.prepare_model, report=report)
    # Ray Train cannot return torch tensors from workers: numpy arrays instead
    state = {k: v.detach().cpu().numpy() for k, v in getattr(model, "module", model).state_dict().items()}
    return {"history": history, "state_dict": state if rank == 0 else None}


def fit_local(config: dict[str, Any], datasets: dict[str, Any], use_gpu: bool, out_dir: str) -> dict[str, Any]:
    """``--trainer local``: the same loop in this process on one device (GPU 0 with ``use_gpu``), Ray Data still
    reading and decoding on the cluster; no Ray Train (whose worker API needs ``ray.tune``, absent from slim
    Ray installs). Returns what a Ray Train worker returns, plus the checkpoint folder (``out_dir``)."""
    import torch

    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    history, model = fit(config, datasets["train"], datasets.get("val"), device)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(_model_blob(model, config), os.path.join(out_dir, "model.pt"))
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return {"history": history, "state_dict": state, "checkpoint": out_dir}


# ---------------------------------------------------------------------------------------------------------
# Driver


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_pose.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=None, help="dataset URL (the sweep's output: path, file://, s3://...)")
    p.add_argument("--stream", default=None, metavar="SPEC",
                   help="instead of --dataset: a sweep spec, rendered on the fly by the farm's actors while training "
                        "(drrfarm.data.stream_drrs; nothing stored, every epoch rendered again)")
    p.add_argument("--stream-actors", type=int, default=None,
                   help="--stream: render actors (default: one per GPU, else the CPUs the trainer leaves)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers (default: one per GPU of the cluster, else 1)")
    p.add_argument("--use-gpu", choices=("auto", "true", "false"), default="auto",
                   help="auto: GPUs if the Ray cluster has any")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this square size")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of volumes (patients) held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=256, help="rows in Ray Data's local shuffle buffer (0: off)")
    p.add_argument("--prefetch-batches", type=int, default=4, help="batches iter_torch_batches prepares ahead")
    p.add_argument("--no-pin-memory", dest="pin_memory", action="store_false",
                   help="on a GPU: do not pin the batches' host memory before their copy to the device")
    p.add_argument("--augment", action="store_true", help="detector blur + Poisson re-noising on the fly")
    p.add_argument("--materialize", choices=("auto", "yes", "no"), default="auto",
                   help="keep the decoded dataset in the Ray object store after the first read "
                        f"(auto: when it is under {MATERIALIZE_AUTO_BYTES >> 20} MiB decoded)")
    p.add_argument("--filter", default=None, metavar="JSON",
                   help='rows to use, e.g. \'{"kvp": [120]}\' (see drrfarm.data.read_drrs)')
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the dataset's)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the dataset's local SQLite store)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--trainer", choices=("auto", "ray", "local"), default="auto",
                   help="ray: Ray Train workers (one per GPU); local: this process on one device, Ray Data still "
                        "feeding it; auto: ray when ray.tune is installed (Ray Train's worker API needs it)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train storage for checkpoints (shared path or s3://; default Ray's ~/ray_results)")
    p.add_argument("--run-name", default=None, help="Ray Train / MLflow run name")
    p.add_argument("--output-json", default=None, help="also write the summary to this local JSON file")
    return p


def _connect_ray(address: str | None) -> bool:
    """Connect to Ray; True if this call started a private local instance (shut down at the end)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        return True
    ray.init(address=address, logging_level="WARNING")
    return False


def angle_normalisation(meta: dict[str, Any]) -> dict[str, list[float]]:
    """Centre and half range of each target over the training rows (half range 1 for a constant angle)."""
    import numpy as np

    centre, half = [], []
    for name in TARGETS:
        v = np.asarray(meta[name], np.float64)
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"the dataset has no C-arm {name} for some rows (explicit P matrices?): "
                             "this example regresses C-arm angles")
        lo, hi = float(v.min()), float(v.max())
        centre.append((lo + hi) / 2)
        half.append((hi - lo) / 2 if hi > lo else 1.0)
    return {"centre": centre, "half_range": half}


def dataset_digest(url: str) -> str:
    """Short content digest of the committed shards (shard ids and file checksums of the manifest)."""
    from drrfarm.data import open_dataset_store
    from drrfarm.sinks import read_manifest

    h = hashlib.sha256()
    for sid, entry in read_manifest(open_dataset_store(url)).items():
        h.update(sid.encode())
        for key in sorted(entry.sha256):
            h.update(entry.sha256[key].encode())
    return h.hexdigest()[:16]


def _artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts next to the database (as drrfarm.tracking does); else the server's."""
    from pathlib import Path

    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:":
            return (Path(db).resolve().parent / "mlartifacts").as_uri()
    return None


class _Mlflow:
    """The training run in MLflow (driver side only)."""

    def __init__(self, tracking_uri: str, experiment: str | None, info: dict[str, Any], run_name: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri)
        dataset_run = info.get("mlflow_run_id") or ""
        exp_id = None
        if experiment is None and dataset_run:
            try:
                exp_id = client.get_run(dataset_run).info.experiment_id
            except Exception as exc:  # noqa: BLE001 - the dataset may come from another MLflow store
                log.warning("dataset run %s not found at %s (%s); using experiment 'drrfarm'", dataset_run,
                            tracking_uri, type(exc).__name__)
        if exp_id is None:
            from drrfarm.tracking.tracker import DEFAULT_EXPERIMENT

            name = experiment or DEFAULT_EXPERIMENT
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                name, artifact_location=_artifact_root(tracking_uri))
        self.experiment_id = str(exp_id)
        self.run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name)
        self.run_id = self.run.info.run_id

    def log_start(self, params: dict[str, Any], info: dict[str, Any], digest: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        mlflow = self.mlflow
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in params.items()})
        mlflow.set_tags({DATASET_RUN_TAG: info.get("mlflow_run_id") or "", "drrfarm.dataset_url": info["url"],
                         "drrfarm.task": "pose_regression", "drrfarm.dataset_spec_sha256": info.get("spec_sha256", "")})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(info["url"])
            name = info["url"].rstrip("/").rsplit("/", 1)[-1] or "drrfarm-dataset"
            mlflow.log_input(MetaDataset(source, name=name, digest=digest), context="training",
                             tags={"drrfarm.dataset_run_id": info.get("mlflow_run_id") or "",
                                   "drrfarm.rows": str(info["rows"])})
        except Exception as exc:  # noqa: BLE001 - an exotic URL scheme must not stop training
            log.warning("could not log the dataset input (%s); the tag %s still links it", exc, DATASET_RUN_TAG)

    def log_result(self, history: list[dict[str, float]], model_blob: dict[str, Any] | None) -> None:
        import torch

        for step, m in enumerate(history):
            self.mlflow.log_metrics({k: float(v) for k, v in m.items() if k != "epoch" and math.isfinite(v)},
                                    step=step)
        if model_blob is not None:
            with tempfile.TemporaryDirectory(prefix="drrfarm-pose-") as tmp:
                path = os.path.join(tmp, "pose_cnn.pt")
                torch.save(model_blob, path)
                self.mlflow.log_artifact(path, artifact_path="model")

    def end(self, status: str) -> None:
        self.mlflow.end_run(status=status)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the summary (history, run ids, split, normalisation)."""
    import importlib.util

    import ray

    from drrfarm.data import dataset_info, read_drrs, read_metadata, stream_info, stream_metadata, volume_split

    info = stream_info(args.stream) if args.stream else dataset_info(args.dataset)
    url = info["url"]
    user_filter = json.loads(args.filter) if args.filter else None
    train_ids, val_ids = volume_split(info["volume_ids"], args.val_fraction, args.seed)
    if args.stream:  # the angles of the spec's poses (the plan: nothing rendered)
        norm = angle_normalisation(stream_metadata(args.stream, volume_ids=train_ids))
    else:
        norm = angle_normalisation(read_metadata(url, list(TARGETS), filter=user_filter, volume_ids=train_ids))

    started = _connect_ray(args.address)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        use_gpu = {"true": True, "false": False}.get(args.use_gpu, gpus > 0)
        trainer_kind = args.trainer
        if trainer_kind == "auto":
            trainer_kind = "ray" if importlib.util.find_spec("ray.tune") is not None else "local"
            if trainer_kind == "local":
                log.warning("Ray Train needs ray.tune, which this Ray install lacks: training in this process")
        workers = 1 if trainer_kind == "local" else (args.workers or (int(gpus) if use_gpu and gpus >= 1 else 1))
        if trainer_kind == "local" and use_gpu:
            import torch

            use_gpu = torch.cuda.is_available()
        columns = [*TARGETS, "image_scale", *(["photons"] if args.augment else [])]

        def side(ids: list[str]) -> Any:
            flt = {"volume_id": ids}
            if user_filter:
                flt.update({k: v for k, v in user_filter.items() if k != "volume_id"})
            return read_drrs(url, columns, filter=flt)  # stored uint16: made float on the device

        if args.stream:
            # rendered by the farm's actors: a GPU each, shared with its Ray Train worker (half each); on CPUs the
            # cores the trainer leaves
            cpus = int(ray.cluster_resources().get("CPU", 1))
            share = 0.5 if use_gpu and trainer_kind == "ray" else 1.0
            left = cpus - (workers if trainer_kind == "ray" else 0)
            actors = args.stream_actors or (None if use_gpu else max(1, left))
            from drrfarm.data import stream_split_by_volume

            train, val = stream_split_by_volume(args.stream, args.val_fraction, args.seed, columns, actors=actors,
                                                gpus_per_actor=share)
            datasets = {"train": train, **({"val": val} if val_ids else {})}
        else:
            datasets = {"train": side(train_ids)}
            if val_ids:
                datasets["val"] = side(val_ids)
        if not val_ids:
            log.warning("%d volume(s) in the dataset: no patient-level validation split; training on all",
                        len(train_ids))
        decoded = info["rows"] * max(info["height"]) * max(info["width"]) * 2  # uint16 in the object store
        if args.materialize == "yes" or (args.materialize == "auto" and decoded <= MATERIALIZE_AUTO_BYTES
                                          and not args.stream):
            # read and decode once; every epoch then streams from the object store
            datasets = {k: v.materialize() for k, v in datasets.items()}
        run_name = args.run_name or f"train_pose-{time.strftime('%Y%m%d-%H%M%S')}"
        config = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "width": args.width,
                  "image_size": args.image_size, "seed": args.seed, "shuffle_buffer": args.shuffle_buffer,
                  "prefetch_batches": args.prefetch_batches, "pin_memory": args.pin_memory,
                  "augment": args.augment, "norm": norm, "has_val": bool(val_ids),
                  "torch_threads": None if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)}
        params = {"dataset": url, "stream": bool(args.stream), "epochs": args.epochs, "batch_size": args.batch_size,
                  "lr": args.lr,
                  "width": args.width, "image_size": args.image_size, "seed": args.seed, "workers": workers,
                  "use_gpu": use_gpu, "trainer": trainer_kind, "val_fraction": args.val_fraction,
                  "augment": args.augment,
                  "materialize": args.materialize,
                  "filter": user_filter or {}, "train_volumes": train_ids, "val_volumes": val_ids,
                  "angle_centre_deg": norm["centre"], "angle_half_range_deg": norm["half_range"],
                  "dataset_rows": info["rows"], "dataset_run_id": info.get("mlflow_run_id") or ""}

        tracker = None
        if not args.no_tracking:
            from drrfarm.tracking.store import resolve_tracking_uri

            uri = resolve_tracking_uri(args.tracking_uri, os.getcwd() if args.stream else url.removeprefix("file://"))
            tracker = _Mlflow(uri, args.experiment, info, run_name)
            tracker.log_start(params, info, info["spec_sha256"][:16] if args.stream else dataset_digest(url))
        status = "FAILED"
        try:
            if trainer_kind == "local":
                root = args.storage_path or os.path.join(os.path.expanduser("~"), "ray_results")
                ret = fit_local(config, datasets, use_gpu, os.path.join(root.removeprefix("file://"), run_name))
                checkpoint = ret["checkpoint"]
            else:
                import ray.train
                from ray.train.torch import TorchTrainer

                if __name__ != "__main__" and __name__ in sys.modules:  # imported (tests, notebooks): by value
                    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
                trainer = TorchTrainer(
                    train_loop_per_worker,
                    train_loop_config=config,
                    scaling_config=ray.train.ScalingConfig(
                        num_workers=workers, use_gpu=use_gpu,
                        resources_per_worker={"GPU": 0.5} if args.stream and use_gpu else None),
                    run_config=ray.train.RunConfig(name=run_name, storage_path=args.storage_path),
                    datasets=datasets,
                )
                result = trainer.fit()
                ret = result.return_value or {}
                checkpoint = result.checkpoint.path if result.checkpoint else None
            history = ret.get("history") or []
            blob = None
            if ret.get("state_dict") is not None:
                import torch

                state = {k: torch.from_numpy(v) for k, v in ret["state_dict"].items()}
                blob = {"state_dict": state, "norm": norm, "width": args.width,
                        "image_size": args.image_size, "targets": list(TARGETS)}
            if tracker is not None:
                tracker.log_result(history, blob)
            status = "FINISHED"
        finally:
            if tracker is not None:
                tracker.end(status)
    finally:
        if started:
            ray.shutdown()
    return {"dataset": url, "dataset_run_id": info.get("mlflow_run_id") or "", "history": history,
            "mlflow_run_id": tracker.run_id if tracker else None,
            "mlflow_experiment_id": tracker.experiment_id if tracker else None,
            "train_volumes": train_ids, "val_volumes": val_ids, "norm": norm, "workers": workers,
            "use_gpu": use_gpu, "trainer": trainer_kind, "checkpoint": checkpoint}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.dataset is None) == (args.stream is None) or (args.stream and args.filter):
        print("train_pose.py: error: give one of --dataset URL and --stream SPEC (--filter: --dataset only)",
              file=sys.stderr)
        return 2
    if args.epochs < 1 or args.batch_size < 1 or args.image_size < 8:
        print("train_pose.py: error: --epochs, --batch-size must be >= 1 and --image-size >= 8", file=sys.stderr)
        return 2
    from drrfarm.errors import DrrfarmError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (DrrfarmError, ValueError) as exc:
        print(f"train_pose.py: error: {exc}", file=sys.stderr)
        return 2
    for m in summary["history"]:
        print("epoch {epoch:.0f}: ".format(**m) + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "epoch"))
    line = {k: summary[k] for k in ("dataset", "dataset_run_id", "mlflow_run_id", "workers", "use_gpu", "trainer",
                                    "checkpoint")}
    print(json.dumps(line))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
