"""Test environment: loopback-only Ray, no telemetry, shared server fixtures, GPU tests skipped without a GPU."""

from __future__ import annotations

import logging
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


@pytest.fixture(scope="module")
def ray_local():
    """A private Ray (``address="local"``: never a cluster someone else started on this machine) on 127.0.0.1
    with 2 CPUs, Ray Data's progress bars and INFO logs off; shut down after the module."""
    ray = pytest.importorskip("ray")
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield ray
    ray.shutdown()


def _gpu_available() -> bool:
    from drrfarm.render import cuda_available

    return cuda_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with pycuda (run `pytest -m gpu` on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
