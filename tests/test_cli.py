"""The mlsubtomo command."""

import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from mlsubtomo.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("mlsubtomo")
    command = [exe] if exe else [sys.executable, "-m", "mlsubtomo.cli"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "demo" in done.stdout


def test_demo_writes_class_averages_and_reports_purity(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        ["demo", "--out", str(out), "--n-particles", "16", "--iterations", "2",
         "--angular-step", "60", "--n-jobs", "1"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "Class purity against the truth:" in text
    for k in (1, 2):
        with mrcfile.open(out / f"class_{k:02d}.mrc") as mrc:
            assert mrc.data.shape == (24, 24, 24)
            assert np.all(np.isfinite(mrc.data))
            assert mrc.voxel_size.x == pytest.approx(10.0)


def test_existing_output_is_not_clobbered(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = main(["demo", "--out", str(tmp_path), "--n-particles", "4", "--iterations", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "mine"
