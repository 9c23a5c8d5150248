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
    from drrfarm.samples import chest_ct

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
