"""The `drrfarm render` / `drrfarm spectrum` contract: files, sidecar, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drrfarm.cli import main
from drrfarm.geometry import Camera


def test_render_writes_png_sidecar_and_npy(tmp_path: Path) -> None:
    from drrfarm.samples.downloads import chest_ct

    out = tmp_path / "ap.png"
    code = main(
        [
            "render",
            str(chest_ct()),
            "-o",
            str(out),
            "--size",
            "48",
            "--pixel-mm",
            "6.2",
            "--kvp",
            "90",
            "--al-mm",
            "4",
            "--photons",
            "5000",
            "--seed",
            "3",
            "--method",
            "joseph",
            "--npy",
            "--backend",
            "cpu",
        ]
    )
    assert code == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    image = np.load(out.with_suffix(".npy"))
    png = np.asarray(Image.open(out))
    assert png.shape == image.shape == (48, 48)
    np.testing.assert_allclose(png * meta["image_scale"], image, atol=meta["image_scale"])
    # the sidecar's camera maps world mm to pixels and is self-consistent
    cam = Camera.from_dict(meta)
    np.testing.assert_allclose(cam.P, np.asarray(meta["P"]), atol=1e-9)
    assert meta["pixel_center"] == 0.0 and meta["patient_frame"] == "RAS"
    assert np.asarray(meta["world_from_patient"]).shape == (4, 4)
    assert meta["spectrum"]["kvp"] == 90 and meta["physics"]["photons"] == 5000
    assert cam.project(np.zeros(3)) == pytest.approx([23.5, 23.5])


def test_spectrum_command_prints_mean_energy_and_hvl(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["spectrum", "--kvp", "90", "--al-mm", "4"]) == 0
    out = capsys.readouterr().out
    assert "keV" in out and "HVL" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["render", "missing.nii.gz", "-o", "x.png"], "missing.nii.gz"),
        (["render", "sample:chest_ct", "-o", "x.png", "--kvp", "400"], "kvp"),
        (["render", "sample:chest_ct", "-o", "x.png", "--sdd-mm", "-5"], "sdd"),
        (["spectrum", "--kvp", "20"], "kvp"),
    ],
)
def test_errors_exit_nonzero_with_one_clear_line(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "drrfarm.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------- command-line habits


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import drrfarm

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"drrfarm {drrfarm.__version__}"
    proc = subprocess.run([sys.executable, "-m", "drrfarm", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"drrfarm {drrfarm.__version__}"


@pytest.mark.parametrize(
    ("flag", "given", "parsed"),
    [
        ("--output", "line-integral", "line_integral"),
        ("--output", "line_integral", "line_integral"),
        ("--output", "transmission", "transmission"),
        ("--detector", "photon-counting", "photon_counting"),
        ("--detector", "photon_counting", "photon_counting"),
        ("--scatter", "monte-carlo", "monte_carlo"),
    ],
)
def test_names_take_hyphens_or_underscores(flag: str, given: str, parsed: str) -> None:
    from drrfarm.cli import build_parser

    args = build_parser().parse_args(["render", "ct.nii.gz", "-o", "x.png", flag, given])
    assert getattr(args, {"--output": "transform"}.get(flag, flag[2:])) == parsed


def test_bad_output_name_lists_the_hyphenated_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["render", "ct.nii.gz", "-o", "x.png", "--output", "log"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice 'log' (choose from line-integral, transmission, intensity, neglog)" in err


# ------------------------------------------------------------------------------------------ --tool


def _phantom_nifti(path: Path) -> Path:
    """A 40 x 40 x 32 water cylinder (3 mm voxels, centred on RAS (0, 0, 0)) as NIfTI."""
    import nibabel as nib

    i, j, _ = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in (40, 40, 32)), indexing="ij")
    hu = np.where(np.hypot(i, j) * 3.0 < 50.0, 0.0, -1000.0).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-58.5, -58.5, -46.5]
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return path


SMALL = ["--size", "32", "--pixel-mm", "8", "--backend", "cpu", "--npy"]


def _render(tmp_path: Path, name: str, *args: str) -> tuple[np.ndarray, dict]:
    ct = tmp_path / "phantom.nii.gz"
    if not ct.exists():
        _phantom_nifti(ct)
    out = tmp_path / f"{name}.png"
    assert main(["render", str(ct), "-o", str(out), *SMALL, *args]) == 0
    return np.load(out.with_suffix(".npy")), json.loads(out.with_suffix(".json").read_text())


def test_render_with_a_builtin_tool_on_a_trajectory(tmp_path: Path) -> None:
    plain, _ = _render(tmp_path, "plain")
    # an 8 mm steel K-wire along RAS x through the centre: a horizontal line through the image centre
    image, meta = _render(tmp_path, "kwire", "--tool", "kwire", "--tool-tip", "70", "0", "0",
                          "--tool-base", "-70", "0", "0", "--tool-size", "diameter_mm=8", "--tool-name", "wire")
    diff = image - plain
    rows = np.nonzero(diff.max(axis=1) > 0.5)[0]
    assert rows.size and set(rows.tolist()) <= {14, 15, 16, 17}, rows
    assert np.allclose(diff[:10], 0.0) and np.allclose(diff[22:], 0.0)
    (tool,) = meta["tools"]
    assert tool["name"] == "wire" and tool["material"] == "steel" and tool["mode"] == "replace"
    T = np.asarray(tool["world_from_mesh"])
    tip_world = T[:3, :3] @ [0.0, 0.0, 150.0] + T[:3, 3]  # the K-wire's model tip (length 150 mm)
    np.testing.assert_allclose(tip_world, [70.0, 0.0, 0.0], atol=1e-6)  # the CT's centre is at the isocentre
    # the same tool as an inline spec item, with a random advance drawn from --seed
    items = "{mesh: kwire, size: {diameter_mm: 8}, pose: {tip_mm: [70, 0, 0], base_mm: [-70, 0, 0], " \
            "advance_mm: {uniform: [-40, 0]}}}"
    a = _render(tmp_path, "a", "--tool", items, "--seed", "5")[1]["tools"][0]["world_from_mesh"]
    b = _render(tmp_path, "b", "--tool", items, "--seed", "5")[1]["tools"][0]["world_from_mesh"]
    c = _render(tmp_path, "c", "--tool", items, "--seed", "6")[1]["tools"][0]["world_from_mesh"]
    assert a == b and a != c


def test_render_with_a_mesh_file_and_a_fixed_pose(tmp_path: Path) -> None:
    import trimesh

    box = tmp_path / "block.stl"
    trimesh.creation.box(extents=(20.0, 20.0, 20.0)).export(str(box))
    pose = ["1", "0", "0", "30", "0", "1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1"]
    image, meta = _render(tmp_path, "block", "--tool", str(box), "--tool-material", "titanium", "--tool-pose", *pose)
    (tool,) = meta["tools"]
    assert tool["material"] == "titanium" and tool["mode"] == "add" and tool["name"] == "block"
    np.testing.assert_allclose(np.asarray(tool["world_from_mesh"])[:3, 3], [30.0, 0.0, 0.0])
    plain, _ = _render(tmp_path, "plain")
    cols = np.nonzero((image - plain).max(axis=0) > 0.1)[0]
    assert cols.size and cols.min() > 16, cols  # right of the centre column (world +x is image +u)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tool", "kwire"], "tools[0].pose: required key is missing"),
        (["--tool", "drill", "--tool-tip", "0", "0", "0", "--tool-base", "1", "0", "0"], "drill"),
        (["--tool", "kwire", "--tool-tip", "0", "0", "0"], "tools[0].pose.base_mm"),
        (["--tool", "kwire", "--tool-tip", "0", "0", "0", "--tool-base", "1", "0", "0", "--tool-material", "cheese"],
         "cheese"),
        (["--tool", "missing.stl", "--tool-material", "steel", "--tool-pose", *"1000010000100001"], "missing.stl"),
    ],
)
def test_tool_errors_exit_2_naming_the_key(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "drrfarm.cli", "render", "sample:chest_ct", "-o", "x.png", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tool-tip", "0", "0", "0"], "give --tool first"),
        (["--tool", "kwire", "--tool-size", "diameter_mm"], "KEY=NUMBER"),
        (["--tool", "{mesh: kwire"], "not a YAML mapping"),
    ],
)
def test_tool_usage_errors(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["render", "ct.nii.gz", "-o", "x.png", *args])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_tools_without_names_get_unique_spec_names() -> None:
    from drrfarm.cli import _named
    from drrfarm.farm.spec_scene import parse_tools

    pose = {"tip_mm": [0, 0, 0], "base_mm": [0, -50, 0]}
    items = [{"mesh": "kwire", "pose": pose}, {"mesh": "kwire", "pose": pose}, {"mesh": "screw", "pose": pose}]
    assert [t.name for t in parse_tools(_named(items))] == ["kwire", "kwire_2", "screw"]
    assert _named([{"mesh": "/x/my plate.v2.stl"}, {"mesh": "3d.stl"}]) == [
        {"mesh": "/x/my plate.v2.stl", "name": "my_plate"}, {"mesh": "3d.stl", "name": "tool_3d"}]
