"""ConstrainedCCClassifier: the cross-correlation baseline."""

import numpy as np
import pytest
from conftest import BOX

from mlsubtomo.baselines import ConstrainedCCClassifier
from mlsubtomo.masks import MissingWedge
from mlsubtomo.metrics import class_purity
from mlsubtomo.regularization import LinearDecay
from mlsubtomo.simulate import make_dataset
from mlsubtomo.transform import centre_for_fft, rotate_volume, shift_volume

WEDGE = MissingWedge(-60, 60)


def test_easy_data_is_classified_perfectly(phantoms):
    # 30 per class: with 15, hard assignment collapsed the classes (purity 0.5) for 2
    # of 6 random_state of the estimator; with 30 all 6 were perfect.
    data = make_dataset(phantoms, 60, masks=WEDGE, snr=0.5, max_shift=1, random_state=0)
    # The paper's regularisation schedule, which it used for CC as well.
    est = ConstrainedCCClassifier(
        2, angular_step=30, max_shift=1, max_iter=8, regularization=LinearDecay(5.0, 5),
        random_state=0, n_jobs=2,
    )
    est.fit(data.volumes, masks=WEDGE)
    assert class_purity(data.labels, est.labels_) == 1.0
    assert np.all((est.max_correlation_ > 0) & (est.max_correlation_ <= 1))
    np.testing.assert_array_equal(est.predict(data.volumes, masks=WEDGE), est.labels_)


def _direct_weighted_average(data, threshold=0.1):
    """sum_i R_i^-1 S_-t_i (w_i X_i) / sum_i w_i(R_i q), written out particle by particle."""
    d = data.volumes.shape[-1]
    k = len(data.references)
    sums = np.zeros((k, d, d, d // 2 + 1), dtype=np.complex128)
    counts = np.zeros((k, d, d, d // 2 + 1))
    mask = WEDGE.observed(d)
    for x, label, rotation, shift in zip(
        data.volumes, data.labels, data.rotations, data.shifts, strict=True
    ):
        observed = np.fft.irfftn(np.fft.rfftn(x) * mask, s=x.shape, axes=(0, 1, 2))
        back = rotate_volume(shift_volume(observed, -shift).astype(np.float32), rotation.T)
        rotated_mask = WEDGE.observed(d, rotation=rotation.T)
        sums[label] += np.fft.rfftn(centre_for_fft(back)) / d**1.5 * rotated_mask
        counts[label] += rotated_mask
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > threshold, sums / counts, 0.0), counts > threshold


def test_averages_equal_a_direct_weighted_average_given_the_truth(phantoms):
    data = make_dataset(phantoms, 12, masks=WEDGE, snr=0.5, max_shift=1, random_state=1)
    est = ConstrainedCCClassifier(
        2, align=False, init_references=np.stack(phantoms), max_iter=1, random_state=0
    )
    est.fit(data.volumes, masks=WEDGE, init_rotations=data.rotations, init_shifts=data.shifts)
    np.testing.assert_array_equal(est.labels_, data.labels)
    expected, support = _direct_weighted_average(data)
    got = np.fft.rfftn(centre_for_fft(est.references_), axes=(1, 2, 3)) / BOX**1.5
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got[support], expected[support], atol=1e-5 * scale)


@pytest.fixture(scope="module")
def small_data(phantoms):
    return make_dataset(phantoms, 16, masks=WEDGE, snr=0.2, max_shift=1, random_state=7)


# Angular step and regularisation with which the CC run on ``small_data`` stops, all
# particles keeping their class, after its 4th iteration.
SMALL_RUN = dict(angular_step=45, max_shift=1, random_state=0, regularization=LinearDecay(5.0, 5))


def test_resumed_run_equals_an_uninterrupted_one(small_data, tmp_path):
    data = small_data
    full = ConstrainedCCClassifier(2, max_iter=10, **SMALL_RUN).fit(data.volumes, masks=WEDGE)
    # Stopping after iteration 4 (not 10) needs the labels of iteration 3 from the
    # checkpoint: without them every particle would count as changed.
    assert full.converged_ and 3 < full.n_iter_ < 10
    path = tmp_path / "cc.ckpt"
    # "Killed" after iteration 3: its checkpoint holds the state after that iteration.
    stopped = ConstrainedCCClassifier(2, max_iter=3, checkpoint_path=path, **SMALL_RUN)
    stopped.fit(data.volumes, masks=WEDGE)
    assert stopped.n_iter_ == 3 and not stopped.converged_
    resumed = ConstrainedCCClassifier(
        2, max_iter=10, checkpoint_path=path, resume=True, **SMALL_RUN
    ).fit(data.volumes, masks=WEDGE)
    assert resumed.n_iter_ == full.n_iter_ and resumed.converged_
    np.testing.assert_allclose(resumed.correlation_history_, full.correlation_history_,
                               rtol=1e-6)
    scale = np.abs(full.references_).max()
    np.testing.assert_allclose(resumed.references_, full.references_, atol=1e-6 * scale)
    np.testing.assert_allclose(resumed.class_weights_, full.class_weights_, atol=1e-12)
    np.testing.assert_array_equal(resumed.labels_, full.labels_)
    np.testing.assert_allclose(resumed.rotations_, full.rotations_, atol=1e-6)
    np.testing.assert_array_equal(resumed.shifts_, full.shifts_)
    with pytest.raises(ValueError, match="hyper-parameters: n_classes"):
        ConstrainedCCClassifier(
            3, max_iter=10, checkpoint_path=path, resume=True, **SMALL_RUN
        ).fit(data.volumes, masks=WEDGE)
    with pytest.raises(ValueError, match="hyper-parameters: weighted_average_threshold"):
        ConstrainedCCClassifier(
            2, max_iter=10, checkpoint_path=path, resume=True, weighted_average_threshold=0.5,
            **SMALL_RUN,
        ).fit(data.volumes, masks=WEDGE)
    with pytest.raises(ValueError, match="different data"):
        ConstrainedCCClassifier(
            2, max_iter=10, checkpoint_path=path, resume=True, **SMALL_RUN
        ).fit(data.volumes[::-1], masks=WEDGE)


def test_tol_none_runs_every_iteration(small_data):
    data = small_data
    early = ConstrainedCCClassifier(2, max_iter=6, **SMALL_RUN).fit(data.volumes, masks=WEDGE)
    assert early.converged_ and early.n_iter_ < 6
    every = ConstrainedCCClassifier(2, max_iter=6, tol=None, **SMALL_RUN).fit(
        data.volumes, masks=WEDGE
    )
    assert every.n_iter_ == 6 and not every.converged_
    assert len(every.correlation_history_) == 7
    # The stopping rule changes when the iterations end, not what they do.
    np.testing.assert_allclose(
        every.correlation_history_[: early.n_iter_], early.correlation_history_[:-1], rtol=1e-6
    )


@pytest.mark.parametrize("tol", [-0.1, 1.5, np.nan, "0", True])
def test_bad_tol_is_named(tol):
    X = np.random.default_rng(0).normal(size=(4, 8, 8, 8))
    with pytest.raises(ValueError, match="tol must be"):
        ConstrainedCCClassifier(tol=tol).fit(X)
