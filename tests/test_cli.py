"""The mlsubtomo command."""

import logging
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile

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


def test_simulate_then_fit_recovers_the_truth(tmp_path, capsys):
    import starfile

    from mlsubtomo.io import pose_from_relion
    from mlsubtomo.metrics import class_purity, classified_orientation_errors
    from mlsubtomo.sampling import symmetry_group

    data, out = tmp_path / "d", tmp_path / "r"
    assert main(["simulate", "--out", str(data), "--n-particles", "40", "--box", "16",
                 "--snr", "0.5", "--max-shift", "1"]) == 0
    assert main(["fit", str(data / "particles.star"), "--classes", "2", "--out", str(out),
                 "--angular-step", "30", "--iterations", "8", "--max-shift", "1",
                 "--n-jobs", "2"]) == 0
    truth = starfile.read(data / "particles.star")["particles"]
    found = starfile.read(out / "particles.star")["particles"]
    # Image paths are rewritten to resolve from the output folder.
    assert [(out / n).resolve() for n in found["rlnImageName"]] == [
        (data / n).resolve() for n in truth["rlnImageName"]
    ]
    assert class_purity(truth["rlnClassNumber"], found["rlnClassNumber"]) >= 0.95
    voxel = 240.0 / 16
    true_rotations, _ = pose_from_relion(truth, voxel)
    found_rotations, _ = pose_from_relion(found, voxel)
    groups = [symmetry_group(g).as_matrix() for g in ("D7", "C7")]
    errors = classified_orientation_errors(
        truth["rlnClassNumber"] - 1, found["rlnClassNumber"] - 1, true_rotations,
        found_rotations, groups,
    )
    assert np.median(errors) < 30
    for name in ("class_01.mrc", "class_02.mrc"):
        assert mrcfile.validate(str(out / name))
    assert "iteration 8" in (out / "run.log").read_text()
    for name in ("convergence.png", "class_averages.png", "orientations.png", "fsc.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_collapse_is_written_to_run_log_and_the_terminal(tmp_path, caplog):
    data, out = tmp_path / "d", tmp_path / "r"
    assert main(["simulate", "--out", str(data), "--n-particles", "6", "--box", "16",
                 "--snr", "0.5", "--max-shift", "0"]) == 0
    star = data / "particles.star"
    table = starfile.read(star)
    # Every particle is the same map: a second class must stay empty.
    table["particles"]["rlnImageName"] = table["particles"]["rlnImageName"].iloc[0]
    starfile.write(table, star, overwrite=True)
    assert main(["fit", str(star), "--classes", "2", "--out", str(out), "--angular-step",
                 "90", "--iterations", "2", "--max-shift", "0"]) == 0
    assert "ClassCollapseWarning: class 1 holds no particle" in (out / "run.log").read_text()
    # The logger's console handler (under pytest, its capture) gets it as a warning.
    assert any(r.levelno == logging.WARNING and "ClassCollapseWarning" in r.getMessage()
               for r in caplog.records)


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.star"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlsubtomo: error:") and "missing.star" in err
    assert err.count("\n") == 1


def test_fit_resume_after_an_interruption_ends_like_an_uninterrupted_run(tmp_path):
    import starfile

    data = tmp_path / "d"
    assert main(["simulate", "--out", str(data), "--n-particles", "16", "--box", "16",
                 "--snr", "0.5", "--max-shift", "1"]) == 0
    common = [str(data / "particles.star"), "--classes", "2", "--angular-step", "60",
              "--max-shift", "1", "--n-jobs", "1"]
    assert main(["fit", *common, "--iterations", "5", "--out", str(tmp_path / "full")]) == 0
    assert main(["fit", *common, "--iterations", "3", "--out", str(tmp_path / "cut")]) == 0
    assert main(["fit", *common, "--iterations", "5", "--out", str(tmp_path / "cut"),
                 "--resume"]) == 0
    for name in ("class_01.mrc", "class_02.mrc"):
        with mrcfile.open(tmp_path / "full" / name) as a:
            with mrcfile.open(tmp_path / "cut" / name) as b:
                np.testing.assert_allclose(b.data, a.data, atol=1e-6 * np.abs(a.data).max())
    full = starfile.read(tmp_path / "full" / "particles.star")["particles"]
    cut = starfile.read(tmp_path / "cut" / "particles.star")["particles"]
    np.testing.assert_array_equal(cut["rlnClassNumber"], full["rlnClassNumber"])
