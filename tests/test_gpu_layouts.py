"""The host's parameter records (drrfarm.gpu.layouts) match the kernels' C structs (gpu/kernels/params.cuh):
field by field from a parse of the header on any machine, and by nvcc's own offsetof where nvcc is."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from drrfarm.gpu.build import INCLUDE_DIR, find_nvcc
from drrfarm.gpu.layouts import PARAMS_DEFINES, PARAMS_DTYPES

HEADER = INCLUDE_DIR / "params.cuh"
NVCC = find_nvcc()
C_TYPES = {"u64": "<u8", "u32": "<u4", "int": "<i4", "float": "<f4", "double": "<f8", "long long": "<i8"}


def _header_text() -> str:
    text = HEADER.read_text()
    return re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.DOTALL)


def parse_structs(text: str) -> dict[str, tuple[list[tuple[str, int, str, tuple[int, ...]]], int]]:
    """C struct name -> ([(field, offset, numpy type, shape)], sizeof), with natural alignment."""
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.DOTALL):
        fields, offset, align_max = [], 0, 1
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.fullmatch(r"(long long|\w+)\s+(.+)", " ".join(decl.split()))
            assert m and m.group(1) in C_TYPES, f"{name}: cannot read {decl!r}"
            base = np.dtype(C_TYPES[m.group(1)])
            for item in m.group(2).split(","):
                d = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", item.strip())
                assert d, f"{name}: cannot read {item!r}"
                shape = (int(d.group(2)),) if d.group(2) else ()
                offset += (-offset) % base.alignment
                fields.append((d.group(1), offset, base.str, shape))
                offset += base.itemsize * (shape[0] if shape else 1)
                align_max = max(align_max, base.alignment)
        out[name] = (fields, offset + (-offset) % align_max)
    return out


def test_every_struct_has_a_mirror() -> None:
    assert set(parse_structs(_header_text())) == set(PARAMS_DTYPES)


@pytest.mark.parametrize("struct", sorted(PARAMS_DTYPES))
def test_dtype_matches_the_c_struct(struct: str) -> None:
    fields, size = parse_structs(_header_text())[struct]
    dtype = PARAMS_DTYPES[struct]
    assert dtype.itemsize == size
    assert list(dtype.names) == [f[0] for f in fields]
    for name, offset, base, shape in fields:
        sub, off = dtype.fields[name][:2]
        assert off == offset, (struct, name)
        assert (sub.base.str, sub.shape) == (base, shape), (struct, name)


def test_record_constants_match_the_header() -> None:
    defines = {k: int(v) for k, v in re.findall(r"#define\s+(\w+)\s+(\d+)\b", _header_text())}
    assert {k: defines.get(k) for k in PARAMS_DEFINES} == PARAMS_DEFINES


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_dtypes_match_nvccs_layout(tmp_path: Path) -> None:
    """nvcc compiles a static_assert per field: offsets and sizes as the device compiler lays them out."""
    lines = ['#include "params.cuh"', "#include <cstddef>"]
    for struct, dtype in PARAMS_DTYPES.items():
        lines.append(f'static_assert(sizeof({struct}) == {dtype.itemsize}, "{struct} size");')
        for name in dtype.names:
            off = dtype.fields[name][1]
            lines.append(f'static_assert(offsetof({struct}, {name}) == {off}, "{struct}.{name}");')
    src = tmp_path / "layout_check.cu"
    src.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([NVCC, "-std=c++17", "-cubin", "-arch=sm_80", f"-I{INCLUDE_DIR}", "-o",
                           str(tmp_path / "layout_check.cubin"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
