"""Test environment: loopback-only Ray, no telemetry, shared server fixtures, GPU tests skipped without a GPU."""

from __future__ import annotations

import os

# Must be set before Ray or MLflow are imported anywhere in the test session.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402

# `s3_server` (a real S3 server on 127.0.0.1) and `mlflow_server` (a real tracking server on 127.0.0.1).
pytest_plugins = ["s3server", "mlflow_server"]


def _gpu_available() -> bool:
    from drrfarm.render import cuda_available

    return cuda_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with pycuda (run `pytest -m gpu` on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
