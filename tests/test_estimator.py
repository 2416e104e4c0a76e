"""Behaviour of MissingDataMLClassifier on simulated data, and its scikit-learn API."""

import pickle
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
from conftest import BOX
from scipy.spatial.transform import Rotation
from sklearn import config_context
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline

from mlsubtomo.estimator import ClassCollapseWarning, MissingDataMLClassifier
from mlsubtomo.masks import MissingWedge
from mlsubtomo.metrics import class_purity, classified_orientation_errors
from mlsubtomo.preprocessing import ParticleNormalizer
from mlsubtomo.regularization import LinearDecay
from mlsubtomo.sampling import so3_grid, symmetry_group
from mlsubtomo.simulate import make_dataset

WEDGE = MissingWedge(-60, 60)


@pytest.fixture(scope="module")
def two_class_data(phantoms):
    return make_dataset(phantoms, 60, masks=WEDGE, snr=0.1, max_shift=1, random_state=0)


def _orientation_error(data, est, symmetry_of_class):
    """Median orientation error over particles placed in their majority class."""
    groups = [symmetry_group(name).as_matrix() for name in symmetry_of_class]
    errors = classified_orientation_errors(
        data.labels, est.labels_, data.rotations, est.rotations_, groups
    )
    return float(np.median(errors))


def test_recovers_classes_and_orientations(two_class_data):
    data = two_class_data
    est = MissingDataMLClassifier(
        2,
        angular_step=30,
        max_shift=1,
        max_iter=12,
        regularization=LinearDecay(5.0, 5),
        random_state=0,
        n_jobs=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassCollapseWarning)
        est.fit(data.volumes, masks=data.masks)
    # Over 3 data sets and 3 random_state of the estimator the purity was 0.93-1.0.
    assert class_purity(data.labels, est.labels_) >= 0.9
    # GroEL is D7-symmetric, GroEL-GroES C7: orientations are defined modulo those.
    assert _orientation_error(data, est, ["D7", "C7"]) < 30
    assert np.all(np.isfinite(est.references_))


def test_fourier_reference_rotation_recovers_the_same_classes(two_class_data):
    data = two_class_data
    params = dict(angular_step=30, max_shift=1, max_iter=12, random_state=0,
                  regularization=LinearDecay(5.0, 5))
    real = MissingDataMLClassifier(2, **params).fit(data.volumes, masks=data.masks)
    fourier = MissingDataMLClassifier(2, reference_rotation="fourier", **params).fit(
        data.volumes, masks=data.masks
    )
    assert class_purity(data.labels, fourier.labels_) >= class_purity(data.labels, real.labels_)
    # The two rotations differ by their interpolation errors, not by convention: on a
    # 30-degree grid the orientations found agree to within a grid step.
    assert _orientation_error(data, fourier, ["D7", "C7"]) < _orientation_error(
        data, real, ["D7", "C7"]
    ) + 30


def test_alignment_only_k1(phantoms):
    data = make_dataset(phantoms[1:], 40, masks=WEDGE, snr=0.1, max_shift=1, random_state=1)
    est = MissingDataMLClassifier(1, angular_step=30, max_shift=1, max_iter=8, random_state=0)
    est.fit(data.volumes, masks=data.masks)
    assert _orientation_error(data, est, ["C7"]) < 30


def test_log_likelihood_never_decreases_with_fixed_orientations(phantoms):
    data = make_dataset(phantoms, 30, masks=WEDGE, snr=0.1, max_shift=1, random_state=2)
    est = MissingDataMLClassifier(
        2, rotations=so3_grid(45), max_shift=1, max_iter=10, tol=0, random_state=0
    )
    est.fit(data.volumes, masks=data.masks)
    history = np.asarray(est.log_likelihood_history_)
    assert len(history) == 11
    steps = np.diff(history)
    assert np.all(steps >= -1e-6 * np.abs(history[1:])), steps


@pytest.mark.parametrize("case", ["noise_free", "pure_noise", "identical"])
def test_no_nan_or_inf(phantoms, case):
    rng = np.random.default_rng(3)
    if case == "noise_free":
        data = make_dataset(phantoms, 12, masks=WEDGE, snr=np.inf, random_state=3)
        X = data.volumes
    elif case == "pure_noise":
        X = rng.normal(size=(12, BOX, BOX, BOX)).astype(np.float32)
    else:
        X = np.repeat(phantoms[:1], 12, axis=0)
    est = MissingDataMLClassifier(2, angular_step=60, max_shift=1, max_iter=4, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Two classes of identical particles: one stays empty, and the fit says so.
        with pytest.warns(ClassCollapseWarning) if case == "identical" else nullcontext():
            est.fit(X, masks=WEDGE)
        proba = est.predict_proba(X, masks=WEDGE)
    for value in (
        est.references_,
        est.class_weights_,
        est.sigma_,
        est.xi_,
        est.log_likelihood_history_,
        est.max_posterior_,
        est.particle_log_likelihood_,
        proba,
    ):
        assert np.all(np.isfinite(value))
    assert est.sigma_ > 0
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-9)


def test_n_jobs_does_not_change_results(phantoms):
    data = make_dataset(phantoms, 16, masks=WEDGE, snr=0.2, max_shift=1, random_state=4)
    params = dict(angular_step=45, max_shift=1, max_iter=3, random_state=0)
    one = MissingDataMLClassifier(2, n_jobs=1, **params).fit(data.volumes, masks=WEDGE)
    two = MissingDataMLClassifier(2, n_jobs=2, **params).fit(data.volumes, masks=WEDGE)
    np.testing.assert_array_equal(one.labels_, two.labels_)
    scale = np.abs(one.references_).max()
    np.testing.assert_allclose(two.references_, one.references_, atol=1e-5 * scale)


def test_sklearn_api(phantoms):
    data = make_dataset(phantoms, 10, masks=WEDGE, snr=0.5, random_state=5)
    est = MissingDataMLClassifier(2, angular_step=60, max_shift=0, max_iter=2, random_state=0)
    with pytest.raises(NotFittedError):
        est.predict(data.volumes, masks=WEDGE)
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    copy.set_params(n_classes=3)
    assert copy.n_classes == 3 and est.n_classes == 2

    labels = est.fit_predict(data.volumes, masks=WEDGE)
    np.testing.assert_array_equal(labels, est.labels_)
    np.testing.assert_array_equal(est.predict(data.volumes, masks=WEDGE), est.labels_)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(
        restored.predict_proba(data.volumes, masks=WEDGE),
        est.predict_proba(data.volumes, masks=WEDGE),
    )
    scores = est.score_samples(data.volumes, masks=WEDGE)
    np.testing.assert_allclose(scores, est.particle_log_likelihood_, rtol=1e-10)
    assert est.score(data.volumes, masks=WEDGE) == pytest.approx(scores.mean())
    np.testing.assert_allclose(
        est.euler_angles_[:, 1], np.degrees(np.arccos(np.clip(est.rotations_[:, 2, 2], -1, 1)))
    )


def test_pipeline_with_routed_masks(phantoms):
    data = make_dataset(phantoms, 10, masks=WEDGE, snr=0.5, random_state=6)
    X = data.volumes * 7.0 + 3.0  # a different grey scale, undone by the normaliser
    with config_context(enable_metadata_routing=True):
        est = MissingDataMLClassifier(2, angular_step=60, max_shift=0, max_iter=2, random_state=0)
        est.set_fit_request(masks=True).set_predict_request(masks=True)
        est.set_score_request(masks=True)
        pipe = make_pipeline(ParticleNormalizer(), est)
        pipe.fit(X, masks=WEDGE)
        labels = pipe.predict(X, masks=WEDGE)
        assert np.isfinite(pipe.score(X, masks=WEDGE))
    direct = clone(est).fit(ParticleNormalizer().fit_transform(X), masks=WEDGE)
    np.testing.assert_array_equal(labels, direct.labels_)


@pytest.mark.parametrize(
    "kwargs, X_shape, message",
    [
        ({"n_classes": 0}, (4, 8, 8, 8), "n_classes"),
        ({"n_classes": 5}, (4, 8, 8, 8), "exceeds the number of particles"),
        ({"angular_step": 0}, (4, 8, 8, 8), "angular_step"),
        ({"max_shift": 4}, (4, 8, 8, 8), "max_shift"),
        ({"missing_data": "ignore"}, (4, 8, 8, 8), "missing_data"),
        ({"reference_rotation": "spline"}, (4, 8, 8, 8), "reference_rotation"),
        ({}, (4, 8, 8, 9), "non-cubic"),
        ({}, (8, 8, 8), "shape \\(N, D, D, D\\)"),
    ],
)
def test_bad_input_is_named(kwargs, X_shape, message):
    X = np.random.default_rng(0).normal(size=X_shape)
    with pytest.raises(ValueError, match=message):
        MissingDataMLClassifier(**{"max_iter": 1, **kwargs}).fit(X)


def test_nan_input_is_named():
    X = np.random.default_rng(0).normal(size=(4, 8, 8, 8))
    X[2, 1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MissingDataMLClassifier(max_iter=1).fit(X)


@pytest.mark.parametrize("min_box_size", [None, 8])
def test_resumed_run_equals_an_uninterrupted_one(phantoms, tmp_path, min_box_size):
    data = make_dataset(phantoms, 16, masks=WEDGE, snr=0.2, max_shift=1, random_state=7)
    params = dict(
        angular_step=45, max_shift=1, tol=0, random_state=0, regularization=LinearDecay(5.0, 5),
        min_box_size=min_box_size,
    )
    full = MissingDataMLClassifier(2, max_iter=6, **params).fit(data.volumes, masks=WEDGE)
    path = tmp_path / "run.ckpt"
    # "Killed" after iteration 3: its checkpoint holds the state after that iteration.
    MissingDataMLClassifier(2, max_iter=3, checkpoint_path=path, **params).fit(
        data.volumes, masks=WEDGE
    )
    resumed = MissingDataMLClassifier(
        2, max_iter=6, checkpoint_path=path, resume=True, **params
    ).fit(data.volumes, masks=WEDGE)
    assert resumed.n_iter_ == 6
    assert resumed.box_size_history_ == full.box_size_history_
    np.testing.assert_allclose(resumed.log_likelihood_history_, full.log_likelihood_history_,
                               rtol=1e-6)
    scale = np.abs(full.references_).max()
    np.testing.assert_allclose(resumed.references_, full.references_, atol=1e-6 * scale)
    np.testing.assert_array_equal(resumed.labels_, full.labels_)
    with pytest.raises(ValueError, match="hyper-parameters: n_classes"):
        MissingDataMLClassifier(3, max_iter=6, checkpoint_path=path, resume=True, **params).fit(
            data.volumes, masks=WEDGE
        )
    with pytest.raises(ValueError, match="different data"):
        MissingDataMLClassifier(2, max_iter=6, checkpoint_path=path, resume=True, **params).fit(
            data.volumes[::-1], masks=WEDGE
        )


def test_classification_only_with_given_orientations(phantoms):
    # With the orientations fixed, EM from random references separated the classes
    # at SNR 0.1 only sometimes (purity 0.50-0.98 over 3 data sets and 4 random_state
    # of the estimator); at SNR 0.3, 0.95-1.0 (1.0 for all four on this data set).
    data = make_dataset(phantoms, 60, masks=WEDGE, snr=0.3, max_shift=1, random_state=8)
    est = MissingDataMLClassifier(
        2, align=False, max_iter=10, regularization=LinearDecay(5.0, 5), random_state=0
    )
    est.fit(data.volumes, masks=WEDGE, init_rotations=data.rotations, init_shifts=data.shifts)
    assert class_purity(data.labels, est.labels_) >= 0.95
    np.testing.assert_allclose(est.rotations_, data.rotations, atol=1e-12)
    np.testing.assert_array_equal(est.shifts_, data.shifts)


def test_local_search_stays_near_the_given_orientations(phantoms):
    data = make_dataset(phantoms[1:], 20, masks=WEDGE, snr=0.5, random_state=9)
    est = MissingDataMLClassifier(
        1, angular_step=15, local_search=20, max_shift=0, max_iter=2, random_state=0,
        init_references=phantoms[1][None],
    )
    est.fit(data.volumes, masks=WEDGE, init_rotations=data.rotations)
    # Every orientation searched lies within 20 degrees of the given one.
    relative = np.einsum("nji,njk->nik", data.rotations, est.rotations_)
    angles = np.degrees(np.arccos(np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.all(angles <= 20 + 1e-6)
    assert np.median(angles) < 15


def test_grid_search_chooses_n_classes_by_held_out_log_likelihood(phantoms):
    from sklearn.model_selection import GridSearchCV, KFold

    data = make_dataset(phantoms, 36, masks=WEDGE, snr=0.5, random_state=10)
    with config_context(enable_metadata_routing=True):
        est = MissingDataMLClassifier(
            angular_step=45, max_shift=0, max_iter=6, regularization=LinearDecay(5.0, 5),
            random_state=0,
        )
        est.set_fit_request(masks=True).set_score_request(masks=True)
        search = GridSearchCV(est, {"n_classes": [1, 2]}, cv=KFold(3, shuffle=True,
                                                                   random_state=0))
        search.fit(data.volumes, masks=WEDGE)
    assert search.best_params_ == {"n_classes": 2}
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0]


def test_symmetry_restricts_the_search_and_symmetrises_the_averages(phantoms):
    from mlsubtomo.transform import rotate_volume

    data = make_dataset(phantoms[1:], 20, masks=WEDGE, snr=0.5, random_state=11)
    est = MissingDataMLClassifier(
        1, angular_step=30, symmetry="C7", max_shift=0, max_iter=3, random_state=0
    )
    est.fit(data.volumes, masks=WEDGE)
    ref = est.references_[0]
    # C7 about z up to the interpolation of the symmetrising rotations.
    for g in symmetry_group("C7").as_matrix()[1:]:
        turned = rotate_volume(ref, g, order=3)
        assert np.linalg.norm(turned - ref) < 0.05 * np.linalg.norm(ref)
    assert _orientation_error(data, est, ["C7"]) < 30


def test_dask_cluster_gives_the_serial_result(phantoms):
    # The kernel's joblib tasks run on the workers of a real two-process cluster.
    distributed = pytest.importorskip("distributed")
    from joblib import parallel_config

    data = make_dataset(phantoms, 12, masks=WEDGE, snr=0.2, max_shift=1, random_state=6)
    params = dict(angular_step=60, max_shift=1, max_iter=2, random_state=0)
    serial = MissingDataMLClassifier(2, n_jobs=1, **params).fit(data.volumes, masks=WEDGE)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster), parallel_config(backend="dask"):
        remote = MissingDataMLClassifier(2, n_jobs=2, **params).fit(data.volumes, masks=WEDGE)
    np.testing.assert_array_equal(remote.labels_, serial.labels_)
    scale = np.abs(serial.references_).max()
    np.testing.assert_allclose(remote.references_, serial.references_, atol=1e-5 * scale)
    np.testing.assert_allclose(
        remote.log_likelihood_history_, serial.log_likelihood_history_, rtol=1e-6
    )


def test_local_refinement_continues_after_the_global_search_converges(phantoms):
    data = make_dataset(phantoms, 24, masks=WEDGE, snr=0.5, max_shift=1, random_state=8)
    # max_iter leaves room: the plain run converged after 10-13 iterations on 3 data sets.
    params = dict(angular_step=45, max_shift=1, tol=0.5, max_iter=20, random_state=0,
                  regularization=LinearDecay(5.0, 3), perturb=False)
    plain = MissingDataMLClassifier(2, **params).fit(data.volumes, masks=WEDGE)
    assert plain.converged_ and plain.n_iter_ < 20
    refined = MissingDataMLClassifier(2, local_refinement=30.0, **params).fit(
        data.volumes, masks=WEDGE
    )
    # The same global iterations, then local ones until convergence or max_iter.
    n = refined.refinement_start_
    assert n is not None and 3 <= n <= plain.n_iter_
    assert refined.n_iter_ > n
    np.testing.assert_allclose(
        refined.log_likelihood_history_[:n], plain.log_likelihood_history_[:n], rtol=1e-9
    )
    # Searching near the settled orientations keeps the classes (2 of 24 may move).
    assert class_purity(plain.labels_, refined.labels_) >= 22 / 24


def test_symmetric_local_search_reaches_across_the_asymmetric_unit(phantoms):
    # The grid holds one asymmetric unit of C7, so most random orientations lie
    # outside it: their neighbours are grid orientations times a symmetry mate.
    data = make_dataset(phantoms[1:], 20, masks=WEDGE, snr=0.5, random_state=9)
    est = MissingDataMLClassifier(
        1, angular_step=15, symmetry="C7", local_search=20, max_shift=0, max_iter=1,
        random_state=0, init_references=phantoms[1][None],
    )
    est.fit(data.volumes, masks=WEDGE, init_rotations=data.rotations)
    group = symmetry_group("C7").as_matrix()
    relative = np.einsum("nji,njk,gkl->ngil", data.rotations, est.rotations_, group)
    traces = np.trace(relative, axis1=2, axis2=3).max(axis=1)
    angles = np.degrees(np.arccos(np.clip((traces - 1) / 2, -1, 1)))
    assert np.all(angles <= 20 + 1e-6)


def test_orientation_change_is_measured_modulo_the_symmetry():
    est = MissingDataMLClassifier(1, symmetry="C7")
    start = Rotation.random(5, random_state=0).as_matrix()
    mate = symmetry_group("C7").as_matrix()[3]
    previous = {"labels": np.zeros(5, dtype=int), "best_rotations": start}
    _, turned = est._assignment_changes(previous, np.zeros(5, dtype=int), start @ mate)
    assert turned == pytest.approx(0.0, abs=1e-6)
    tilt = Rotation.from_euler("x", 10, degrees=True).as_matrix()
    _, turned = est._assignment_changes(previous, np.zeros(5, dtype=int), start @ tilt)
    assert turned == pytest.approx(10.0, abs=1e-6)
