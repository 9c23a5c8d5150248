"""Secret redaction: credentials (by environment variable, URL userinfo, query parameters and
key names) replaced by ``"***"`` in everything the tracker logs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any
from urllib.parse import quote

REDACTED = "***"

_SECRET_ENV_NAMES = frozenset(
    {
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
    }
)
# *_TOKEN, *SECRET*, *_PASSWORD (and a few obvious key/credential names).
_SECRET_ENV_NAME_RE = re.compile(
    r"(^|_)(TOKEN|PASSWORD|PASSWD)$|SECRET|(^|_)(API|ACCESS|PRIVATE)_?KEY($|_)|CONNECTION_STRING$", re.I
)
# Values too generic to be a secret (a flag such as FOO_SECRET_ENABLED=1 must not blank out every "1").
_TRIVIAL_VALUES = frozenset({"true", "false", "yes", "no", "none", "null", "on", "off"})
_MIN_SECRET_CHARS = 4  # shorter values are ignored
_MIN_SUBSTRING_SECRET_CHARS = 8  # shorter values are only redacted where a whole string equals them

# scheme://userinfo@host -> scheme://***@host (userinfo may hold unescaped '@'; stops at / ? # quotes space)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s\"'<>\\]*@")
# ?X-Amz-Signature=...&token=... -> value blanked
_QUERY_SECRET_RE = re.compile(
    r"(?P<key>[?&;][^=&#\s\"']*(?:token|signature|sig|secret|passw(?:or)?d|pwd|credential|api[_-]?key"
    r"|access[_-]?key)[^=&#\s\"']*=)[^&#\s\"']*",
    re.I,
)
# Mapping keys / "key: value" lines whose value is a secret by name.
_SECRET_KEY_WORDS = r"(?:secret|passw(?:or)?d|token|credential|api[_-]?key|access[_-]?key|private[_-]?key)"
SECRET_KEY_RE = re.compile(_SECRET_KEY_WORDS, re.I)
_SECRET_LINE_RE = re.compile(
    r"(?im)^(?P<key>[ \t\-]*[\"']?[\w.\-]*" + _SECRET_KEY_WORDS + r"[\w.\-]*[\"']?[ \t]*[:=][ \t]*)\S.*$"
)


def is_secret_env_name(name: str) -> bool:
    """True if the environment variable ``name`` holds a credential (its value is redacted)."""
    return name.upper() in _SECRET_ENV_NAMES or bool(_SECRET_ENV_NAME_RE.search(name))


def secret_values() -> tuple[list[str], set[str]]:
    """(substring secrets longest first, whole-string secrets) from the current environment."""
    subs: set[str] = set()
    whole: set[str] = set()
    for name, value in os.environ.items():
        if not value or not is_secret_env_name(name):
            continue
        value = value.strip()
        if len(value) < _MIN_SECRET_CHARS or value.lower() in _TRIVIAL_VALUES:
            continue
        whole.add(value)
        if len(value) >= _MIN_SUBSTRING_SECRET_CHARS:
            subs.add(value)
            encoded = quote(value, safe="")
            if encoded != value:
                subs.add(encoded)
    return sorted(subs, key=len, reverse=True), whole


def redact_str(text: str, secrets: tuple[list[str], set[str]]) -> str:
    subs, whole = secrets
    if text.strip() in whole:
        return REDACTED
    for value in subs:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _USERINFO_RE.sub(r"\g<scheme>" + REDACTED + "@", text)
    text = _QUERY_SECRET_RE.sub(r"\g<key>" + REDACTED, text)
    return _SECRET_LINE_RE.sub(r"\g<key>" + REDACTED, text)


def redact_obj(obj: Any, secrets: tuple[list[str], set[str]]) -> Any:
    if isinstance(obj, str):
        return redact_str(obj, secrets)
    if isinstance(obj, PurePath):
        return redact_str(str(obj), secrets)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            new_key = redact_str(key, secrets) if isinstance(key, str) else key
            if (
                isinstance(key, str)
                and SECRET_KEY_RE.search(key)
                and not isinstance(value, (Mapping, list, tuple))
                and value is not None
            ):
                out[new_key] = REDACTED
            else:
                out[new_key] = redact_obj(value, secrets)
        return out
    if isinstance(obj, tuple):
        return tuple(redact_obj(v, secrets) for v in obj)
    if isinstance(obj, (list, set, frozenset)):
        return [redact_obj(v, secrets) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return redact_obj(dataclasses.asdict(obj), secrets)
    return obj


def redact(obj: Any) -> Any:
    """Return ``obj`` with credentials replaced by ``"***"``.

    Strings (also inside dicts, lists, tuples, paths, dataclasses) lose: any occurrence of the value of
    a secret environment variable (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_ACCESS_KEY_ID``, ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``*_TOKEN``,
    ``*SECRET*``, ``*_PASSWORD``, ...), URL userinfo (``s3://key:secret@bucket`` ->
    ``s3://***@bucket``), secret-looking query parameters (``?X-Amz-Signature=...``) and the values of
    mapping keys / ``key: value`` lines named like a secret (``password``, ``token``, ``access_key``).
    Dataclasses and sets come back as dicts and lists; other objects are returned unchanged.
    """
    return redact_obj(obj, secret_values())
