"""Shared pytest setup (created by the sinks helper because none existed; the lead owns this file)."""

from __future__ import annotations

import os

# Quiet, offline Ray/MLflow in tests (see the team contract).
for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_k, _v)

# The `s3_server` fixture (moto S3 on 127.0.0.1) from tests/s3server.py.
pytest_plugins = ["s3server"]
