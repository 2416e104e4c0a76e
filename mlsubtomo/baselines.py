"""The constrained cross-correlation baseline the paper compared ML against."""

from __future__ import annotations

import time

import numpy as np
from sklearn.utils import check_random_state

from . import kernel
from .estimator import _check_real, _log, _SubtomogramClassifier
from .regularization import check_schedule, penalised_update

__all__ = ["ConstrainedCCClassifier"]


class ConstrainedCCClassifier(_SubtomogramClassifier):
    """Alignment and classification by constrained cross-correlation (Förster et al. 2008).

    Each iteration assigns every particle to the single (class, orientation, shift)
    of maximum correlation over the particle's own observed Fourier components, then
    recomputes each class average as the weighted average of its particles (sums of
    the observed components divided by the number of times each was observed,
    zero below ``weighted_average_threshold``). This is xmipp_ml_tomo's ``--maxCC``
    mode (reference section 4b), with the wedge counts summed and shifts bounded by
    ``max_shift``.

    Parameters
    ----------
    n_classes : int, default=2
    angular_step : float, default=15.0
    rotations : Rotation or ndarray of shape (R, 3, 3), default=None
    symmetry : str, default="C1"
    perturb : bool, default=True
    max_shift : int, default=None
        Largest shift per axis in voxels; None searches the whole box.
    max_resolution : float or None, default=0.5
    weighted_average_threshold : float, default=0.1
    regularization : None, float or Schedule, default=None
        Pulls the class averages towards each other as in the ML estimator (the
        paper used the same schedule for both); the class masses are the class sizes.
    init_references : ndarray of shape (K, D, D, D), default=None
        None: weighted averages of K random subsets in random orientations.
    align : bool, default=True
    local_search : float, default=None
    max_iter : int, default=40
        Number of iterations at most (exactly, with ``tol=None``).
    tol : float or None, default=0.0
        Stop when at most this fraction of the particles changed class in an
        iteration (0: when none did). None never stops early: all ``max_iter``
        iterations run, as when comparing with an ML run of as many iterations.
    interpolation_order : int, default=1
    fft_backend : {"pyfftw", "scipy"}, default="pyfftw"
    n_jobs : int, default=None
    memory_budget : float, default=2.0
        As in :class:`MissingDataMLClassifier`.
    random_state : int, RandomState or None, default=None
    verbose : int, default=0
    checkpoint_path : str or path, default=None
        As in :class:`~mlsubtomo.estimator.MissingDataMLClassifier`: the state of the
        run is written atomically after every iteration.
    resume : bool, default=False
        As in :class:`~mlsubtomo.estimator.MissingDataMLClassifier`: continue from the
        checkpoint's last complete iteration, to the result of an uninterrupted run.

    Attributes
    ----------
    references_ : ndarray of shape (K, D, D, D)
    class_weights_ : ndarray of shape (K,)
        Fraction of the particles in each class.
    labels_ : ndarray of shape (N,)
    rotations_, shifts_, euler_angles_ :
        Pose of each particle's best match, as in
        :class:`~mlsubtomo.estimator.MissingDataMLClassifier`.
    max_correlation_ : ndarray of shape (N,)
    correlation_history_ : list of float
        Mean best correlation in each iteration (last entry: the fitted model).
    n_iter_ : int
    converged_ : bool
    """

    def __init__(
        self,
        n_classes=2,
        *,
        angular_step=15.0,
        rotations=None,
        symmetry="C1",
        perturb=True,
        max_shift=None,
        max_resolution=0.5,
        weighted_average_threshold=0.1,
        regularization=None,
        init_references=None,
        align=True,
        local_search=None,
        max_iter=40,
        tol=0.0,
        interpolation_order=1,
        fft_backend="pyfftw",
        n_jobs=None,
        memory_budget=2.0,
        random_state=None,
        verbose=0,
        checkpoint_path=None,
        resume=False,
    ):
        self.n_classes = n_classes
        self.angular_step = angular_step
        self.rotations = rotations
        self.symmetry = symmetry
        self.perturb = perturb
        self.max_shift = max_shift
        self.max_resolution = max_resolution
        self.weighted_average_threshold = weighted_average_threshold
        self.regularization = regularization
        self.init_references = init_references
        self.align = align
        self.local_search = local_search
        self.max_iter = max_iter
        self.tol = tol
        self.interpolation_order = interpolation_order
        self.fft_backend = fft_backend
        self.n_jobs = n_jobs
        self.memory_budget = memory_budget
        self.random_state = random_state
        self.verbose = verbose
        self.checkpoint_path = checkpoint_path
        self.resume = resume

    _MODEL_STATE = ("_references_hat", "_references_real", "references_", "class_weights_")

    def _check_parameters(self, n_particles, box_size):
        self._check_common(n_particles, box_size)
        if self.tol is not None:
            _check_real(self, "tol", 0.0, 1.0)

    def fit(self, X, y=None, *, masks=None, init_rotations=None, init_shifts=None):
        """Align and classify by iterated hard assignment and weighted averaging.

        Parameters are those of :meth:`~mlsubtomo.estimator.MissingDataMLClassifier.fit`.

        Returns
        -------
        self

        Warns
        -----
        ClassCollapseWarning
            If a class ends with no particle assigned to it.
        """
        self.fit_predict(X, y, masks=masks, init_rotations=init_rotations, init_shifts=init_shifts)
        return self

    def fit_predict(self, X, y=None, *, masks=None, init_rotations=None, init_shifts=None):
        """Fit and return the class of each particle (``labels_``)."""
        data, settings, init_rotations, init_shifts, base_shifts = self._prepare_fit(
            X, masks, init_rotations, init_shifts
        )
        n, k = len(data), self.n_classes
        rng = check_random_state(self.random_state)
        self._set_references(
            self._initial_references(data, settings, rng)
        )
        self.class_weights_ = np.full(k, 1.0 / k)
        schedule = check_schedule(self.regularization)
        grid = self._orientation_grid()
        run = self._new_run(init_rotations, "history")
        fingerprint, run = self._resume_run(data, settings, init_rotations, init_shifts, rng, run)
        self.correlation_history_ = run["history"]
        self.converged_ = run["converged"]
        self.n_iter_ = run["iteration"]
        for iteration in range(run["iteration"], self.max_iter) if not self.converged_ else ():
            start = time.perf_counter()
            result = self._search(data, settings, self._iteration_rotations(grid, rng),
                                  run["rotations"])
            if self.local_search is not None:
                run["rotations"] = result.rotations
            stats = kernel.hard_statistics(
                data, result.best_class, result.rotations, result.best_shift, k, settings
            )
            refs = self._weighted_average(stats, self._references_hat)
            theta = schedule(iteration)
            if theta > 0 and k > 1:
                refs = penalised_update(refs, stats.class_sums, theta * n / k)
            self._set_references(refs)
            self.class_weights_ = stats.class_sums / n
            self.correlation_history_.append(float(np.mean(result.max_posterior)))
            self.n_iter_ = iteration + 1
            changed = (
                1.0 if run["labels"] is None
                else float(np.mean(run["labels"] != result.best_class))
            )
            _log(
                f"iteration {iteration + 1}: mean correlation "
                f"{self.correlation_history_[-1]:.5f}, class sizes "
                f"{np.bincount(result.best_class, minlength=k).tolist()}, class changes "
                f"{changed:.3f}, {time.perf_counter() - start:.1f} s",
                self.verbose,
            )
            run["labels"] = result.best_class
            self.converged_ = self.tol is not None and iteration > 0 and changed <= self.tol
            run.update(iteration=iteration + 1, converged=self.converged_)
            self._save_checkpoint(fingerprint, rng, run)
            if self.converged_:
                break

        result = self._search(data, settings, grid, run["rotations"])
        self.correlation_history_.append(float(np.mean(result.max_posterior)))
        self.labels_ = result.best_class
        self._warn_on_empty_classes()
        self._store_pose(result, base_shifts)
        self.max_correlation_ = result.max_posterior
        return self.labels_

    def _search(self, data, settings, rotations, current_rotations):
        shifts, _ = kernel.shift_window(self._shift_limit(), 0.0)
        search = kernel.SearchSpace(
            self._search_rotations(rotations, current_rotations), shifts, np.zeros(len(shifts))
        )
        model = kernel.Model(self._references_real, np.zeros(self.n_classes), 1.0)
        result, _ = self._run_kernel(
            kernel.correlation_search, data, model, search, current_rotations, settings
        )
        return result

    def _predict_result(self, X, masks):
        data, settings = self._prepare_predict(X, masks)
        return self._search(data, settings, self._orientation_grid(), None)

    def predict(self, X, masks=None):
        """Class of the best-correlating (class, orientation, shift) of each particle."""
        return self._predict_result(X, masks).best_class

    def decision_function(self, X, masks=None):
        """Best correlation of each particle with each class: (N, K)."""
        return self._predict_result(X, masks).class_log_posterior

    def score_samples(self, X, masks=None):
        """Best correlation of each particle with any class."""
        return self._predict_result(X, masks).max_posterior

    def score(self, X, y=None, sample_weight=None, masks=None):
        """Mean best correlation (weighted by ``sample_weight`` if given)."""
        return float(np.average(self.score_samples(X, masks=masks), weights=sample_weight))
