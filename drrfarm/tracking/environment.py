"""The driver's environment as run tags: drrfarm version and git commit, Python, library versions, GPUs."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
from pathlib import Path

from drrfarm import __version__

_ENV_TAGS_CACHE: dict[str, str] | None = None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_info() -> dict[str, str]:
    """Commit (and dirty flag) of the git checkout holding this package, if any."""
    pkg_dir = Path(__file__).resolve().parents[1]  # the drrfarm package

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                ["git", "-C", str(pkg_dir), *args], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    # Only trust the repository if it actually tracks this package (not e.g. a venv inside a repo).
    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {}
    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    info = {"drrfarm.git_commit": commit, "mlflow.source.git.commit": commit}
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        info["drrfarm.git_dirty"] = "true" if status else "false"
    return info


def environment_tags() -> dict[str, str]:
    """Versions and hardware of the driver: drrfarm, git commit, Python, ray, pycuda, CUDA, torch, GPUs.

    Cached per process. GPU names come from ``torch.cuda`` when it sees GPUs (the driver may have none;
    the farm can add the workers' GPUs with :meth:`Tracker.log_tags`).
    """
    global _ENV_TAGS_CACHE
    if _ENV_TAGS_CACHE is not None:
        return dict(_ENV_TAGS_CACHE)
    tags: dict[str, str] = {
        "drrfarm.version": str(__version__),
        "python.version": platform.python_version(),
        "python.implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    tags.update(_git_info())
    for dist in ("ray", "pycuda", "torch", "mlflow", "mlflow-skinny", "numpy"):
        version = _dist_version(dist)
        if version:
            tags[f"{dist}.version"] = version
    with contextlib.suppress(Exception):
        import torch

        if torch.version.cuda:
            tags["cuda.version"] = str(torch.version.cuda)
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            tags["gpu.count"] = str(len(names))
            tags["gpu.names"] = json.dumps(names)
    if "pycuda.version" in tags:
        with contextlib.suppress(Exception):
            import pycuda.driver as cuda_driver

            tags["cuda.driver_version"] = str(cuda_driver.get_driver_version())
            tags["pycuda.cuda_version"] = ".".join(str(v) for v in cuda_driver.get_version())
    tags.setdefault("gpu.names", "[]")
    _ENV_TAGS_CACHE = tags
    return dict(tags)
