"""The kernel build's key covers a kernel's source, every header it includes and its defines."""

from __future__ import annotations

from pathlib import Path

import pytest

from drrfarm.errors import BackendError
from drrfarm.gpu.build import INCLUDE_DIR, KERNELS, kernel_files, prebuilt_path, source_hash


def _kernel(tmp_path: Path) -> Path:
    (tmp_path / "a.cuh").write_text('#pragma once\n#include "b.cuh"\n#define A 1\n')
    (tmp_path / "b.cuh").write_text("#pragma once\n#define B 2\n")
    k = tmp_path / "k.cu"
    k.write_text('#include "a.cuh"\n#include "shared.cuh"\n#include <cstddef>\nextern "C" __global__ void f() {}\n')
    return k


def test_kernel_files_follow_includes(tmp_path: Path) -> None:
    k = _kernel(tmp_path)
    assert kernel_files(k) == [k, tmp_path / "a.cuh", tmp_path / "b.cuh", INCLUDE_DIR / "shared.cuh"]


@pytest.mark.parametrize("changed", ["k.cu", "a.cuh", "b.cuh"])
def test_key_changes_with_the_source_and_every_header(tmp_path: Path, changed: str) -> None:
    k = _kernel(tmp_path)
    before = source_hash(k)
    assert source_hash(k) == before
    path = tmp_path / changed
    path.write_text(path.read_text() + "// edited\n")
    assert source_hash(k) != before


def test_key_changes_with_the_defines(tmp_path: Path) -> None:
    k = _kernel(tmp_path)
    assert source_hash(k, {"X": 1}) != source_hash(k) != source_hash(k, {"X": 2})


def test_a_missing_header_is_an_error(tmp_path: Path) -> None:
    k = tmp_path / "k.cu"
    k.write_text('#include "nowhere.cuh"\n')
    with pytest.raises(BackendError, match="nowhere.cuh"):
        source_hash(k)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_package_kernels_include_the_shared_headers(name: str) -> None:
    files = [p.name for p in kernel_files(name)]
    assert files[0] == name and {"shared.cuh", "params.cuh"} <= set(files)
    assert prebuilt_path(name).name == f"{Path(name).stem}-{source_hash(name)}.fatbin"
