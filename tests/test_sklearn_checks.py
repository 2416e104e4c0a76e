"""scikit-learn's estimator checks, over both estimators.

The estimators take stacks of cubic volumes (N, D, D, D); the checks listed below
fit on 2-D toy data (n_samples, n_features) or need an arbitrary number of
features, which has no meaning for a volume, so they are expected to fail with
the estimators' own shape error. Every other check must pass.
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from mlsubtomo import ConstrainedCCClassifier, MissingDataMLClassifier

_TWO_D = "fits 2-D toy data (n_samples, n_features); X must be (N, D, D, D) volumes"
_FEATURES = "needs an arbitrary number of features; a volume stack has D^3 voxels in a cube"

EXPECTED_FAILURES = {
    "check_fit_score_takes_y": _TWO_D,
    "check_estimators_overwrite_params": _TWO_D,
    "check_dont_overwrite_parameters": _TWO_D,
    "check_estimators_fit_returns_self": _TWO_D,
    "check_readonly_memmap_input": _TWO_D,
    "check_positive_only_tag_during_fit": _TWO_D,
    "check_estimators_dtypes": _TWO_D,
    "check_dtype_object": _TWO_D,
    "check_pipeline_consistency": _TWO_D,
    "check_estimators_nan_inf": _TWO_D,
    "check_estimators_pickle": _TWO_D,
    "check_f_contiguous_array_estimator": _TWO_D,
    "check_methods_sample_order_invariance": _TWO_D,
    "check_methods_subset_invariance": _TWO_D,
    "check_fit2d_1sample": _TWO_D,
    "check_dict_unchanged": _TWO_D,
    "check_fit_idempotent": _TWO_D,
    "check_fit_check_is_fitted": _TWO_D,
    "check_fit2d_predict1d": _TWO_D,
    "check_n_features_in_after_fitting": _FEATURES,
    "check_estimators_empty_data_messages": _FEATURES,
    "check_fit2d_1feature": _FEATURES,
    "check_n_features_in": _FEATURES,
}


@parametrize_with_checks(
    [
        MissingDataMLClassifier(max_iter=2, angular_step=90),
        ConstrainedCCClassifier(max_iter=2, angular_step=90),
    ],
    expected_failed_checks=lambda estimator: EXPECTED_FAILURES,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
