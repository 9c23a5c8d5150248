"""Params, metrics and tags as MLflow takes them: flattened keys made MLflow-safe, values as text,
redacted and truncated to MLflow's limits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from drrfarm.tracking.redaction import REDACTED, SECRET_KEY_RE, redact_obj, redact_str, secret_values

log = logging.getLogger(__name__)

#: MLflow limits (mlflow.utils.validation): value lengths and key length.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_KEY_CHARS = 250

_KEY_BAD_CHARS_RE = re.compile(r"[^\w.\- ]")


def safe_key(key: str) -> str:
    """An MLflow-valid param/metric/tag key: [A-Za-z0-9_.- ], not '.'/'..', at most 250 chars."""
    key = _KEY_BAD_CHARS_RE.sub("_", str(key)).strip() or "_"
    if key in (".", ".."):
        key = "_"
    if len(key) > MAX_KEY_CHARS:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_CHARS - 9]}_{digest}"
    return key


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` chars, with a marker saying how long it was."""
    if len(text) <= limit:
        return text
    marker = f"...[truncated, {len(text)} chars]"
    return text[: limit - len(marker)] + marker


def json_default(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return str(obj)


def value_str(value: Any) -> str:
    """Param/tag text of one value: strings as is, scalars and lists as JSON."""
    if isinstance(value, str):
        return value
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return json.dumps(value, default=json_default, allow_nan=True)
    except (TypeError, ValueError):
        return str(value)


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``{"a.b.c": "value"}``; lists become JSON strings.

    Values are redacted and truncated to MLflow's param limit (6000 chars); keys are made MLflow-safe.
    """
    secrets = secret_values()
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
            return
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            walk(dataclasses.asdict(node), path)
            return
        key = safe_key(path or "value")
        if (
            SECRET_KEY_RE.search(path.rsplit(".", 1)[-1])
            and node is not None
            and not isinstance(node, (list, tuple, Mapping))
        ):
            out[key] = REDACTED
            return
        text = value_str(redact_obj(node, secrets))
        out[key] = truncate(redact_str(text, secrets), MAX_PARAM_VALUE_CHARS)

    walk(obj, prefix)
    return out


def flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, path))
            continue
        try:
            out[safe_key(path)] = float(value)
        except (TypeError, ValueError):
            log.warning("tracking: metric %r is not a number (%r); not logged", path, type(value).__name__)
    return out


def json_text(obj: Any) -> str:
    """Redacted, indented JSON text of ``obj``."""
    secrets = secret_values()
    text = json.dumps(redact_obj(obj, secrets), indent=2, default=json_default, allow_nan=True)
    return redact_str(text, secrets)
