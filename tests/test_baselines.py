"""ConstrainedCCClassifier: the cross-correlation baseline."""

import numpy as np
from conftest import BOX

from mlsubtomo.baselines import ConstrainedCCClassifier
from mlsubtomo.masks import MissingWedge
from mlsubtomo.metrics import class_purity
from mlsubtomo.regularization import LinearDecay
from mlsubtomo.simulate import make_dataset
from mlsubtomo.transform import centre_for_fft, rotate_volume, shift_volume

WEDGE = MissingWedge(-60, 60)


def test_easy_data_is_classified_perfectly(phantoms):
    data = make_dataset(phantoms, 30, masks=WEDGE, snr=0.5, max_shift=1, random_state=0)
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
