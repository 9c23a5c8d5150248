"""Input names: what a CT, label map or table argument may be, and the local path or URL it opens.

An input is ``sample:<name>`` (a sample dataset of :mod:`drrfarm.samples.downloads`, fetched and
cached on first use), a local path, or an fsspec URL (``s3://...``, ``file://...``). The readers
(:func:`drrfarm.volume.load_volume`, ...) take paths and URLs; :func:`resolve_input` is the one place
that turns a ``sample:`` name into a path, called by every load path that accepts input names
(:func:`drrfarm.api.load_ct`, ``drrfarm render``, the farm's workers).
"""

from __future__ import annotations

import os

from drrfarm.errors import SampleDataError
from drrfarm.samples.downloads import SAMPLES

__all__ = ["SAMPLE_PREFIX", "resolve_input", "sample_name"]

SAMPLE_PREFIX = "sample:"


def sample_name(path: str | os.PathLike[str]) -> str | None:
    """The dataset name of ``sample:<name>``, or None when ``path`` names no sample."""
    text = str(path)
    return text[len(SAMPLE_PREFIX) :] if text.startswith(SAMPLE_PREFIX) else None


def resolve_input(path: str | os.PathLike[str], relpath: str | None = None) -> str | os.PathLike[str]:
    """The local path or URL to open for an input name.

    ``sample:<name>`` -> the local path of that sample (downloaded and verified on first use; an unknown
    name raises :class:`~drrfarm.errors.SampleDataError`); a URL is returned as is; a local path missing
    on this node falls back to ``relpath`` under the current directory when that exists. Anything else
    is returned unchanged.
    """
    name = sample_name(path)
    if name is not None:
        if name not in SAMPLES:
            raise SampleDataError(f"{path}: unknown sample {name!r}; known samples: {sorted(SAMPLES)}")
        return str(SAMPLES[name]())
    if "://" in str(path):
        return path
    if relpath and not os.path.exists(path) and os.path.exists(relpath):
        return os.path.abspath(relpath)
    return path
