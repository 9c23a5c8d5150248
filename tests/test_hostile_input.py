"""Hostile and broken input never costs more than a clear error: bounded spec loading, one-line messages,
and `drrfarm render` refusing an unusable output path before it renders."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drrfarm.cli import main
from drrfarm.errors import SpecError
from drrfarm.farm.spec import SweepSpec, load_spec
from drrfarm.farm.spec_yaml import MAX_SPEC_BYTES, MAX_SPEC_DEPTH, MAX_SPEC_NODES

# load_spec never opens the volumes, so the CT path need not exist
BASE: dict[str, Any] = {
    "seed": 3,
    "name": "hostile",
    "volumes": [{"id": "ct", "path": "ct.nii.gz", "placement": {"orientation": "HFS", "offset_mm": [0, 0, 5]}}],
    "poses": {"carm": {"alpha_deg": {"range": [-30, 30], "num": 3}, "beta_deg": [0, 10],
                       "gamma_deg": {"uniform": [-5, 5]}, "samples": 2}},
    "spectra": {"presets": ["90KV_AL40"], "tube": {"kvp": [80, 100], "al_mm": 2.5}, "n_bins": 16},
    "detector": {"model": "ideal", "output": "line_integral", "photons": [None, 1000]},
    "image": {"size": [32, 24], "pixel_mm": 8.0},
    "physics": {"step_voxels": 0.5, "method": "trilinear"},
    "scatter": {"mode": "none"},
    "output": {"url": "out", "formats": ["parquet"], "shard_size": 4},
    "tracking": {"enabled": False},
}

# a second valid spec: explicit poses, a label table, mono energies, PNG output
BASE_EXPLICIT: dict[str, Any] = {
    "volumes": [{"path": "ct.nii.gz", "materials": {"label_map": "labels.nii.gz", "table": {0: "air", 1: "bone"},
                                                    "default": "soft_tissue"}}],
    "poses": {"explicit": {"matrices": [[[1000, 0, 16, 0], [0, 1000, 16, 0], [0, 0, 1, 500]]]}, "seed": 7},
    "spectra": {"mono_kev": [60, 80]},
    "detector": {"model": "csi", "csi_thickness_mm": 0.5, "photons": 5000, "electronic_noise": 2.0},
    "image": {"size": 32, "pixel_mm": 1.0},
    "output": {"url": "out", "formats": ["png"], "image_dtype": "float32"},
}

BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
name: *i
"""


def rejected_quickly(path: Path, limit_s: float = 1.0) -> str:
    """Load ``path``, expecting a SpecError within ``limit_s``; returns its message."""
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < limit_s, f"took {elapsed:.2f} s: {message}"
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert len(message) < 600, message
    return message


def test_valid_base_specs_load(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    spec = load_spec(path)
    assert spec.name == "hostile" and len(spec.spectra.items) == 3
    path.write_text(yaml.safe_dump(BASE_EXPLICIT), encoding="utf-8")
    spec = load_spec(path)
    assert spec.poses.explicit is not None and spec.volumes[0].materials.method == "labels"


def test_billion_laughs_rejected_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS, encoding="utf-8")
    assert len(BILLION_LAUGHS) < 1024
    message = rejected_quickly(path)
    assert "anchors and aliases" in message and "line 1" in message


def test_anchor_without_alias_rejected(tmp_path: Path) -> None:
    path = tmp_path / "anchor.yaml"
    path.write_text(yaml.safe_dump(BASE).replace("seed: 3", "seed: &s 3"), encoding="utf-8")
    assert "anchors and aliases" in rejected_quickly(path)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", "nest"),
        ("name:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(MAX_SPEC_DEPTH + 5)), "nested deeper"),
        ("name: [" + ", ".join(["0"] * (MAX_SPEC_NODES + 10)) + "]\n", f"more than {MAX_SPEC_NODES} values"),
        ("name: '" + "x" * (MAX_SPEC_BYTES + 10) + "'\n", "larger than"),
        ("seed: 1" + ":59" * 200_000 + "\n", "too long"),
        ("seed: 2020-13-45\n", "timestamp"),
        ("seed: !!int ''\n", "int"),
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    ],
    ids=["deep-flow", "deep-block", "many-values", "huge-file", "sexagesimal-bomb", "bad-date", "bad-int-tag",
         "duplicate-key"],
)
def test_oversized_or_malformed_documents_rejected_quickly(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    assert needle in rejected_quickly(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", ["y" * 10_000] * 80),
        ("name", {f"k{i}": list(range(50)) for i in range(300)}),
        ("backend", "z" * 500_000),
        ("volumes", [{"path": "ct.nii.gz", "id": "bad id\n" * 10_000}]),
        ("image", {"size": 32, "pixel_mm": 1.0, "k\n" * 10_000: 1}),
    ],
    ids=["long-list", "big-mapping", "long-string", "multiline-id", "multiline-key"],
)
def test_messages_about_huge_values_stay_short(tmp_path: Path, key: str, value: Any) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, key: value}), encoding="utf-8")
    message = rejected_quickly(path)
    assert key in message


# -- drrfarm render: the output path is checked before any rendering -----------------------------------------


@pytest.fixture
def small_ct(tmp_path: Path) -> Path:
    """An 8^3 water-and-bone NIfTI CT with 4 mm voxels."""
    hu = np.zeros((8, 8, 8), np.int16)
    hu[3:5, 3:5, :] = 700
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([4.0, 4.0, 4.0, 1.0])), str(path))
    return path


def render_args(ct: Path, out: Path, *extra: str) -> list[str]:
    return ["render", str(ct), "-o", str(out), "--size", "8", "--pixel-mm", "8", "--backend", "cpu", *extra]


def test_render_into_existing_folder_exits_2_with_one_line(tmp_path: Path, small_ct: Path) -> None:
    folder = tmp_path / "existing"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "drrfarm.cli", *render_args(small_ct, folder)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder) in lines[0] and "folder" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(folder.iterdir()) == [] and not (tmp_path / "existing.json").exists()


@pytest.fixture
def no_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a DRR is rendered."""
    import drrfarm.drr

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered before checking the output path")

    monkeypatch.setattr(drrfarm.drr, "render_drr", refuse)


def bad_output_cases(tmp_path: Path) -> Iterator[tuple[Path, tuple[str, ...], str]]:
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    yield tmp_path / "a_file" / "sub" / "drr.png", (), "a_file"
    (tmp_path / "sidecar.json").mkdir()
    yield tmp_path / "sidecar.png", (), "sidecar.json"
    (tmp_path / "image.npy").mkdir()
    yield tmp_path / "image.png", ("--npy",), "image.npy"
    yield tmp_path / "..", (), ".."
    yield tmp_path / "drr.json", (), "sidecar"


@pytest.mark.usefixtures("no_rendering")
def test_render_checks_output_before_rendering(tmp_path: Path, small_ct: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for out, extra, needle in bad_output_cases(tmp_path):
        assert main(render_args(small_ct, out, *extra)) == 2, out
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.usefixtures("no_rendering")
def test_render_into_read_only_folder_exits_2(tmp_path: Path, small_ct: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    assert main(render_args(small_ct, folder / "drr.png")) == 2
    assert "not writable" in capsys.readouterr().err


def test_render_creates_a_missing_output_folder(tmp_path: Path, small_ct: Path) -> None:
    out = tmp_path / "new" / "deeper" / "drr.png"
    assert main(render_args(small_ct, out)) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()


# -- property: any mutation of a valid spec loads or fails with one clear line ----------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "auto", "cuda", "90KV_AL40", "sample:chest_ct", "sample:", "s3://b/x", "png",
                       "normal", "1e3", "0x10", "HFS", "\n", "-1", "{volume_id}"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner,
                                                                max_size=3),
    max_leaves=8,
)
KEYS = st.text(max_size=10) | st.sampled_from(["values", "range", "num", "step", "uniform", "normal", "clip",
                                                 "explicit", "materials", "mean", "std"]) | st.integers(-2, 5)


def key_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside ``node`` (the root itself is ``()``)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from key_paths(value, (*prefix, index))


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """A valid spec with a few keys deleted, values replaced by values of other types, or unknown keys added."""
    spec: Any = copy.deepcopy(draw(st.sampled_from([BASE, BASE_EXPLICIT])))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        action = draw(st.sampled_from(["replace", "delete", "add", "replace", "add", "delete", "replace", "root"]))
        paths = list(key_paths(spec))[1:]
        if action == "root" or not paths:
            spec = draw(VALUES)
            continue
        path = draw(st.sampled_from(paths))
        target = at(spec, path)
        if action == "add" and isinstance(target, (dict, list)):
            if isinstance(target, dict):
                target[draw(KEYS)] = draw(VALUES)
            else:
                target.append(draw(VALUES))
        elif action == "delete":
            del at(spec, path[:-1])[path[-1]]
        else:
            at(spec, path[:-1])[path[-1]] = draw(VALUES)
    return spec


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mutated_specs")
    warm = folder / "warm.yaml"
    warm.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    load_spec(warm)  # imports done before the timed examples
    return folder


@settings(max_examples=150, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_specs())
def test_mutated_specs_load_or_fail_with_one_clear_line(spec_dir: Path, data: Any) -> None:
    path = spec_dir / "spec.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        spec = load_spec(path)
    except SpecError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        assert "\n" not in message and "\r" not in message, message
        assert message[len(f"{path}: "):].strip(), message
        assert len(message) < 1000, message
    else:
        assert isinstance(spec, SweepSpec)
        assert len(spec.sha256) == 64
