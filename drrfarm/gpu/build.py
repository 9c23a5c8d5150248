"""Build the CUDA kernels once and cache the machine code on disk.

The package's kernels (:data:`KERNELS`): ``drr.cu`` and ``mesh.cu`` (``drrfarm/render/kernels/``),
``scatter.cu`` (``drrfarm/scatter/``); they include the shared headers of ``drrfarm/gpu/kernels/``
(:data:`INCLUDE_DIR`). A kernel's **key** hashes its source, every header it includes (recursively)
and its defines, so a change to any of them makes a new key.

A kernel image is found, in this order:

1. the **disk cache**: ``<cache>/cubin/<name>-<arch>-<key>-<compiler>.cubin``; ``<cache>`` is
   ``$DRRFARM_CACHE`` or ``~/.cache/drrfarm``;
2. a **prebuilt fat binary** shipped in the package (``drrfarm/gpu/prebuilt/<name>-<key>.fatbin``,
   made by ``python -m drrfarm.gpu.build --fatbin``: sm_80, sm_86, sm_89, sm_90 machine code plus
   compute_90 PTX that newer GPUs JIT-compile), used only when its key matches;
3. **nvcc** (``$CUDACXX``, ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on PATH): ``nvcc -cubin -arch=sm_XY``;
4. **NVRTC** through ``ctypes`` (``libnvrtc.so`` of a CUDA toolkit or of the ``nvidia-cuda-nvrtc`` wheel
   that PyTorch installs): the same source compiled in-process, no nvcc needed.

Results of 3 and 4 land in the disk cache, so a GPU node compiles at most once per kernel version
and architecture. A node needs the NVIDIA driver only, if a prebuilt fat binary or a warm cache is
there; otherwise nvcc or NVRTC once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from drrfarm.errors import BackendError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: The package's kernel sources by name.
KERNELS = {
    "drr.cu": PACKAGE_DIR / "render" / "kernels" / "drr.cu",
    "mesh.cu": PACKAGE_DIR / "render" / "kernels" / "mesh.cu",
    "scatter.cu": PACKAGE_DIR / "scatter" / "scatter.cu",
}
#: The shared headers (``shared.cuh``, ``params.cuh``), on every kernel's include path.
INCLUDE_DIR = Path(__file__).resolve().parent / "kernels"
PREBUILT_DIR = Path(__file__).resolve().parent / "prebuilt"
#: The kernels shipped as prebuilt fat binaries.
PREBUILT_KERNELS = ("drr.cu",)
NVCC_FLAGS = ("-O3", "-std=c++17")
FATBIN_ARCHS = (80, 86, 89, 90)
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def cache_root() -> Path:
    """drrfarm's cache folder: ``$DRRFARM_CACHE`` or ``~/.cache/drrfarm`` (as
    :func:`drrfarm.samples.downloads.cache_dir`)."""
    env = os.environ.get("DRRFARM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "drrfarm"


def cubin_cache_dir() -> Path:
    return cache_root() / "cubin"


def kernel_path(kernel: str | Path) -> Path:
    """The source file of ``kernel``: a name of :data:`KERNELS` or a path."""
    return KERNELS[kernel] if isinstance(kernel, str) and kernel in KERNELS else Path(kernel)


def kernel_source(kernel: str | Path = "drr.cu") -> str:
    path = kernel_path(kernel)
    try:
        return path.read_text()
    except OSError as exc:
        raise BackendError(f"backend 'cuda': kernel source {path} is missing ({exc})") from exc


def include_dirs(kernel: str | Path) -> list[Path]:
    """Where ``#include "..."`` of ``kernel`` is looked up: its own folder, then :data:`INCLUDE_DIR`."""
    return [kernel_path(kernel).resolve().parent, INCLUDE_DIR]


def kernel_files(kernel: str | Path) -> list[Path]:
    """``kernel``'s source and every header it includes with ``#include "..."`` (recursively, each once,
    in the order first included)."""
    dirs = include_dirs(kernel)
    files: list[Path] = []

    def visit(path: Path) -> None:
        if path in files:
            return
        files.append(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise BackendError(f"backend 'cuda': kernel source {path} is missing ({exc})") from exc
        for name in _INCLUDE.findall(text):
            found = next((d / name for d in [path.parent, *dirs] if (d / name).is_file()), None)
            if found is None:
                raise BackendError(f"backend 'cuda': {path.name} includes {name!r}, found in none of "
                                   f"{[str(d) for d in dirs]}")
            visit(found.resolve())

    visit(kernel_path(kernel).resolve())
    return files


def _define_flags(defines: dict[str, int | str] | None) -> list[str]:
    return [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]


def source_hash(kernel: str | Path, defines: dict[str, int | str] | None = None) -> str:
    """The key of ``kernel``: a hash of its source, every header it includes and its defines."""
    h = hashlib.sha256()
    for path in kernel_files(kernel):
        h.update(f"{path.name}\0".encode())
        h.update(path.read_bytes())
        h.update(b"\0")
    h.update("|".join(_define_flags(defines)).encode())
    return h.hexdigest()[:16]


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def nvcc_compile(source_path: Path, arch: str, defines: dict[str, int | str] | None = None, *,
                 nvcc: str | None = None, fatbin_archs: tuple[int, ...] | None = None,
                 out_path: Path | None = None) -> bytes:
    """Compile with nvcc to a cubin for ``arch`` (e.g. ``"sm_90"``), or to a fat binary for
    ``fatbin_archs`` (machine code for each plus PTX for the newest)."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise BackendError("backend 'cuda': nvcc not found (set CUDACXX or CUDA_HOME)")
    with tempfile.TemporaryDirectory(prefix="drrfarm-nvcc-") as tmp:
        out = Path(out_path) if out_path else Path(tmp) / "kernel.bin"
        cmd = [nvcc, *NVCC_FLAGS, *(f"-I{d}" for d in include_dirs(source_path)), *_define_flags(defines)]
        if fatbin_archs:
            cmd.append("-fatbin")
            for a in fatbin_archs:
                cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            top = max(fatbin_archs)
            cmd += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
        else:
            cmd += ["-cubin", f"-arch={arch}"]
        cmd += ["-o", str(out), str(source_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendError(f"backend 'cuda': nvcc failed on {source_path.name} ({' '.join(cmd)}):\n"
                               f"{proc.stderr.strip()[-4000:]}")
        return out.read_bytes()


# ---------------------------------------------------------------------------------------------- NVRTC

def find_nvrtc() -> str | None:
    """Path of a loadable libnvrtc (CUDA toolkit, or the nvidia-cuda-nvrtc wheel), or None."""
    cands: list[str] = []
    env = os.environ.get("DRRFARM_NVRTC")
    if env:
        cands.append(env)
    for base in {os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"}:
        if base:
            cands += sorted(glob.glob(os.path.join(base, "lib64", "libnvrtc.so*")))
            cands += sorted(glob.glob(os.path.join(base, "targets", "*", "lib", "libnvrtc.so*")))
    for entry in sys.path:
        nv = os.path.join(entry, "nvidia")
        if os.path.isdir(nv):
            cands += sorted(glob.glob(os.path.join(nv, "**", "libnvrtc.so*"), recursive=True))
    found = ctypes.util.find_library("nvrtc")
    if found:
        cands.append(found)
    for cand in cands:
        if "builtins" in os.path.basename(cand) or "alt" in os.path.basename(cand):
            continue
        try:
            ctypes.CDLL(cand)
            return cand
        except OSError:
            continue
    return None


def nvrtc_compile(source: str, arch: str, defines: dict[str, int | str] | None = None,
                  lib_path: str | None = None, kernel: str | Path = "drr.cu") -> bytes:
    """Compile ``source`` (the text of ``kernel``) to a cubin for ``arch`` with NVRTC (no nvcc needed);
    its headers come from :func:`include_dirs`."""
    path = lib_path or find_nvrtc()
    if not path:
        raise BackendError("backend 'cuda': neither nvcc nor libnvrtc found to compile the kernels")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()

    def ok(status: int, what: str) -> None:
        if status != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise BackendError(f"backend 'cuda': NVRTC {what} failed: {lib.nvrtcGetErrorString(status).decode()}")

    name = kernel_path(kernel).name.encode()
    ok(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name, 0, None, None), "create")
    try:
        opts = [f"--gpu-architecture={arch}", "-default-device", "-std=c++17",
                *(f"--include-path={d}" for d in include_dirs(kernel)), *_define_flags(defines)]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise BackendError(f"backend 'cuda': NVRTC compile failed ({path}):\n{log.value.decode()[-4000:]}")
        size = ctypes.c_size_t()
        ok(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "get cubin size")
        buf = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetCUBIN(prog, buf), "get cubin")
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------------------------------------- the lookup

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prebuilt_path(name: str | Path, defines: dict[str, int | str] | None = None) -> Path:
    """Where the prebuilt fat binary of kernel ``name`` with ``defines`` is (or would be)."""
    return PREBUILT_DIR / f"{kernel_path(name).stem}-{source_hash(name, defines)}.fatbin"


def load_kernel_image(name: str | Path, arch: str, defines: dict[str, int | str] | None = None,
                      order: tuple[str, ...] | None = None) -> tuple[bytes, str]:
    """Machine code for kernel ``name`` (of :data:`KERNELS`, or a path) on ``arch`` (``"sm_90"``):
    ``(image bytes, how)``.

    ``how`` is one of ``cache``, ``prebuilt``, ``nvcc``, ``nvrtc``. ``order`` (default from
    ``$DRRFARM_KERNEL_BUILD`` as a comma list, else all four) restricts and orders the sources.
    """
    source = kernel_source(name)
    if order is None:
        env = os.environ.get("DRRFARM_KERNEL_BUILD")
        order = tuple(s.strip() for s in env.split(",")) if env else ("cache", "prebuilt", "nvcc", "nvrtc")
    skey = source_hash(name, defines)
    stem = kernel_path(name).stem
    errors: list[str] = []
    for how in order:
        try:
            if how == "cache":
                for path in sorted(cubin_cache_dir().glob(f"{stem}-{arch}-{skey}-*.cubin")):
                    return path.read_bytes(), "cache"
            elif how == "prebuilt":
                path = prebuilt_path(name, defines)
                if path.is_file():
                    return path.read_bytes(), "prebuilt"
            elif how == "nvcc":
                nvcc = find_nvcc()
                if nvcc:
                    image = nvcc_compile(kernel_path(name), arch, defines, nvcc=nvcc)
                    tag = hashlib.sha256(_nvcc_version(nvcc).encode()).hexdigest()[:8]
                    _store(stem, arch, skey, f"nvcc{tag}", image)
                    return image, "nvcc"
            elif how == "nvrtc":
                lib = find_nvrtc()
                if lib:
                    image = nvrtc_compile(source, arch, defines, lib, kernel=name)
                    _store(stem, arch, skey, "nvrtc", image)
                    return image, "nvrtc"
            else:
                raise BackendError(f"unknown kernel source {how!r}")
        except BackendError as exc:
            errors.append(f"{how}: {exc}")
    detail = "; ".join(errors) if errors else "no cached or prebuilt image, and neither nvcc nor libnvrtc found"
    raise BackendError(f"backend 'cuda': cannot get machine code for {name} on {arch}: {detail}")


def _store(stem: str, arch: str, skey: str, tag: str, image: bytes) -> None:
    # a read-only cache is not an error: the image is used from memory
    with contextlib.suppress(OSError):
        _atomic_write(cubin_cache_dir() / f"{stem}-{arch}-{skey}-{tag}.cubin", image)


def build_prebuilt(name: str = "drr.cu", archs: tuple[int, ...] = FATBIN_ARCHS,
                   defines: dict[str, int | str] | None = None) -> Path:
    """Write the package's prebuilt fat binary for kernel ``name`` (needs nvcc)."""
    out = prebuilt_path(name, defines)
    image = nvcc_compile(kernel_path(name), f"sm_{max(archs)}", defines, fatbin_archs=archs)
    for old in PREBUILT_DIR.glob(f"{kernel_path(name).stem}-*.fatbin"):
        old.unlink()
    _atomic_write(out, image)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build drrfarm's CUDA kernels")
    ap.add_argument("--fatbin", action="store_true", help="write the package's prebuilt fat binary")
    ap.add_argument("--arch", default="sm_90", help="compile one cubin into the disk cache")
    args = ap.parse_args(argv)
    if args.fatbin:
        for name in PREBUILT_KERNELS:
            print(build_prebuilt(name))
    else:
        _, how = load_kernel_image("drr.cu", args.arch)
        print(f"drr.cu for {args.arch}: {how}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
