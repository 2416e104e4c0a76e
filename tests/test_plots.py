"""Figures of a run (mlsubtomo.plots) and the gold-standard FSC."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from conftest import BOX, VOXEL

from mlsubtomo.cli import main  # noqa: E402
from mlsubtomo.estimator import MissingDataMLClassifier  # noqa: E402
from mlsubtomo.masks import MissingWedge  # noqa: E402
from mlsubtomo.plots import (  # noqa: E402
    gold_standard_fsc,
    plot_central_slices,
    plot_convergence,
    plot_fsc,
    plot_orientations,
    write_report,
)
from mlsubtomo.simulate import make_dataset  # noqa: E402

WEDGE = MissingWedge(-60, 60)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000  # a drawn figure, not an empty canvas
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # complete: ends with the IEND chunk


def _assert_no_temp_files(folder):
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []


@pytest.fixture(scope="module")
def data(phantoms):
    return make_dataset(
        phantoms, 60, masks=WEDGE, snr=1.0, max_shift=2, random_state=0, voxel_size=VOXEL
    )


@pytest.fixture(scope="module")
def fitted(data):
    """A quick fit: classification only, at the true orientations and shifts."""
    est = MissingDataMLClassifier(
        2, align=False, max_iter=3, tol=0.0, random_state=0, fft_backend="scipy"
    )
    est.fit(data.volumes, masks=data.masks, init_rotations=data.rotations,
            init_shifts=data.shifts)
    return est


@pytest.fixture(scope="module")
def fsc_results(data):
    return gold_standard_fsc(
        data.volumes, data.masks, data.labels, data.rotations, data.shifts, 2,
        voxel_size=VOXEL,
    )


# --------------------------------------------------------------------------- convergence


def test_convergence_has_three_panels_and_writes_a_png(fitted, tmp_path):
    path = tmp_path / "convergence.png"
    fig = plot_convergence(fitted, path)
    assert len(fig.axes) == 3
    ll, sigma, weights = fig.axes
    n_iter = fitted.n_iter_
    # Log-likelihood at 0..n_iter M-steps, sigma and weights after M-steps 1..n_iter.
    np.testing.assert_array_equal(ll.lines[0].get_xdata(), np.arange(n_iter + 1))
    np.testing.assert_allclose(ll.lines[0].get_ydata(), fitted.log_likelihood_history_)
    np.testing.assert_array_equal(sigma.lines[0].get_xdata(), np.arange(1, n_iter + 1))
    assert len(weights.lines) == fitted.n_classes
    _assert_png(path)
    _assert_no_temp_files(tmp_path)


def test_convergence_without_sigma_and_weight_histories_keeps_one_panel():
    est = SimpleNamespace(log_likelihood_history_=[-10.0, -5.0, -4.0], n_iter_=2)
    assert len(plot_convergence(est).axes) == 1
    est.sigma_history_ = [1.0, 0.9]
    assert len(plot_convergence(est).axes) == 2


def test_convergence_of_an_unfitted_estimator_is_an_error():
    with pytest.raises(ValueError, match="fit it first"):
        plot_convergence(MissingDataMLClassifier())


# --------------------------------------------------------------------------- slices


def test_central_slices_of_volumes_and_truth(phantoms, tmp_path):
    path = tmp_path / "slices.png"
    refs = np.stack(phantoms)
    fig = plot_central_slices(refs, path, truth=refs[::-1])
    assert len(fig.axes) == 12
    assert [ax.get_title() for ax in fig.axes[:3]] == ["class 1 xy", "class 1 xz", "class 1 yz"]
    assert fig.axes[6].get_title() == "truth 1 xy"
    c = BOX // 2
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), refs[0][:, c, :])
    _assert_png(path)
    _assert_no_temp_files(tmp_path)


def test_central_slices_of_one_volume_with_titles(phantoms):
    fig = plot_central_slices(phantoms[0], titles=["GroEL"])
    assert len(fig.axes) == 3
    assert fig.axes[2].get_title() == "GroEL yz"
    with pytest.raises(ValueError, match="one label per row"):
        plot_central_slices(phantoms, titles=["only one"])
    with pytest.raises(ValueError, match="cubic"):
        plot_central_slices(np.zeros((2, 4, 4, 5)))


# --------------------------------------------------------------------------- orientations


def test_orientations_from_angles_and_matrices_agree(data, tmp_path):
    path = tmp_path / "orientations.png"
    fig = plot_orientations(data.euler_angles, data.labels, path)
    assert len(fig.axes) == 1
    assert fig.axes[0].name == "mollweide"
    from_angles = np.concatenate([c.get_offsets() for c in fig.axes[0].collections])
    fig2 = plot_orientations(data.rotations, data.labels)
    from_matrices = np.concatenate([c.get_offsets() for c in fig2.axes[0].collections])
    np.testing.assert_allclose(from_angles, from_matrices, atol=1e-9)
    assert len(fig.axes[0].collections) == 2  # one colour per class
    # Longitude rot and latitude 90 - tilt of the viewing direction R e_z.
    chosen = data.labels == 0
    rot, tilt = np.radians(data.euler_angles[chosen, :2]).T
    offsets = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(offsets[:, 1], np.pi / 2 - tilt, atol=1e-9)
    lon_error = np.angle(np.exp(1j * (offsets[:, 0] - rot)))
    np.testing.assert_allclose(lon_error[np.sin(tilt) > 1e-6], 0.0, atol=1e-9)
    _assert_png(path)


def test_orientations_without_labels_and_bad_shapes(data):
    assert len(plot_orientations(data.euler_angles).axes[0].collections) == 1
    with pytest.raises(ValueError, match="shape"):
        plot_orientations(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="one class per particle"):
        plot_orientations(data.euler_angles, data.labels[:-1])


# --------------------------------------------------------------------------- FSC


def test_gold_standard_fsc_of_a_simulated_data_set(data, fsc_results):
    assert sorted(fsc_results) == [0, 1]
    for k, res in fsc_results.items():
        assert sum(res["n_particles"]) == np.sum(data.labels == k)
        assert res["curve"].shape == res["frequency"].shape == (BOX // 2 + 1,)
        assert np.all(res["curve"][1:3] > 0.9)  # the low frequencies agree
        for name in ("resolution_0.5", "resolution_0.143"):
            assert 2 * VOXEL <= res[name] <= BOX * VOXEL
        assert res["resolution_0.143"] <= res["resolution_0.5"]


def test_gold_standard_fsc_of_pure_noise_is_low(data):
    noise = np.random.default_rng(1).standard_normal(data.volumes.shape).astype(np.float32)
    results = gold_standard_fsc(
        noise, data.masks, data.labels, data.rotations, data.shifts, 2, voxel_size=VOXEL
    )
    for res in results.values():
        curve = res["curve"][1:]
        assert np.mean(np.abs(curve)) < 0.2
        assert np.max(curve[1:]) < 0.5
        assert not res["resolution_0.5"] < BOX * VOXEL / 2


def test_gold_standard_fsc_of_noise_free_complete_data_is_one(phantoms):
    clean = make_dataset(phantoms[:1], 8, snr=np.inf, random_state=3)
    results = gold_standard_fsc(
        clean.volumes, None, clean.labels, clean.rotations, clean.shifts, 1,
        interpolation_order=3, fft_backend="scipy",
    )
    # Only the interpolation of the rotations differs between the two halves.
    assert np.all(results[0]["curve"][1:-1] > 0.95)
    assert results[0]["curve"][-1] > 0.8
    assert results[0]["resolution_0.143"] == pytest.approx(2.0)


def test_gold_standard_fsc_split_is_seeded_and_small_classes_are_nan(data):
    labels = data.labels.copy()
    labels[:] = 0
    labels[0] = 2  # class 2 has a single particle; class 1 none
    args = (data.volumes[:20], WEDGE, labels[:20], data.rotations[:20], data.shifts[:20], 3)
    a = gold_standard_fsc(*args, random_state=5)
    b = gold_standard_fsc(*args, random_state=5)
    np.testing.assert_array_equal(a[0]["curve"], b[0]["curve"])
    assert a[0]["n_particles"] == (9, 10)
    for k in (1, 2):
        assert np.all(np.isnan(a[k]["curve"]))
        assert np.isnan(a[k]["resolution_0.5"])
    assert len(plot_fsc(a).axes) == 1  # the undefined classes are listed, not drawn
    with pytest.raises(ValueError, match="labels"):
        gold_standard_fsc(*args[:-1], 2)


def test_plot_fsc_draws_each_class_and_the_thresholds(fsc_results, tmp_path):
    path = tmp_path / "fsc.png"
    fig = plot_fsc(fsc_results, path)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    curves = [line for line in ax.lines if line.get_label().startswith("class")]
    assert len(curves) == 2
    levels = sorted(line.get_ydata()[0] for line in ax.lines if line.get_label().startswith("FSC"))
    assert levels == [0.143, 0.5]
    _assert_png(path)


# --------------------------------------------------------------------------- report


def test_write_report(fitted, data, tmp_path):
    folder = tmp_path / "report"
    paths = write_report(fitted, folder, X=data.volumes, masks=data.masks, voxel_size=VOXEL)
    names = ["convergence.png", "class_averages.png", "orientations.png", "fsc.png"]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    for p in paths:
        _assert_png(p)
    assert [p.name for p in write_report(fitted, folder)] == names[:3]
    _assert_no_temp_files(folder)


def test_write_report_needs_a_fitted_estimator(tmp_path):
    with pytest.raises(ValueError, match="fit it first"):
        write_report(MissingDataMLClassifier(), tmp_path)


# --------------------------------------------------------------------------- writing


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    fsc_results, tmp_path, monkeypatch
):
    from matplotlib.figure import Figure

    path = tmp_path / "fsc.png"
    path.write_bytes(b"old")

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_fsc(fsc_results, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["fsc.png"]


def test_without_matplotlib_plots_name_the_extra_and_fsc_still_works(
    data, phantoms, monkeypatch
):
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "mlsubtomo\[plot\]"'):
        plot_central_slices(phantoms)
    results = gold_standard_fsc(
        data.volumes[:10], WEDGE, np.zeros(10, dtype=int), data.rotations[:10],
        data.shifts[:10], 1,
    )
    assert np.isfinite(results[0]["resolution_0.5"])


def test_cli_demo_writes_class_averages_png(tmp_path, capsys, monkeypatch):
    args = ["demo", "--n-particles", "4", "--iterations", "1", "--angular-step", "90",
            "--n-jobs", "1"]
    out = tmp_path / "with"
    assert main([*args, "--out", str(out)]) == 0
    _assert_png(out / "class_averages.png")
    _assert_no_temp_files(out)
    assert "install the 'plot' extra" not in capsys.readouterr().out
    # Without matplotlib the demo still succeeds and says what is missing.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "without"
    assert main([*args, "--out", str(out)]) == 0
    assert not (out / "class_averages.png").exists()
    assert "install the 'plot' extra" in capsys.readouterr().out
