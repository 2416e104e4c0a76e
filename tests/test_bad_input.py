"""Bad input, swept: each mistake is refused with the right exception and a message
naming it (never a traceback from inside numpy or scipy), and the edge cases that
are legal give finite results without warnings.

Cases the other test files already pin (e.g. a 3-D X, n_classes=0 or a truncated
MRC file for the ML estimator or reader) are not repeated here.
"""

import struct
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import starfile

from mlsubtomo.baselines import ConstrainedCCClassifier
from mlsubtomo.cli import main
from mlsubtomo.estimator import ClassCollapseWarning, MissingDataMLClassifier
from mlsubtomo.io import read_particles, write_map, write_simulated
from mlsubtomo.masks import ArrayMask, MissingWedge
from mlsubtomo.simulate import lowpass, make_dataset

D = 8
HALF = (D, D, D // 2 + 1)
WEDGE = MissingWedge(-60, 60)
FAST = dict(angular_step=90, max_iter=1, max_shift=1, random_state=0, n_jobs=1)
ESTIMATORS = pytest.mark.parametrize(
    "estimator_class",
    [MissingDataMLClassifier, ConstrainedCCClassifier],
    ids=["ml", "cc"],
)


def _particles(n=4, d=D, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d, d, d)).astype(np.float32)


def _fit(estimator_class, X, n_classes=2, masks=WEDGE, **params):
    return estimator_class(n_classes, **{**FAST, **params}).fit(X, masks=masks)


def _fitted_outputs(est):
    """Every fitted array an estimator exposes, to be checked for finiteness."""
    names = ("references_", "class_weights_", "sigma_", "xi_", "max_posterior_",
             "particle_log_likelihood_", "max_correlation_", "rotations_", "shifts_")
    return {name: np.asarray(getattr(est, name)) for name in names if hasattr(est, name)}


# ----------------------------------------------------------------------------- X


@ESTIMATORS
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_values_name_the_particle(estimator_class, value):
    X = _particles()
    X[2, 3, 4, 5] = value
    message = r"NaN or infinite values in 1 particle\(s\), first index 2"
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, X)


@ESTIMATORS
@pytest.mark.parametrize("shape", [(2, 4, D, D, D), (4, D**3), (D,)])
def test_wrong_number_of_dimensions(estimator_class, shape):
    X = np.random.default_rng(0).normal(size=shape)
    with pytest.raises(ValueError, match=rf"shape \(N, D, D, D\), got {len(shape)} dimensions"):
        _fit(estimator_class, X, masks=None)


@ESTIMATORS
@pytest.mark.parametrize("shape", [(4, 9, D, D), (4, D, 7, D), (4, D, D, 6)])
def test_non_cubic_boxes(estimator_class, shape):
    X = np.random.default_rng(0).normal(size=shape)
    with pytest.raises(ValueError, match=r"cubic boxes, got non-cubic shape"):
        _fit(estimator_class, X, masks=None)


@ESTIMATORS
def test_a_list_of_volumes_of_different_sizes(estimator_class):
    X = list(_particles())
    X[2] = X[2][:6, :6, :6]
    with pytest.raises(ValueError, match=r"one shape: .* particle 2 has \(6, 6, 6\)"):
        _fit(estimator_class, X)


@pytest.mark.parametrize("blank", [0.0, 2.5])
def test_ml_refuses_data_without_signal(blank):
    # Constant particles have only a DC component, which no mask observes.
    X = np.full((4, D, D, D), blank)
    with pytest.raises(ValueError, match=r"no signal in the Fourier components .* sigma"):
        _fit(MissingDataMLClassifier, X)


# Blank data carry no classes: the collapse warning is the right answer there.
@pytest.mark.filterwarnings("ignore::mlsubtomo.ClassCollapseWarning")
@pytest.mark.filterwarnings("error")
def test_cc_scores_blank_particles_zero():
    X = _particles()
    X[1] = 0.0
    est = _fit(ConstrainedCCClassifier, X)
    assert est.max_correlation_[1] == 0
    assert np.all(est.max_correlation_[[0, 2, 3]] > 0)
    assert np.all(_fit(ConstrainedCCClassifier, np.zeros_like(X)).max_correlation_ == 0)


@ESTIMATORS
@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e39])
def test_data_outside_the_float32_range_are_refused(estimator_class, scale):
    # 1e39 exceeds float32 itself: it must not be reported as an infinite value.
    X = _particles().astype(np.float64) * scale
    with pytest.raises(ValueError, match=r"largest magnitude .* rescale the particles"):
        _fit(estimator_class, X)


@ESTIMATORS
@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_accepted_scales_give_the_same_answer(estimator_class, scale):
    X = _particles()
    reference = _fit(estimator_class, X, max_iter=2)
    scaled = _fit(estimator_class, X * scale, max_iter=2)
    np.testing.assert_array_equal(scaled.labels_, reference.labels_)
    tolerance = 1e-4 * np.abs(reference.references_).max()
    np.testing.assert_allclose(scaled.references_ / scale, reference.references_, atol=tolerance)


@ESTIMATORS
def test_integer_and_float64_input_is_converted_not_refused(estimator_class):
    X = np.rint(_particles() * 100)
    expected = _fit(estimator_class, X.astype(np.float32))
    for dtype in (np.int16, np.int64, np.float64):
        est = _fit(estimator_class, X.astype(dtype))
        assert est.references_.dtype == np.float32
        np.testing.assert_array_equal(est.references_, expected.references_)
        np.testing.assert_array_equal(est.labels_, expected.labels_)


# ------------------------------------------------------------------------- masks


@ESTIMATORS
@pytest.mark.parametrize("shape", [(10, 10, 6), (D, D, D), (3, *HALF), (4, D, D, D)])
def test_mask_array_of_the_wrong_shape(estimator_class, shape):
    message = r"masks array must have shape \(8, 8, 5\) or \(4, 8, 8, 5\)"
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, _particles(), masks=np.ones(shape, dtype=bool))


@ESTIMATORS
def test_mask_for_another_box_size(estimator_class):
    other = ArrayMask(np.ones((10, 10, 6), dtype=bool))
    message = r"masks\[2\] is a half grid for box size 10, but X has box size 8"
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, _particles(), masks=[WEDGE, WEDGE, other, WEDGE])
    with pytest.raises(ValueError, match=r"masks is a half grid for box size 10"):
        _fit(estimator_class, _particles(), masks=other)


@ESTIMATORS
def test_mask_list_with_an_entry_that_is_not_a_mask(estimator_class):
    with pytest.raises(ValueError, match=r"masks\[1\] is neither a Mask nor a boolean half grid"):
        _fit(estimator_class, _particles(), masks=[WEDGE, None, WEDGE, WEDGE])


@ESTIMATORS
@pytest.mark.parametrize("masks", ["wedge", 60, MissingWedge], ids=["str", "int", "class"])
def test_masks_of_the_wrong_type(estimator_class, masks):
    with pytest.raises(TypeError, match=r"masks must be a Mask, one mask per particle"):
        _fit(estimator_class, _particles(), masks=masks)


@ESTIMATORS
def test_one_mask_per_particle(estimator_class):
    with pytest.raises(ValueError, match=r"one mask per particle \(4\), got 3"):
        _fit(estimator_class, _particles(), masks=[WEDGE] * 3)


@ESTIMATORS
def test_all_unobserved_masks(estimator_class):
    X = _particles()
    message = r"observes no Fourier component inside max_resolution"
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, X, masks=np.zeros(HALF, dtype=bool))
    per_particle = np.ones((4, *HALF), dtype=bool)
    per_particle[2] = False
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, X, masks=per_particle)
    # A band below one Fourier pixel leaves nothing observed either.
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, X, max_resolution=0.1)


# -------------------------------------------------------------- hyper-parameters


@ESTIMATORS
@pytest.mark.parametrize("n_classes", [-1, 1.5, True, "2"])
def test_n_classes_must_be_a_positive_integer(estimator_class, n_classes):
    with pytest.raises(ValueError, match=r"n_classes must be an integer >= 1"):
        _fit(estimator_class, _particles(), n_classes=n_classes)


@ESTIMATORS
def test_more_classes_than_particles(estimator_class):
    with pytest.raises(ValueError, match=r"n_classes=5 exceeds the number of particles \(4\)"):
        _fit(estimator_class, _particles(), n_classes=5)


@ESTIMATORS
@pytest.mark.parametrize("step", [0, -15.0, 180.5, np.nan, np.inf, "30", True])
def test_angular_step_outside_0_to_180(estimator_class, step):
    with pytest.raises(ValueError, match=r"angular_step must be a finite number > 0.0, <= 180"):
        _fit(estimator_class, _particles(), angular_step=step)


@ESTIMATORS
def test_angular_step_of_180_is_allowed(estimator_class):
    assert np.all(np.isfinite(_fit(estimator_class, _particles(), angular_step=180).references_))


@ESTIMATORS
@pytest.mark.parametrize("d, max_shift", [(8, 4), (8, 7), (9, 5)])
def test_max_shift_of_half_the_box_or_more(estimator_class, d, max_shift):
    message = rf"max_shift={max_shift} must be smaller than half the box"
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, _particles(d=d), max_shift=max_shift)


@ESTIMATORS
def test_largest_allowed_max_shift(estimator_class):
    est = _fit(estimator_class, _particles(d=9), max_shift=4)
    assert np.all(np.abs(est.shifts_) <= 4)


@ESTIMATORS
@pytest.mark.parametrize("max_shift", [-1, 1.5, "1"])
def test_max_shift_must_be_a_non_negative_integer(estimator_class, max_shift):
    with pytest.raises(ValueError, match=r"max_shift must be an integer >= 0"):
        _fit(estimator_class, _particles(), max_shift=max_shift)


@ESTIMATORS
@pytest.mark.parametrize(
    "n_classes, refs, message",
    [
        (2, np.zeros((3, D, D, D)), r"\(n_classes, D, D, D\) = \(2, 8, 8, 8\), got \(3, 8, 8, 8"),
        (2, np.zeros((2, 6, 6, 6)), r"= \(2, 8, 8, 8\), got \(2, 6, 6, 6\)"),
        (1, np.ones((D, D, D)), r"= \(1, 8, 8, 8\), got \(8, 8, 8\)"),
        (2, np.full((2, D, D, D), np.nan), r"init_references contains NaN or infinite"),
        (2, np.zeros((2, D, D, D), dtype=complex), r"init_references must hold real numbers"),
        (2, "reference.mrc", r"init_references must hold real numbers"),
        (2, [np.zeros((D, D, D)), np.zeros((6, 6, 6))], r"init_references must be an array of"),
    ],
    ids=["n_classes", "box", "single-volume", "nan", "complex", "path", "ragged"],
)
def test_init_references_of_the_wrong_kind(estimator_class, n_classes, refs, message):
    with pytest.raises(ValueError, match=message):
        _fit(estimator_class, _particles(), n_classes=n_classes, init_references=refs)


@ESTIMATORS
@pytest.mark.parametrize(
    "matrix, det",
    [(np.zeros((3, 3)), "0"), (2 * np.eye(3), "8"), (-np.eye(3), "-1"),
     (np.diag([1.0, 1.0, -1.0]), "-1")],
    ids=["zero", "scaled", "inversion", "reflection"],
)
def test_init_rotations_that_are_not_rotations(estimator_class, matrix, det):
    rotations = np.tile(np.eye(3), (4, 1, 1))
    rotations[3] = matrix
    message = rf"init_rotations must be rotation matrices .* matrix 3 .* det R = {det}\)"
    with pytest.raises(ValueError, match=message):
        estimator_class(1, **FAST).fit(_particles(), init_rotations=rotations)
    with pytest.raises(ValueError, match=r"^rotations must be rotation matrices"):
        estimator_class(1, **{**FAST, "rotations": rotations}).fit(_particles())


@ESTIMATORS
def test_rotations_off_by_rounding_are_accepted(estimator_class):
    rotations = np.tile(np.eye(3), (4, 1, 1)).astype(np.float32) + np.float32(1e-7)
    est = estimator_class(1, **{**FAST, "align": False})
    est.fit(_particles(), init_rotations=rotations)
    np.testing.assert_allclose(est.rotations_, np.tile(np.eye(3), (4, 1, 1)), atol=1e-6)


# ------------------------------------------------------------------------ predict


@ESTIMATORS
def test_predict_checks_its_input_like_fit(estimator_class):
    est = _fit(estimator_class, _particles())
    with pytest.raises(ValueError, match=r"X has box size 9, the model was fitted with 8"):
        est.predict(_particles(d=9), masks=None)
    bad = _particles()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite .* first index 3"):
        est.predict(bad, masks=WEDGE)
    with pytest.raises(ValueError, match=r"masks is a half grid for box size 10"):
        est.predict(_particles(), masks=ArrayMask(np.ones((10, 10, 6), dtype=bool)))


# ---------------------------------------------------------------- numerical edges


def _smooth_references(n_classes=2, d=D):
    """Random maps low-passed to 4 voxels, like particles rather than white noise."""
    noise = np.random.default_rng(7).normal(size=(n_classes, d, d, d))
    return lowpass(noise, 1.0, 4.0).astype(np.float32)


def _edge_case_data(case):
    if case == "noise-free":
        data = make_dataset(_smooth_references(), 6, masks=WEDGE, snr=np.inf, random_state=0)
        return data.volumes
    if case == "pure-noise":
        return _particles(n=6)
    if case == "identical":
        return np.repeat(_smooth_references()[:1], 6, axis=0)
    return _particles(n=1)  # a single particle


# test_estimator.test_no_nan_or_inf runs the ML estimator on the first three.
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "estimator_class, case",
    [(ConstrainedCCClassifier, case) for case in ("noise-free", "pure-noise", "identical")]
    + [(ConstrainedCCClassifier, "single"), (MissingDataMLClassifier, "single")],
    ids=["cc-noise-free", "cc-pure-noise", "cc-identical", "cc-single", "ml-single"],
)
def test_edge_case_data_give_finite_results_without_warnings(estimator_class, case):
    X = _edge_case_data(case)
    n_classes = 1 if len(X) == 1 else 2
    # Two classes of identical particles: one stays empty, and the fit says so.
    with pytest.warns(ClassCollapseWarning) if case == "identical" else nullcontext():
        est = _fit(estimator_class, X, n_classes=n_classes, max_iter=2)
    for name, value in _fitted_outputs(est).items():
        assert np.all(np.isfinite(value)), name
    np.testing.assert_array_equal(est.predict(X, masks=WEDGE), est.labels_)
    if case == "identical":
        assert len(set(est.labels_.tolist())) == 1  # identical particles, one class
    if estimator_class is ConstrainedCCClassifier:
        assert np.all(np.abs(est.max_correlation_) <= 1 + 1e-6)
        assert np.all(np.isfinite(est.decision_function(X, masks=WEDGE)))
    else:
        assert est.sigma_ > 0
        np.testing.assert_allclose(est.predict_proba(X, masks=WEDGE), 1.0)


# ---------------------------------------------------------------------------- io


def _corrupt(tmp_path, name, edit):
    path = tmp_path / name
    write_map(path, np.ones((D, D, D)), 1.0)
    raw = bytearray(path.read_bytes())
    edit(raw)
    path.write_bytes(bytes(raw))
    return path


def _set_word(offset, value):
    def edit(raw):
        raw[offset : offset + 4] = struct.pack("<i", value)

    return edit


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("text.mrc", lambda raw: raw.__setitem__(slice(None), b"not an MRC file\n" * 200),
         r"text.mrc: corrupt or truncated MRC file"),
        ("empty.mrc", lambda raw: raw.clear(), r"empty.mrc: not a readable MRC file"),
        ("mode.mrc", _set_word(12, 99), r"mode.mrc: corrupt or truncated MRC file .*mode '99'"),
        ("big.mrc", _set_word(0, 16), r"big.mrc: corrupt or truncated MRC file"),
        ("negative.mrc", _set_word(4, -5), r"negative.mrc: corrupt or truncated MRC file"),
        ("ext.mrc", _set_word(92, 10**5), r"ext.mrc: corrupt or truncated MRC file .*extended"),
    ],
    ids=["text", "empty", "mode", "dimensions", "negative-size", "extended-header"],
)
def test_corrupt_mrc_files_are_named(tmp_path, name, edit, message):
    path = _corrupt(tmp_path, name, edit)
    with pytest.raises(ValueError, match=message):
        read_particles([path])


def test_a_folder_given_as_an_mrc_file(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder, not an MRC file; pass a pattern like"):
        read_particles([tmp_path])


def _optics(groups=(1,)):
    return pd.DataFrame({"rlnOpticsGroup": list(groups), "rlnImagePixelSize": [2.0] * len(groups)})


@pytest.mark.parametrize(
    "blocks, error, message",
    [
        ("this is not a STAR file\n", ValueError, r"no particle table"),
        ("data_particles\n\nloop_\n_rlnImageName #1\n", ValueError, r"particle table is empty"),
        ({"particles": pd.DataFrame({"rlnImageName": ["a.mrc"], "mlsWedgeTiltMin": [-60.0]})},
         ValueError, r"wedge columns incomplete, mlsWedgeTiltMax is missing"),
        ({"particles": pd.DataFrame({"rlnImageName": ["a.mrc"], "mlsWedgeTiltMin": [-60.0],
                                     "mlsWedgeTiltMax": [120.0]})},
         ValueError, r"particle 1: invalid wedge columns: tilt_max"),
        ({"optics": _optics(), "particles": pd.DataFrame({"rlnImageName": ["a.mrc"],
                                                          "rlnOpticsGroup": [3]})},
         ValueError, r"optics group\(s\) \[3\] used by particles are not in data_optics"),
        ({"optics": _optics((1, 2)), "particles": pd.DataFrame({"rlnImageName": ["a.mrc"]})},
         ValueError, r"2 optics groups but the particles have no rlnOpticsGroup column"),
        ({"particles": pd.DataFrame({"rlnImageName": ["a.mrc", "gone.mrc"]})},
         FileNotFoundError, r"image file gone.mrc not found \(rlnImageName 'gone.mrc' in STAR"),
        ({"particles": pd.DataFrame({"rlnImageName": ["2@gone.mrcs"]})},
         FileNotFoundError, r"image file gone.mrcs not found"),
        ({"particles": pd.DataFrame({"rlnImageName": ["0@a.mrc"]})},
         ValueError, r"particle 1 of .*: image index must start at 1"),
    ],
    ids=["not-star", "no-rows", "half-wedge", "bad-wedge", "unknown-optics-group",
         "ambiguous-optics", "missing-image", "missing-stack", "index-0"],
)
def test_bad_star_files_are_named(tmp_path, blocks, error, message):
    write_map(tmp_path / "a.mrc", np.ones((D, D, D)), 2.0)
    star = tmp_path / "p.star"
    if isinstance(blocks, str):
        star.write_text(blocks)
    else:
        starfile.write(blocks, star)
    with pytest.raises(error, match=message):
        read_particles(star)


# --------------------------------------------------------------------------- cli


@pytest.fixture
def star(tmp_path):
    refs = _smooth_references()
    data = make_dataset(refs, 4, masks=WEDGE, snr=1.0, random_state=0, voxel_size=10.0)
    return write_simulated(tmp_path / "data", data)


def _snapshot(folder):
    """Bytes and mtime of every file, and the mtime of every folder (new entries change it)."""
    return {
        p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _fit_fails(capsys, argv, message):
    # Options given in argv come later and win over these.
    options = ["--classes", "1", "--angular-step", "90", "--iterations", "1", "--n-jobs", "1"]
    code = main(["fit", *options, *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mlsubtomo: error:") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("target", ["star", "image"])
def test_cli_out_pointing_at_an_input_file_leaves_it_untouched(star, capsys, target, overwrite):
    out = star if target == "star" else star.parent / "particles" / "particle_000001.mrc"
    before = _snapshot(star.parent)
    _fit_fails(capsys, [star, "--out", out, *overwrite], "is an input file")
    assert _snapshot(star.parent) == before


def test_cli_out_folder_holding_the_input_star_is_refused_before_fitting(star, capsys):
    before = _snapshot(star.parent)
    _fit_fails(capsys, [star, "--out", star.parent, "--overwrite"],
               "holds input file particles.star")
    assert _snapshot(star.parent) == before  # no run.log, checkpoint or class maps


def test_cli_out_folder_inside_an_input_file(star, capsys):
    before = _snapshot(star.parent)
    _fit_fails(capsys, [star, "--out", star / "results"], "cannot create output folder")
    assert _snapshot(star.parent) == before


def test_cli_reports_bad_particles_in_one_line(star, capsys, tmp_path):
    _fit_fails(capsys, [star.parent, "--out", tmp_path / "r"], "is a folder, not an MRC file")
    _fit_fails(capsys, [star.parent / "particles" / "particle_000001.mrc", "--out",
                        tmp_path / "r2", "--full-data", "--classes", "2"],
               "n_classes=2 exceeds the number of particles (1)")
