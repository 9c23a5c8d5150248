"""Every CUDA kernel source compiles with the local nvcc for sm_80 and sm_90 (no GPU needed), and the
ctypes mirrors of the driver's structs match cuda.h."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from drrfarm.gpu import textures
from drrfarm.gpu.build import KERNELS, find_nvcc, include_dirs, nvcc_compile

SOURCES = sorted(KERNELS.values())
NVCC = find_nvcc()

EXPECTED_KERNELS = [
    f"drr_{kind}{m}_c{c}_t{t}_{f}" for kind in ("", "march_") for m in ("joseph", "trilinear")
    for c, t in ((1, 1), (2, 1), (4, 1), (4, 2)) for f in ("hw", "exact")
] + [
    f"drr_mesh_ct_{m}_c{c}_t{t}_{f}" for m in ("joseph", "trilinear") for c, t in ((1, 1), (2, 1), (4, 1), (4, 2))
    for f in ("hw", "exact")
] + ["drr_rays_joseph", "drr_rays_trilinear", "drr_neglog_finish", "drr_minmax_init", "drr_finish_m4",
     "drr_finish_m8", "pack_layout", "philox_kat", "poisson_draws"]


def test_there_are_kernel_sources() -> None:
    assert "drr.cu" in [p.name for p in SOURCES]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles(source: Path, arch: str) -> None:
    image = nvcc_compile(source, arch)
    assert image[:4] == b"\x7fELF"
    if source.name == "drr.cu":
        for name in EXPECTED_KERNELS:
            assert name.encode() in image, name


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_no_local_memory_in_the_hot_kernels() -> None:
    """These kernels keep their state in registers (no stack frame). The march kernels are capped at
    32 registers on purpose (occupancy beats a few spilled words outside the sample loop)."""
    proc = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-Xptxas", "-v", "-o", "/dev/null",
                           *(f"-I{d}" for d in include_dirs("drr.cu")), str(KERNELS["drr.cu"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    for i, line in enumerate(lines):
        for name in ("drr_joseph_c4_t1_hw", "drr_joseph_c1_t1_hw", "drr_march_trilinear_c1_t1_hw",
                     "drr_march_trilinear_c4_t1_hw", "drr_rays_joseph", "drr_finish_m4"):
            if f"'{name}'" in line:
                report = " ".join(lines[i + 1 : i + 3])
                assert "0 bytes stack frame" in report, (name, report)


def _cuda_include() -> Path | None:
    nvcc = Path(NVCC).resolve() if NVCC else None
    for base in ([nvcc.parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]:
        if (base / "include" / "cuda.h").is_file():
            return base / "include"
    return None


@pytest.mark.skipif(_cuda_include() is None or shutil.which("cc") is None, reason="cuda.h or a C compiler missing")
def test_ctypes_structs_match_cuda_h(tmp_path: Path) -> None:
    checks = {**textures.struct_sizes(), **textures.struct_offsets()}
    lines = []
    for key in checks:
        if "." in key:
            struct, field = key.split(".")
            lines.append(f'printf("{key} %zu\\n", offsetof({struct}, {field}));')
        else:
            lines.append(f'printf("{key} %zu\\n", sizeof({key}));')
    src = tmp_path / "s.c"
    src.write_text("#include <cuda.h>\n#include <stdio.h>\n#include <stddef.h>\nint main(void){\n"
                   + "\n".join(lines) + "\nreturn 0;}\n")
    exe = tmp_path / "s"
    subprocess.run(["cc", f"-I{_cuda_include()}", str(src), "-o", str(exe)], check=True)
    out = dict(line.rsplit(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                              check=True).stdout.split("\n") if line)
    assert {k: int(v) for k, v in out.items()} == checks


def test_prebuilt_fat_binary_is_current() -> None:
    """A shipped fat binary must match the kernel source (else: python -m drrfarm.gpu.build --fatbin)."""
    from drrfarm.gpu.build import PREBUILT_DIR, prebuilt_path

    shipped = sorted(PREBUILT_DIR.glob("drr-*.fatbin")) if PREBUILT_DIR.is_dir() else []
    if not shipped:
        pytest.skip("no prebuilt fat binary in the package")
    assert shipped == [prebuilt_path("drr.cu")], (
        "stale prebuilt kernels: run `python -m drrfarm.gpu.build --fatbin`"
    )
