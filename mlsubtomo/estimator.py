"""MissingDataMLClassifier: ML alignment and classification (Scheres et al. 2009)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import numbers
import pickle
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse
from joblib import effective_n_jobs
from scipy.spatial.transform import Rotation
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import gpu, kernel
from .fft import half_grid_shape
from .io import atomic_write
from .masks import ArrayMask, FullData, Mask
from .metrics import fsc
from .regularization import check_schedule, pairwise_squared_distances, penalised_update
from .sampling import (
    local_neighbourhood,
    nearest_grid_index,
    perturb,
    so3_grid,
    symmetry_group,
)
from .stats import SufficientStatistics
from .transform import euler_from_matrix, rotate_volume

__all__ = ["ClassCollapseWarning", "MissingDataMLClassifier"]

logger = logging.getLogger("mlsubtomo")

_MISSING_DATA = ("impute", "weighted_average")
# sigma never falls below this fraction of the data's RMS per observed component, so
# that noise-free data give large but finite scores instead of a division by zero.
_SIGMA_FLOOR = 1e-5
# Bytes of the (particles, K, R, neighbours) posterior gathers compared at once, of
# the (rows, R) neighbourhood blocks of the grid and of the (particles, K, R) products
# that find the orientations near chosen centres.
_MODE_BATCH_BYTES = 1 << 25
# Accepted range of max |X|. The float32 kernel gave the same labels and references
# for unit-variance data scaled by 1e-18 to 1e18 (D = 8 and 16), not at 1e-22
# (squares underflow) or 1e20 (products overflow); sums over D^3 voxels narrow that
# window in large boxes, hence the margin.
_DATA_RANGE = (1e-12, 1e12)
# Orthonormality error tolerated in given rotation matrices: float32 or printed
# matrices are off by about 1e-7 to 1e-6; anything beyond is not a rotation.
_ROTATION_TOL = 1e-4


class ClassCollapseWarning(UserWarning):
    """A fit ended with a class that holds no particle (the classes collapsed)."""


class _SubtomogramClassifier(BaseEstimator):
    """What the ML estimator and the cross-correlation baseline share.

    Input checks, masks, orientation sets, the paper's initial references, running
    the kernel over particle chunks with joblib, storing per-particle poses, and
    checkpoints. Subclasses set their hyper-parameters (``checkpoint_path`` and
    ``resume`` among them), name in ``_MODEL_STATE`` the fitted attributes a
    checkpoint holds, and implement the iteration.
    """

    def _check_common(self, n_particles: int, box_size: int) -> None:
        _check_integer(self, "n_classes", 1)
        if self.n_classes > n_particles:
            raise ValueError(
                f"n_classes={self.n_classes} exceeds the number of particles ({n_particles})"
            )
        _check_real(self, "angular_step", 0.0, 180.0, low_open=True)
        if self.max_shift is not None:
            _check_integer(self, "max_shift", 0)
            if self.max_shift >= box_size / 2 and self.max_shift > 0:
                raise ValueError(
                    f"max_shift={self.max_shift} must be smaller than half the box ({box_size}/2)"
                )
        if self.max_resolution is not None:
            _check_real(self, "max_resolution", 0.0, np.sqrt(3) / 2, low_open=True)
        _check_real(self, "weighted_average_threshold", 0.0)
        if self.local_search is not None:
            _check_real(self, "local_search", 0.0, 180.0, low_open=True)
        _check_integer(self, "max_iter", 0)
        _check_real(self, "memory_budget", 0.0, low_open=True)
        _check_integer(self, "interpolation_order", 0)
        if self.interpolation_order > 5:
            raise ValueError(
                f"interpolation_order must be at most 5, got {self.interpolation_order}"
            )
        if self.fft_backend not in ("pyfftw", "scipy"):
            raise ValueError(
                f"fft_backend must be 'pyfftw' or 'scipy', got {self.fft_backend!r}"
            )
        check_schedule(self.regularization)
        symmetry_group(self.symmetry)
        if self.init_references is not None:
            _check_references(self.init_references, self.n_classes, box_size)

    def _prepare_fit(self, X, masks, init_rotations, init_shifts):
        """Validated inputs and prepared particles for ``fit``."""
        X = _check_volumes(X)
        n, d = X.shape[0], X.shape[-1]
        self._check_parameters(n, d)
        group_masks, group = _group_masks(masks, n, d)
        settings = self._kernel_settings(group_masks, d)
        init_rotations = _check_rotations(init_rotations, n, "init_rotations")
        init_shifts = _check_shifts(init_shifts, n, d)
        if (not self.align or self.local_search is not None) and init_rotations is None:
            raise ValueError("init_rotations are required with align=False or local_search")
        base_shifts = init_shifts if not self.align else None
        data = kernel.prepare_particles(X, settings, group, base_shifts)
        self._data_rms = float(np.sqrt(np.sum(data.power) / np.sum(data.n_observed)))
        self._band_weights = kernel.band_weights(d, self.max_resolution)
        self._box_size = d
        return data, settings, init_rotations, init_shifts, base_shifts

    def _prepare_predict(self, X, masks):
        """Validated inputs and prepared particles for prediction with the fitted model."""
        check_is_fitted(self, "references_")
        X = _check_volumes(X)
        d = X.shape[-1]
        if d != self._box_size:
            raise ValueError(f"X has box size {d}, the model was fitted with {self._box_size}")
        if not self.align or self.local_search is not None:
            raise ValueError(
                "predict needs a global search; this model was fitted with align=False "
                "or local_search"
            )
        group_masks, group = _group_masks(masks, X.shape[0], d)
        settings = self._kernel_settings(group_masks, d)
        return kernel.prepare_particles(X, settings, group, None), settings

    def _kernel_settings(self, group_masks, d):
        arrays = np.stack(
            [m.observed(d, max_resolution=self.max_resolution) for m in group_masks]
        )
        for m, a in zip(group_masks, arrays, strict=True):
            if not a.any():
                raise ValueError(
                    f"mask {m!r} observes no Fourier component inside max_resolution="
                    f"{self.max_resolution} for box size {d}"
                )
        return kernel.KernelSettings(
            masks=list(group_masks),
            mask_arrays=arrays,
            max_resolution=self.max_resolution,
            pruning_threshold=float(getattr(self, "pruning_threshold", 0.0)),
            interpolation_order=int(self.interpolation_order),
            rotation=getattr(self, "reference_rotation", "real"),
            fft_backend=self.fft_backend,
            # Every kernel call, not only the E-step's: the half-set statistics of a
            # Fourier crop had run on one core (0.2 s of a 3 s local iteration).
            n_jobs=effective_n_jobs(self.n_jobs),
        )

    def _orientation_grid(self) -> np.ndarray:
        if self.rotations is not None:
            return _check_rotations(self.rotations, None, "rotations")
        return so3_grid(self.angular_step, self.symmetry).as_matrix()

    def _iteration_rotations(self, grid, rng):
        """The grid, randomly rotated as a whole when perturbation is on."""
        if self.perturb and self.rotations is None and self.align:
            return perturb(Rotation.from_matrix(grid), self.angular_step, rng).as_matrix()
        return grid

    def _shift_limit(self, xi=None):
        """Half-width of the shift cube; a circular shift is never counted twice."""
        d = self._box_size
        if not self.align:
            return 0
        limit = (d - 1) // 2
        if xi is not None:
            limit = min(limit, int(np.ceil(6 * xi)))
        if self.max_shift is not None:
            limit = min(limit, self.max_shift)
        return limit

    def _search_rotations(self, rotations, current_rotations):
        """Orientations searched: the grid, or each particle's own when not aligning."""
        return rotations if self.align else current_rotations

    def _run_kernel(
        self, function, data, model, search, current_rotations, settings, local=None,
        candidates=None, **kwargs,
    ):
        """Run a kernel function over particle chunks sized by ``memory_budget``.

        Without alignment ``search.rotations`` holds one orientation per particle and
        particle i searches only the i-th; with ``local_search`` each particle searches
        the grid orientations near its current one. Returns the joined per-particle
        results and the statistics of the particles (None if not accumulated).
        ``local`` (degrees) searches around ``current_rotations`` as ``local_search``
        does; ``candidates`` (n, R) or (n, K, R), when given, are searched instead.
        """
        n = len(data)
        local = self.local_search if local is None else local
        if candidates is None and not self.align:
            candidates = np.eye(n, dtype=bool)
        elif candidates is None and local is not None:
            candidates = local_neighbourhood(
                Rotation.from_matrix(search.rotations), Rotation.from_matrix(current_rotations),
                local, self.symmetry, include_nearest=True,
            )
        n_classes, n_rotations = model.references.shape[0], len(search.rotations)
        # Beside every chunk stay the whole run's candidates and, where they are kept
        # to choose the next search's pairs, the log masses of all pairs and the
        # choice made from them.
        reserved = 0 if candidates is None else candidates.nbytes
        if kwargs.get("keep_pairs"):
            reserved += n * n_classes * n_rotations * 9
        size, keep_scores, share = kernel.chunk_plan(
            n, n_classes, n_rotations, len(search.shifts), model.references.shape[-1],
            self.memory_budget * 2**30 - reserved,
        )
        settings = dataclasses.replace(settings, keep_scores=keep_scores)
        chunks = kernel.index_blocks(n, size)
        transforms = None
        # With candidate orientations, blocks nobody searches are never rotated.
        if share and candidates is None and (len(chunks) > 1 or not keep_scores):
            transforms = kernel.rotated_transforms(model.references, search.rotations, settings)
        results = []
        with _progress(n, self.verbose) as bar:
            for c in chunks:
                part = data.subset(c, None if candidates is None else candidates[c])
                results.append(function(
                    part, model, search, settings, transforms=transforms,
                    progress=lambda fraction, c=c: bar.update(fraction * len(c)),
                    **kwargs,
                ))
        result = kernel.ChunkResult.concatenate(results)
        result.rotations = search.rotations[result.best_rotation]
        statistics = None
        if results[0].statistics is not None:
            statistics = sum(r.statistics for r in results)
        return result, statistics

    def _initial_references(self, data, settings, rng):
        """Given references, or the paper's weighted averages of random subsets."""
        n, k = len(data), self.n_classes
        if self.init_references is not None:  # validated by _check_common
            refs = np.asarray(self.init_references, dtype=np.float64)
            return kernel.to_fourier(refs, self.fft_backend)
        # K random subsets, each particle in a random orientation, even when orientations
        # are given: a particle averaged in its own orientation matches its own
        # contribution so well (about n_i / (N/K) nats of log-odds) that the random
        # subsets would never change.
        labels = np.empty(n, dtype=np.int64)
        labels[rng.permutation(n)] = np.arange(n) % k
        rotations = Rotation.random(n, random_state=rng).as_matrix()
        stats = kernel.hard_statistics(data, labels, rotations, np.zeros((n, 3)), k, settings)
        return self._weighted_average(stats, np.zeros_like(stats.data_sums))

    def _weighted_average(self, stats, previous):
        """``B_k / W_k`` where ``W_k`` exceeds the threshold, else 0; empty classes keep theirs."""
        counts = stats.observation_counts
        with np.errstate(divide="ignore", invalid="ignore"):
            average = np.where(
                counts > self.weighted_average_threshold, stats.data_sums / counts, 0.0
            )
        empty = stats.class_sums <= 0
        average[empty] = previous[empty]
        return average

    def _set_references(self, references_hat):
        """Band-limit and symmetrise the class averages; keep both representations."""
        refs = kernel.to_real(
            references_hat * self._band_now().astype(bool), self._box_size, self.fft_backend
        )
        group = symmetry_group(self.symmetry)
        if len(group) > 1:
            refs = _symmetrise(refs, group.as_matrix())
        self._references_hat = kernel.to_fourier(refs, self.fft_backend)
        self._references_real = refs.astype(np.float32)
        self.references_ = self._references_real.copy()

    def _band_now(self):
        """Band weights of the current Fourier crop: the whole band when not cropping."""
        crop = getattr(self, "_crop_size", self._box_size)
        if crop >= self._box_size:
            return self._band_weights
        index = kernel.crop_index(self._box_size, crop)
        band = np.zeros_like(self._band_weights)
        band[index] = self._band_weights[index] * kernel.crop_ball(crop)
        return band

    def _warn_on_empty_classes(self):
        """Warn when the final assignment leaves a class without particles: a collapsed
        run otherwise shows only in the per-iteration log, which scripts rarely read."""
        sizes = np.bincount(self.labels_, minlength=self.n_classes)
        empty = np.flatnonzero(sizes == 0)
        if len(empty):
            which = (f"classes {', '.join(map(str, empty))} hold" if len(empty) > 1
                     else f"class {empty[0]} holds")
            warnings.warn(
                f"{which} no particle after {self.n_iter_} iterations (class sizes "
                f"{sizes.tolist()}): the classes collapsed. Try another random_state, a "
                "stronger or longer regularization schedule, or fewer classes.",
                ClassCollapseWarning, stacklevel=3,
            )

    def _store_pose(self, result, base_shifts):
        self.rotations_ = result.rotations
        shifts = result.best_shift
        if base_shifts is not None:
            shifts = shifts + base_shifts
        self.shifts_ = shifts
        self.euler_angles_ = euler_from_matrix(self.rotations_)

    # Hyper-parameters that may change between an interrupted run and its resumption.
    _RESUMABLE = (
        "max_iter", "tol", "n_jobs", "device", "memory_budget", "verbose", "checkpoint_path",
        "resume",
    )

    @staticmethod
    def _new_run(init_rotations, *histories):
        """The state of a run before its first iteration (what a checkpoint saves)."""
        run = {"iteration": 0, "labels": None, "rotations": init_rotations, "converged": False}
        run.update({name: [] for name in histories})
        return run

    def _resume_run(self, data, settings, init_rotations, init_shifts, rng, run):
        """The inputs' fingerprint, and the run to go on with: the checkpoint's, or ``run``.

        With ``resume`` and an existing checkpoint, the model state of ``_MODEL_STATE``
        and the random state are restored from it.
        """
        if self.checkpoint_path is None:
            return None, run
        fingerprint = _fingerprint(
            data.data, data.group, repr(settings.masks), init_rotations, init_shifts
        )
        if self.resume:
            run = self._load_checkpoint(fingerprint, rng, run)
        return fingerprint, run

    def _save_checkpoint(self, fingerprint, rng, run):
        if self.checkpoint_path is None:
            return
        state = {
            "fingerprint": fingerprint,
            "params": self._fixed_params(),
            "model": {name: getattr(self, name) for name in self._MODEL_STATE},
            "rng": rng.get_state(),
            "run": run,
        }

        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)

        atomic_write(self.checkpoint_path, write)

    def _load_checkpoint(self, fingerprint, rng, run):
        path = Path(self.checkpoint_path)
        if not path.exists():
            return run
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
        except Exception as exc:
            raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {path} was made from different data or masks")
        changed = sorted(
            name
            for name, value in self._fixed_params().items()
            if repr(state["params"].get(name)) != repr(value)
        )
        if changed:
            raise ValueError(
                f"checkpoint {path} was made with different hyper-parameters: "
                f"{', '.join(changed)}"
            )
        for name, value in state["model"].items():
            setattr(self, name, value)
        rng.set_state(state["rng"])
        return state["run"]

    def _fixed_params(self):
        return {k: v for k, v in self.get_params().items() if k not in self._RESUMABLE}


class MissingDataMLClassifier(DensityMixin, _SubtomogramClassifier):
    """Maximum-likelihood alignment and classification of maps with missing Fourier data.

    Class, orientation, integer shift and the unobserved Fourier components of each
    particle are hidden variables of a Gaussian model; expectation-maximisation
    estimates the class averages, class weights, the noise level sigma and the
    shift spread xi (design section 2b; the paper's eqs. 7-11).

    Parameters
    ----------
    n_classes : int, default=2
        Number of classes K.
    angular_step : float, default=15.0
        Angular sampling in degrees of the SO(3) grid searched.
    rotations : scipy.spatial.transform.Rotation or ndarray of shape (R, 3, 3), default=None
        An explicit orientation set to search instead of the grid; disables
        ``perturb``.
    symmetry : str, default="C1"
        Point group ("Cn" or "Dn", axis z) of the class averages: the search is
        restricted to an asymmetric unit and the averages are symmetrised.
    perturb : bool, default=True
        Rotate the whole grid by a small random rotation (std angular_step/3) in
        every iteration, so that successive iterations sample between grid points.
    max_shift : int, default=None
        Largest shift searched along each axis, in voxels; the search cube has
        half-width ``min(ceil(6 xi), max_shift, D//2)``. None: ``D//2``.
    max_resolution : float or None, default=0.5
        Components at or beyond ``max_resolution * D`` Fourier pixels count as
        unobserved (cycles per voxel); None keeps all but DC.
    missing_data : {"impute", "weighted_average"}, default="impute"
        "impute" fills each particle's missing components with the current model
        (the paper's ML); "weighted_average" divides by the number of observations.
    n_impute_iter : int, default=1
        Repeats of the imputation update per iteration; large values tend to the
        weighted average.
    weighted_average_threshold : float, default=0.1
        Components observed a posterior-weighted number of times below this are set
        to zero by the weighted average (the paper's 0.1).
    regularization : None, float or Schedule, default=None
        Strength theta (units of N/K^2) pulling the class averages towards each
        other in each iteration; ``LinearDecay(theta0=5.0, n_steps=5)`` is the
        paper's schedule.
    init_references : ndarray of shape (K, D, D, D), default=None
        Starting class averages. None: weighted averages of K random subsets of
        the particles in random orientations (the paper's initialisation).
    init_sigma : float, default=None
        Starting sigma; None: the RMS of the data per observed component.
    init_xi : float, default=1.0
        Starting standard deviation of the shift prior, in voxels.
    fix_sigma, fix_xi, fix_class_weights : bool, default=False
        Keep the corresponding parameter at its starting value.
    align : bool, default=True
        False keeps the orientations and shifts given to ``fit`` and only classifies.
    local_search : float, default=None
        Search only grid orientations within this angle (degrees) of each
        particle's current orientation (starting from ``init_rotations``).
    min_box_size : int, default=None
        Resolution-adaptive Fourier cropping (like xmipp's ``--dim``, but adaptive):
        the iterations start in a box of this even size holding only the
        components with ``|q| < min_box_size / 2``, and the box grows to 1.5 times
        the highest frequency at which the averages of the even- and odd-numbered
        particles at their best poses still agree (FSC >= 0.143), up to the full
        box. Each cropped iteration costs about ``(min_box_size / D)^3`` of a full
        one; shifts keep their full-box voxel units. None: always the full box.
    local_refinement : float, default=None
        Once the global search has settled (no regularisation left, and either
        converged by ``tol`` or fewer than 1% of the particles changing class in
        two consecutive iterations), search only the grid
        orientations within this angle (degrees) of the (class, orientation) pairs
        of the iteration before that held at least ``pruning_threshold`` of each
        particle's best pair posterior or were a local maximum of it that a
        perturbation of the grid could make the best (the symmetry mates of a
        symmetric particle, for instance: at most ``coarse_margin`` nats below the
        best, and no further than the best falls within 1.5 grid steps), and near
        each class's best orientation for the particle, so that it can still change
        class; until that converges too or ``max_iter`` is reached. The final assignment
        (``labels_``, ``rotations_``) searches the unperturbed grid near the pairs of
        the last iteration in the same way; without refinement it searches globally.
        An iteration after one in which a class holding the weight of a particle or
        more was no particle's best class searches globally all the same: the
        classes have not parted yet.
    coarse_step : float, default=None
        Coarse-to-fine global search: each E-step first scores the grid orientations
        nearest to a grid of this step (degrees), in the smallest box when
        cropping, then, per particle and class, the grid orientations within
        ``coarse_step`` of every coarse one whose log posterior is within
        ``coarse_margin`` of the class's best coarse one. None (or
        ``pruning_threshold=0``, which asks for the exact result): every
        orientation is searched.
    coarse_margin : float, default=100.0
        Largest width (nats) of the window of coarse orientations refined. A coarse
        score falls short of the fine peak near it by however far the nearest coarse
        orientation lies: on the paper's setting (SNR 0.05, 30 degree coarse step,
        box 16) the coarse pass ranked another symmetry mate first for 13% of the
        particles, and a window of 18 nats missed their best orientation by up to
        59 nats; 100 nats missed none, refining about a fifth of the grid. The
        window is narrower when the references change less under a turn of
        ``coarse_step`` (noisier data, blurrier references): x + 3 sqrt(2 x) for the
        largest score change x of such a turn (``kernel.rotation_contrast``) and its
        noise. At SNR 0.01 x ranged over 2-22 nats in the first six iterations, and
        no particle's coarse orientation nearest its best fine one fell further below
        the best coarse one than x + 6 nats. It also bounds the local maxima that
        ``local_refinement`` searches near.
    max_iter : int, default=40
        Number of EM iterations at most.
    tol : float, default=1e-5
        Stop when the mean log-likelihood per particle changes by less than this.
    pruning_threshold : float, default=1e-8
        (particle, class, orientation) pairs whose best posterior is below this
        fraction of the particle's best are left out of the statistics (xmipp's
        SIGNIFICANT_WEIGHT_LOW); 0 keeps every pair and is exact. It also bounds
        the pairs ``local_refinement`` searches near. On the paper's setting with the
        accelerated options, 1e-4 in place of 1e-8 took the whole run at SNR 0.01
        from 241 to 160-173 s (three seeds), with purity 0.97-0.98 and the median
        orientation error within 0.74 degrees of the exhaustive run's on the seeds
        where that run kept the classes apart (0 and 1: purity 0.98 and 0.97
        against 0.975 and 0.98; benchmarks/speed.py; docs/scaling.rst gives later
        runs).
    interpolation_order : int, default=1
        Spline order of the real-space rotations (1: trilinear).
    reference_rotation : {"real", "fourier"}, default="real"
        How the E-step rotates the references: in real space with
        ``interpolation_order`` then by FFT, as xmipp does, or ("fourier") the
        trilinear rotation computed from their transforms padded to twice the box,
        only where the masks observe, in about half the time. With
        ``interpolation_order=1`` the two differ by the aliasing of the real-space
        interpolation, 2-4% of a rotated map. Statistics are rotated back in real
        space either way.
    fft_backend : {"pyfftw", "scipy"}, default="pyfftw"
    device : {"cpu", "gpu"}, default="cpu"
        Where the E-step scores the pairs and accumulates the statistics: the CPU
        kernel (:mod:`mlsubtomo.kernel`), or a CUDA GPU through CuPy
        (:mod:`mlsubtomo.gpu`, the ``gpu`` extra), which computes the same
        quantities; the references are rotated on the CPU either way.
    n_jobs : int, default=None
        Orientation blocks scored at once (joblib threads, or the backend set with
        ``joblib.parallel_config``, e.g. Dask); -1 uses all cores.
    memory_budget : float, default=2.0
        GiB the E-step's working set may use: particles are processed in chunks
        sized from it, and scores are kept between the two passes when they fit.
        It covers the per-pair arrays a pruned search keeps for the whole run (the
        candidate orientations, and the pair posteriors ``local_refinement`` refines
        near), but not the particles and their Fourier transforms.
    random_state : int, RandomState or None, default=None
    verbose : int, default=0
        1 logs one line per iteration and shows progress bars over iterations and
        over the particles of each E-step.
    warm_start : bool, default=False
        Start the next call to ``fit`` from the fitted model instead of new
        initial references.
    checkpoint_path : str or path, default=None
        After every iteration, write the state of the run to this file (atomically:
        a half-written checkpoint never replaces a complete one).
    resume : bool, default=False
        If ``checkpoint_path`` exists, continue the run it holds from its last
        complete iteration; the result equals that of an uninterrupted run. The
        checkpoint must come from the same data and hyper-parameters (``max_iter``,
        ``tol``, ``n_jobs``, ``memory_budget``, ``verbose`` and the checkpoint options
        may differ).

    Attributes
    ----------
    references_ : ndarray of shape (K, D, D, D)
        Class averages in real space, band-limited to ``max_resolution``.
    class_weights_ : ndarray of shape (K,)
    sigma_ : float
    xi_ : float
    labels_ : ndarray of shape (N,)
        Most probable class of each particle, orientations and shifts marginalised.
    rotations_ : ndarray of shape (N, 3, 3)
        Orientation of the most probable (class, orientation, shift) of each
        particle: ``X_i(r) ~ A_k(R^T (r - t))``.
    shifts_ : ndarray of shape (N, 3)
        Its shift t, (x, y, z) voxels.
    euler_angles_ : ndarray of shape (N, 3)
        ``rotations_`` as ZYZ (rot, tilt, psi) in degrees, RELION's convention.
    max_posterior_ : ndarray of shape (N,)
        Posterior probability of that most probable (class, orientation, shift).
    particle_log_likelihood_ : ndarray of shape (N,)
    log_likelihood_history_ : list of float
        Entry j is the data log-likelihood under the model entering iteration j;
        the last entry is under the fitted model. Each covers the components of its
        iteration's box (``box_size_history_``); :meth:`score_samples` those of the
        whole box.
    sigma_history_ : list of float
        sigma after each iteration's M-step.
    class_weights_history_ : list of ndarray of shape (K,)
        Class weights after each iteration's M-step.
    refinement_start_ : int or None
        The iteration (0-based) from which ``local_refinement`` searched locally
        (globally after an iteration whose classes had not parted).
    box_size_history_ : list of int
        Box size of each iteration: D, or the Fourier crop of ``min_box_size``.
    lower_bound_ : float
        The last entry of ``log_likelihood_history_``.
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
        missing_data="impute",
        n_impute_iter=1,
        weighted_average_threshold=0.1,
        regularization=None,
        init_references=None,
        init_sigma=None,
        init_xi=1.0,
        fix_sigma=False,
        fix_xi=False,
        fix_class_weights=False,
        align=True,
        local_search=None,
        min_box_size=None,
        local_refinement=None,
        coarse_step=None,
        coarse_margin=100.0,
        max_iter=40,
        tol=1e-5,
        pruning_threshold=1e-8,
        interpolation_order=1,
        reference_rotation="real",
        fft_backend="pyfftw",
        device="cpu",
        n_jobs=None,
        memory_budget=2.0,
        random_state=None,
        verbose=0,
        warm_start=False,
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
        self.missing_data = missing_data
        self.n_impute_iter = n_impute_iter
        self.weighted_average_threshold = weighted_average_threshold
        self.regularization = regularization
        self.init_references = init_references
        self.init_sigma = init_sigma
        self.init_xi = init_xi
        self.fix_sigma = fix_sigma
        self.fix_xi = fix_xi
        self.fix_class_weights = fix_class_weights
        self.align = align
        self.local_search = local_search
        self.min_box_size = min_box_size
        self.local_refinement = local_refinement
        self.coarse_step = coarse_step
        self.coarse_margin = coarse_margin
        self.max_iter = max_iter
        self.tol = tol
        self.pruning_threshold = pruning_threshold
        self.interpolation_order = interpolation_order
        self.reference_rotation = reference_rotation
        self.fft_backend = fft_backend
        self.device = device
        self.n_jobs = n_jobs
        self.memory_budget = memory_budget
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.checkpoint_path = checkpoint_path
        self.resume = resume

    # ------------------------------------------------------------------ validation
    def _check_parameters(self, n_particles: int, box_size: int) -> None:
        self._check_common(n_particles, box_size)
        if self.missing_data not in _MISSING_DATA:
            raise ValueError(
                f"missing_data must be one of {_MISSING_DATA}, got {self.missing_data!r}"
            )
        if self.reference_rotation not in ("real", "fourier"):
            raise ValueError(
                "reference_rotation must be 'real' or 'fourier', got "
                f"{self.reference_rotation!r}"
            )
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.device == "gpu":
            gpu.cuda_array_module()
        _check_integer(self, "n_impute_iter", 1)
        if self.init_sigma is not None:
            _check_real(self, "init_sigma", 0.0, low_open=True)
        _check_real(self, "init_xi", 0.0)
        _check_real(self, "tol", 0.0)
        _check_real(self, "pruning_threshold", 0.0, 1.0)
        if self.min_box_size is not None:
            _check_integer(self, "min_box_size", 4)
            if self.min_box_size % 2:
                raise ValueError(f"min_box_size must be even, got {self.min_box_size}")
        if self.local_refinement is not None:
            _check_real(self, "local_refinement", 0.0, 180.0, low_open=True)
        if self.coarse_step is not None:
            _check_real(self, "coarse_step", 0.0, 180.0, low_open=True)
        _check_real(self, "coarse_margin", 0.0)

    def _prepare_fit(self, X, masks, init_rotations, init_shifts):
        prepared = super()._prepare_fit(X, masks, init_rotations, init_shifts)
        if self._data_rms == 0:
            # sigma starts at (and is floored relative to) this RMS: zero would divide
            # by zero in the first E-step.
            raise ValueError(
                "X has no signal in the Fourier components the masks observe (e.g. "
                "all particles blank or constant): sigma cannot be estimated"
            )
        return prepared

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None, *, masks=None, init_rotations=None, init_shifts=None):
        """Estimate the model by expectation-maximisation.

        Parameters
        ----------
        X : array-like of shape (N, D, D, D)
            Particles indexed [z, y, x]; converted to float32.
        y : Ignored
        masks : Mask, list of Mask, or bool array of shape (D, D, D//2+1) or (N, D, D, D//2+1)
            Observed Fourier components of each particle (True = observed); None
            means fully observed.
        init_rotations : array-like of shape (N, 3, 3) or Rotation, default=None
            Starting orientations (required with ``align=False`` or ``local_search``).
        init_shifts : array-like of shape (N, 3), default=None
            Starting integer shifts (x, y, z).

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
        """Fit the model and return the class of each particle (``labels_``)."""
        data, settings, init_rotations, init_shifts, base_shifts = self._prepare_fit(
            X, masks, init_rotations, init_shifts
        )
        n = len(data)
        rng = check_random_state(self.random_state)
        if not (self.warm_start and hasattr(self, "references_")):
            self._initialize(data, settings, rng)
        schedule = check_schedule(self.regularization)
        grid = self._orientation_grid()
        refines = self.local_refinement is not None and self.align
        neighbours = self._grid_neighbours(grid) if refines else None
        run = self._new_run(
            init_rotations, "history", "sigma_history", "weights_history", "box_history"
        )
        run["best_rotations"] = None
        fingerprint, run = self._resume_run(data, settings, init_rotations, init_shifts, rng, run)
        self.log_likelihood_history_ = run["history"]
        self.sigma_history_ = run["sigma_history"]
        self.class_weights_history_ = run["weights_history"]
        self.box_size_history_ = run["box_history"]
        self.converged_ = run["converged"]
        self.n_iter_ = run["iteration"]
        iterations = range(run["iteration"], self.max_iter)
        if self.verbose:
            from tqdm.auto import tqdm

            iterations = tqdm(iterations, desc="EM", unit="iter")
        for iteration in iterations if not self.converged_ else ():
            start = time.perf_counter()
            rotations = self._iteration_rotations(grid, rng)
            crop = self._crop_size
            local = (
                self.local_refinement
                if run.get("refining") is not None and not self._classes_unparted(run["labels"])
                else None
            )
            stats, result, halves = self._e_step(
                data, settings, rotations, run["rotations"], True, local,
                run.get("previous") if local is not None else None, keep_pairs=refines,
            )
            self.log_likelihood_history_.append(stats.log_likelihood)
            labels = np.argmax(result.class_log_posterior, axis=1)
            searched_locally = self.local_search is not None or local is not None
            if searched_locally:
                run["rotations"] = result.rotations
            self._m_step(stats, schedule(iteration))
            self.sigma_history_.append(self.sigma_)
            self.class_weights_history_.append(self.class_weights_.copy())
            self.box_size_history_.append(crop)
            self.n_iter_ = iteration + 1
            changes = self._assignment_changes(run, labels, result.rotations)
            searched = (
                "fixed" if not self.align else "local" if searched_locally else "global"
            )
            self._log_iteration(iteration, stats, labels, changes, start, searched)
            if halves is not None:
                self._crop_size = self._grown_crop(halves)
            run["labels"], run["best_rotations"] = labels, result.rotations
            if refines:
                run["previous"] = (
                    rotations,
                    self._significant_pairs(result.pair_log_mass)
                    | self._posterior_modes(result.pair_log_mass, neighbours)
                    | self._class_best_pairs(result.pair_log_mass),
                )
            # Log-likelihoods of different crops cover different components.
            boxes = self.box_size_history_
            if len(boxes) > 1 and boxes[-2] == boxes[-1]:
                change = (self.log_likelihood_history_[-1] - self.log_likelihood_history_[-2]) / n
                self.converged_ = bool(abs(change) < self.tol)
            # Orientation changes are left out: between symmetry mates of a symmetric
            # particle searched in C1 they stay large however settled the run is.
            run["calm"] = run.get("calm", 0) + 1 if changes[0] < 0.01 else 0
            if (
                refines and run.get("refining") is None
                and schedule(iteration) == 0 and (self.converged_ or run["calm"] >= 2)
            ):
                run.update(refining=iteration + 1, rotations=result.rotations)
                self.converged_ = False
            run.update(iteration=iteration + 1, converged=self.converged_)
            self._save_checkpoint(fingerprint, rng, run)
            if self.converged_:
                break

        current_rotations = run["rotations"]
        self.refinement_start_ = run.get("refining")
        # After local refinement the final assignment searches the unperturbed grid
        # near each particle's significant pairs and posterior modes, which include
        # its competing symmetry mates. On the paper's setting (SNR 0.05) this gave
        # the median orientation error of an exhaustive final search (and 0.06 degrees
        # less than a coarse-to-fine one) in a sixth of its time.
        refined = run.get("refining") is not None
        _, result, _ = self._e_step(
            data, settings, grid, current_rotations, False,
            self.local_refinement if refined else None, run.get("previous") if refined else None,
        )
        self.log_likelihood_history_.append(float(np.sum(result.log_likelihood)))
        self.lower_bound_ = self.log_likelihood_history_[-1]
        self.labels_ = np.argmax(result.class_log_posterior, axis=1)
        self._warn_on_empty_classes()
        self._store_pose(result, base_shifts)
        self.max_posterior_ = result.max_posterior
        self.particle_log_likelihood_ = result.log_likelihood
        return self.labels_

    def _initialize(self, data, settings, rng):
        """Model parameters before the first iteration."""
        k = self.n_classes
        self.class_weights_ = np.full(k, 1.0 / k)
        sigma = self.init_sigma if self.init_sigma is not None else self._data_rms
        self.sigma_ = float(sigma)
        self.xi_ = float(self.init_xi)
        d = self._box_size
        self._crop_size = d if self.min_box_size is None else min(d, self.min_box_size)
        self._set_references(
            self._initial_references(data, settings, rng)
        )

    _MODEL_STATE = (
        "_references_hat", "_references_real", "references_", "class_weights_", "sigma_", "xi_",
        "_crop_size",
    )
    def _model(self, crop=None):
        """The kernel's model in a Fourier crop (the current one by default)."""
        with np.errstate(divide="ignore"):
            log_weights = np.log(self.class_weights_)
        crop = self._crop_size if crop is None else crop
        if crop == self._box_size:
            return kernel.Model(self._references_real, log_weights, self.sigma_)
        index = (slice(None), *kernel.crop_index(self._box_size, crop))
        refs = kernel.to_real(self._references_hat[index], crop, self.fft_backend)
        return kernel.Model(refs, log_weights, self.sigma_)

    def _e_step_function(self):
        """The E-step of the kernel on ``device``."""
        return gpu.e_step if self.device == "gpu" else kernel.e_step

    def _e_step(
        self, data, settings, rotations, current_rotations, accumulate, local=None,
        previous=None, keep_pairs=False, crop=None,
    ):
        """Scores, posteriors and (optionally) statistics for all particles.

        ``local`` (degrees) searches near ``current_rotations``, or with ``previous``
        (the rotations of an earlier E-step and its significant pairs, (n, K, R)
        bool) near each particle's significant pairs; a global search is
        coarse-to-fine with ``coarse_step``. With ``keep_pairs`` (and ``accumulate``)
        the result keeps ``pair_log_mass`` for the next iteration. In a Fourier crop the
        statistics are returned on the full half grid (zero outside the crop), with
        the cropped hard-assignment statistics of the two half sets (even- and
        odd-numbered particles at their best poses) for the FSC. ``crop``: the box
        to search in, the current crop by default.
        """
        crop = self._crop_size if crop is None else crop
        shifts, log_prior = kernel.shift_window(self._shift_limit(self.xi_), self.xi_)
        rotations = self._search_rotations(rotations, current_rotations)
        # Pruned searches keep the prior of the whole grid, as xmipp keeps 1/Nang.
        search = kernel.SearchSpace(
            rotations, shifts, log_prior, -np.log(len(rotations)) if self.align else None
        )
        candidates = None
        if self.align and local is not None and previous is not None:
            candidates = self._reached(*previous, rotations, local)
        elif (
            self.align and local is None and self.local_search is None
            and self.coarse_step is not None and self.pruning_threshold > 0
        ):
            candidates = self._coarse_candidates(data, search, settings, crop)
        cropped = crop < self._box_size
        if cropped:
            data, settings = kernel.crop_problem(data, settings, crop)
        result, stats = self._run_kernel(
            self._e_step_function(), data, self._model(crop), search, current_rotations,
            settings, local=local, candidates=candidates, accumulate=accumulate,
            keep_pairs=accumulate and keep_pairs,
        )
        if not accumulate:
            return None, result, None
        halves = None
        if cropped:
            stats = stats.embedded(kernel.crop_index(self._box_size, crop),
                                   half_grid_shape(self._box_size))
            # Averages of the even- and odd-numbered particles at their best poses:
            # one rotation per particle, where soft half sets would rotate back every
            # (class, orientation) twice.
            halves = [
                kernel.hard_statistics(
                    data.subset(half), result.best_class[half], result.rotations[half],
                    result.best_shift[half], self.n_classes, settings,
                )
                for half in (np.arange(0, len(data), 2), np.arange(1, len(data), 2))
            ]
        return stats, result, halves

    def _significant_pairs(self, pair_log_mass):
        """(n, K, R) bool: the pairs holding at least ``pruning_threshold`` of each
        particle's best pair posterior."""
        best = np.max(pair_log_mass, axis=(1, 2), keepdims=True)
        with np.errstate(divide="ignore"):
            return np.isfinite(pair_log_mass) & (
                pair_log_mass >= best + np.log(self.pruning_threshold)
            )

    def _classes_unparted(self, labels):
        """Whether a class holding the weight of at least one particle is no particle's
        best class.

        The classes then have not parted, and a local search would refine each
        particle's pose in the class it has not joined yet only near the pose it had
        as a faint one. On the paper's setting every particle's best class was the
        same one when the regularisation ended in 17 runs of 18 (seeds 0-8, SNR 0.01
        and 0.05), with class weights as even as 0.57 and 0.43, so no particle
        changed class and the run looked settled; the classes parted a few
        iterations later. Searched locally from there, seed 1 at SNR 0.01 ended with
        8 particles misclassified; searched globally until the classes held
        particles, with 1.
        """
        held = np.bincount(labels, minlength=self.n_classes) > 0
        return bool(np.any(~held & (self.class_weights_ * len(labels) >= 1)))

    @staticmethod
    def _class_best_pairs(pair_log_mass):
        """(n, K, R) bool: the best searched orientation of each (particle, class).

        A class whose pairs all fell below ``pruning_threshold`` would otherwise not
        be searched again, and the particle could never return to it however the
        references change: on the paper's setting (SNR 0.01) 38% of the particles had
        lost their other class by the end of the local refinement. Kept at its best
        pose, the class stays a hidden variable at the cost of one neighbourhood.
        """
        n, k, _ = pair_log_mass.shape
        best = np.zeros(pair_log_mass.shape, dtype=bool)
        rows, classes = np.indices((n, k))
        top = np.argmax(pair_log_mass, axis=2)
        best[rows, classes, top] = np.isfinite(pair_log_mass[rows, classes, top])
        return best

    def _posterior_modes(self, pair_log_mass, neighbours):
        """(n, K, R) bool: the local maxima of each particle's pair posterior over the
        grid (``neighbours``, from :meth:`_grid_neighbours`) close enough to its best
        pair to overtake it on another grid.

        A symmetric particle searched without its symmetry has a mode at every
        symmetry mate, and which mate lies nearest to a point of the perturbed grid
        changes from one iteration to the next. Refined near its significant pairs
        alone, a particle keeps the mate it had and loses the better grid points
        of the others: on the paper's setting (SNR 0.05) the median orientation error
        ended 2.9 degrees above the grid's floor, against 2.1-2.3 when the modes are
        refined too, as with a global search in every iteration. Pairs not searched
        are no modes; a searched pair that beats its searched neighbours is, so the
        search follows a peak out of the patch it was searched in.
        """
        n, k, r = pair_log_mass.shape
        batch = max(1, _MODE_BATCH_BYTES // (8 * k * r * neighbours.shape[1]))
        modes = np.zeros(pair_log_mass.shape, dtype=bool)
        for start in range(0, n, batch):
            mass = pair_log_mass[start:start + batch]
            flat = mass.reshape(len(mass), -1)
            best = np.max(flat, axis=1)
            top_class, top = np.unravel_index(np.argmax(flat, axis=1), (k, r))
            # A mode counts when it lies no further below the best than the best peak
            # falls within its neighbourhood (never more than coarse_margin): how far
            # the grid's next perturbation can move the two. Broad posteriors (low
            # SNR) then keep few of their many shallow noise maxima.
            around = mass[np.arange(len(mass))[:, None], top_class[:, None], neighbours[top]]
            floor = np.min(np.where(np.isfinite(around), around, best[:, None]), axis=1)
            window = np.minimum(self.coarse_margin, best - floor)
            modes[start:start + batch] = (
                np.isfinite(mass) & (mass >= (best - window)[:, None, None])
                & (mass >= np.max(mass[:, :, neighbours], axis=3))
            )
        return modes

    def _grid_neighbours(self, grid):
        """(R, m) int: the orientations of ``grid`` within 1.5 steps of each, padded
        with itself. A perturbation turns the whole grid, which keeps these distances."""
        grid = Rotation.from_matrix(grid)
        # Row blocks: the whole (R, R) table of a fine grid would not fit.
        rows = max(1, _MODE_BATCH_BYTES // len(grid))
        found = [
            np.flatnonzero(row)
            for start in range(0, len(grid), rows)
            for row in local_neighbourhood(
                grid, grid[start:start + rows], 1.5 * self.angular_step, self.symmetry
            )
        ]
        index = np.tile(np.arange(len(grid))[:, None], (1, max(map(len, found))))
        for r, near in enumerate(found):
            index[r, : len(near)] = near
        return index

    def _reached(self, centres, chosen, rotations, radius):
        """(n, K, R) bool: the ``rotations`` within ``radius`` degrees (modulo the
        symmetry) of a centre chosen for the particle and class, ``chosen`` (n, K, m)
        over ``centres`` (m, 3, 3); each centre reaches at least its nearest."""
        used = np.flatnonzero(chosen.any(axis=(0, 1)))
        grid = Rotation.from_matrix(rotations)
        points = Rotation.from_matrix(centres[used])
        near = local_neighbourhood(grid, points, radius, self.symmetry, include_nearest=True)
        n, k, _ = chosen.shape
        near = near.astype(np.float32)
        reached = np.empty((n, k, len(rotations)), dtype=bool)
        # Particle batches bound the float32 products, which a whole run's would not be.
        batch = max(1, _MODE_BATCH_BYTES // (4 * k * len(rotations)))
        for start in range(0, n, batch):
            part = chosen[start:start + batch, :, used]
            reached[start:start + batch] = (
                part.reshape(-1, len(used)).astype(np.float32) @ near
            ).reshape(part.shape[0], k, -1) > 0
        return reached

    def _coarse_candidates(self, data, search, settings, crop):
        """Where the fine search looks: (n, K, R) bool.

        The orientations of the grid nearest to a grid of ``coarse_step`` are scored
        first, in the smallest box (``min_box_size``) when cropping: a coarse
        orientation grid resolves no finer detail. In each class, those within
        ``coarse_margin`` nats of the class's best coarse one, and every grid
        orientation within ``coarse_step`` of them, are searched.
        """
        box = crop
        if self.min_box_size is not None:
            box = min(box, self.min_box_size)
        if box < self._box_size:
            data, settings = kernel.crop_problem(data, settings, box)
        grid = Rotation.from_matrix(search.rotations)
        index = np.unique(
            nearest_grid_index(grid, so3_grid(self.coarse_step, self.symmetry), self.symmetry)
        )
        coarse = dataclasses.replace(search, rotations=search.rotations[index])
        model = self._model(box)
        result, _ = self._run_kernel(
            self._e_step_function(), data, model, coarse, None, settings, accumulate=False,
            keep_pairs=True,
        )
        # A particle's best fine orientation lies within coarse_step of a coarse one,
        # whose score falls short of it by at most the contrast of that turn, give or
        # take three standard deviations of the noise.
        contrast = kernel.rotation_contrast(model, settings, self.coarse_step)
        margin = min(self.coarse_margin, contrast + 3.0 * np.sqrt(2.0 * contrast))
        mass = result.pair_log_mass
        chosen = np.isfinite(mass) & (mass >= np.max(mass, axis=2, keepdims=True) - margin)
        return self._reached(search.rotations[index], chosen, search.rotations, self.coarse_step)

    def _m_step(self, stats: SufficientStatistics, theta: float) -> None:
        """Update the model from the sufficient statistics (design section 2b)."""
        n, k = stats.n_particles, self.n_classes
        band = self._band_now()
        full = float(np.sum(band))  # J
        class_sums = stats.class_sums
        sigma2 = self.sigma_**2
        refs = self._references_hat
        if self.missing_data == "impute":
            for _ in range(self.n_impute_iter):
                for c in np.flatnonzero(class_sums > 0):
                    refs[c] = (
                        refs[c] * (1.0 - stats.observation_counts[c] / class_sums[c])
                        + stats.data_sums[c] / class_sums[c]
                    )
            for _ in range(self.n_impute_iter):
                sigma2 = (sigma2 * (n * full - stats.n_observed) + stats.residual_sum) / (n * full)
        else:
            refs = self._weighted_average(stats, refs)
            sigma2 = stats.residual_sum / stats.n_observed
        if theta > 0 and k > 1:
            tau = theta * n / k
            refs = penalised_update(refs, class_sums, tau)
            sigma2 += tau * pairwise_squared_distances(refs, band) / (2 * n * full)
        if not self.fix_class_weights:
            self.class_weights_ = class_sums / n
        if not self.fix_xi:
            self.xi_ = float(np.sqrt(stats.shift_sum / (3 * n)))
        if not self.fix_sigma:
            self.sigma_ = float(max(np.sqrt(max(sigma2, 0.0)), _SIGMA_FLOOR * self._data_rms))
        self._set_references(refs)

    def _grown_crop(self, halves):
        """The next crop: 1.5 times the highest shell where the half sets agree.

        The shell is the first one where the FSC between the weighted averages of
        the even- and odd-numbered particles (each at its best class, orientation
        and shift) drops below 0.143, in the class that goes furthest; the box
        never shrinks.
        """
        crop = self._crop_size
        averages = [
            kernel.to_real(self._weighted_average(h, np.zeros_like(h.data_sums)), crop)
            for h in halves
        ]
        shell = 0
        for k in range(self.n_classes):
            if min(h.class_sums[k] for h in halves) <= 0:
                continue
            _, curve = fsc(averages[0][k], averages[1][k])
            below = np.flatnonzero(curve[1:] < 0.143)
            shell = max(shell, below[0] + 1 if len(below) else len(curve) - 1)
        return min(self._box_size, max(crop, 2 * int(np.ceil(1.5 * shell))))

    def _assignment_changes(self, previous, labels, rotations):
        """Fraction of particles changing class, and mean orientation change (degrees)
        modulo the symmetry: a move to a symmetry mate is no change."""
        if previous["labels"] is None:
            return np.nan, np.nan
        group = symmetry_group(self.symmetry).as_matrix()
        relative = np.einsum("nji,njk,gkl->ngil", previous["best_rotations"], rotations, group)
        angles = Rotation.from_matrix(relative.reshape(-1, 3, 3)).magnitude()
        turned = np.degrees(np.mean(angles.reshape(len(rotations), -1).min(axis=1)))
        return float(np.mean(previous["labels"] != labels)), float(turned)

    def _log_iteration(self, iteration, stats, labels, changes, start, searched):
        """One line: the figures a user watches to judge convergence and class collapse,
        and how the orientations were searched (``searched``: global, local or fixed)."""
        sizes = np.bincount(labels, minlength=self.n_classes)
        changed, turned = changes
        message = (
            f"iteration {iteration + 1}: log-likelihood {stats.log_likelihood:.6g}, "
            f"sigma {self.sigma_:.4g}, xi {self.xi_:.3g}, class sizes {sizes.tolist()}, "
            f"class weights {np.round(self.class_weights_, 3).tolist()}, "
            f"class changes {changed:.3f}, mean orientation change {turned:.1f} deg, "
            f"box {self._crop_size}, search {searched}, "
            f"{time.perf_counter() - start:.2f} s"
        )
        _log(message, self.verbose)

    # ------------------------------------------------------------------ inference
    def _predict_result(self, X, masks):
        data, settings = self._prepare_predict(X, masks)
        # In the whole box, whatever crop the fit ended in: the references are
        # band-limited to it, so the posteriors barely change, but the log-likelihood
        # covers every component of the band, and the scores of models fitted with
        # different min_box_size (a grid search over it) compare like with like.
        _, result, _ = self._e_step(
            data, settings, self._orientation_grid(), None, False, crop=self._box_size
        )
        return result

    def predict_proba(self, X, masks=None):
        """Class posteriors of each particle, orientations and shifts marginalised: (N, K)."""
        return np.exp(self._predict_result(X, masks).class_log_posterior)

    def predict(self, X, masks=None):
        """Most probable class of each particle."""
        return np.argmax(self._predict_result(X, masks).class_log_posterior, axis=1)

    def score_samples(self, X, masks=None):
        """Log-likelihood of each particle under the fitted model, over every observed
        component of the band: after a Fourier-cropped fit (``min_box_size``) too, whose
        references are zero beyond the last crop."""
        return self._predict_result(X, masks).log_likelihood

    def score(self, X, y=None, sample_weight=None, masks=None):
        """Mean log-likelihood per particle (weighted by ``sample_weight`` if given)."""
        return float(np.average(self.score_samples(X, masks=masks), weights=sample_weight))


# ---------------------------------------------------------------------- helpers
def _log(message: str, verbose) -> None:
    """One line per iteration: to the log, and above the progress bar when verbose."""
    logger.info(message)
    if verbose:
        from tqdm.auto import tqdm

        tqdm.write(message)


@contextlib.contextmanager
def _progress(n_particles, verbose):
    """A progress bar over the particles of one E-step (when verbose), else a no-op."""
    if not verbose:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    # Blocks report fractions of their chunk's particles: show whole particles.
    with tqdm(total=n_particles, unit="particle", desc="E-step", leave=False,
              bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, "
                         "{rate_fmt}{postfix}]") as bar:
        yield bar


class _NoBar:
    def update(self, _):
        pass


def _fingerprint(*arrays) -> str:
    """A digest of the inputs, so a checkpoint is only resumed on the data it came from."""
    digest = hashlib.sha256()
    for a in arrays:
        if isinstance(a, np.ndarray):
            # The array's own memory: no copy of data that may be gigabytes.
            digest.update(repr((a.shape, a.dtype.str)).encode())
            digest.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        else:
            digest.update(pickle.dumps(a))
    return digest.hexdigest()


def _check_integer(estimator, name, low):
    value = getattr(estimator, name)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_real(estimator, name, low, high=np.inf, low_open=False):
    value = getattr(estimator, name)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and value <= high
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, <= {high}; got {value!r}")


def _check_volumes(X) -> np.ndarray:
    """Validate a stack of cubic volumes and return it as C-contiguous float32."""
    if scipy.sparse.issparse(X):
        raise TypeError("sparse input is not supported: X must be a dense (N, D, D, D) array")
    if isinstance(X, list | tuple):
        volumes = [np.asarray(v) for v in X]
        shapes = [v.shape for v in volumes]
        if len(set(shapes)) > 1:
            first = next(i for i, shape in enumerate(shapes) if shape != shapes[0])
            raise ValueError(
                f"X must be volumes of one shape: particle 0 has shape {shapes[0]}, "
                f"particle {first} has {shapes[first]}"
            )
        X = np.stack(volumes) if volumes else np.empty((0,))
    X = np.asarray(X)
    if np.iscomplexobj(X):
        raise ValueError("Complex data not supported: X must hold real numbers")
    _check_real_dtype(X, "X")
    if X.ndim != 4:
        raise ValueError(
            f"X must be a stack of volumes with shape (N, D, D, D), got {X.ndim} dimensions "
            f"(shape {X.shape})"
        )
    if not (X.shape[1] == X.shape[2] == X.shape[3]):
        raise ValueError(f"volumes must be cubic boxes, got non-cubic shape {X.shape[1:]}")
    if X.shape[0] < 1 or X.shape[1] < 2:
        raise ValueError(f"X must hold at least one volume of side >= 2, got shape {X.shape}")
    # Checked in the given dtype: float64 beyond the float32 range would turn into inf.
    if not np.all(np.isfinite(X)):
        bad = np.unique(np.nonzero(~np.isfinite(X))[0])
        raise ValueError(
            f"X contains NaN or infinite values in {len(bad)} particle(s), first index {bad[0]}"
        )
    largest = max(abs(float(X.min())), abs(float(X.max())))
    # All-zero data pass: the CC baseline scores them 0, the ML estimator refuses them.
    if largest > 0 and not _DATA_RANGE[0] <= largest <= _DATA_RANGE[1]:
        raise ValueError(
            f"X has largest magnitude {largest:.3g}, outside [{_DATA_RANGE[0]:g}, "
            f"{_DATA_RANGE[1]:g}] where the float32 computation stays accurate; rescale "
            "the particles, e.g. with mlsubtomo.preprocessing.ParticleNormalizer"
        )
    return np.ascontiguousarray(X, dtype=np.float32)


def _check_real_dtype(array, name):
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")


def _check_references(references, n_classes, box_size):
    """Raise unless ``references`` are K finite real volumes of the data's box size."""
    expected = (n_classes, box_size, box_size, box_size)
    try:
        refs = np.asarray(references)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"init_references must be an array of shape {expected}: {exc}") from None
    _check_real_dtype(refs, "init_references")
    if refs.shape != expected:
        raise ValueError(
            f"init_references must have shape (n_classes, D, D, D) = {expected}, got "
            f"{refs.shape}"
        )
    if not np.all(np.isfinite(refs)):
        raise ValueError("init_references contains NaN or infinite values")


def _group_masks(masks, n, d):
    """Distinct masks and the index of each particle's mask among them."""
    half = (d, d, d // 2 + 1)
    if masks is None:
        return [FullData()], np.zeros(n, dtype=np.int64)
    if isinstance(masks, Mask):
        _check_mask_box(masks, d, "masks")
        return [masks], np.zeros(n, dtype=np.int64)
    if isinstance(masks, np.ndarray) and masks.dtype != object:
        if masks.shape == half:
            return [ArrayMask(masks)], np.zeros(n, dtype=np.int64)
        if masks.shape != (n, *half):
            raise ValueError(
                f"masks array must have shape {half} or {(n, *half)} (half grid of box "
                f"size {d}), got {masks.shape}"
            )
        keys = {}
        group = np.empty(n, dtype=np.int64)
        distinct = []
        for i, m in enumerate(masks):
            key = np.packbits(m.astype(bool)).tobytes()
            if key not in keys:
                keys[key] = len(distinct)
                distinct.append(ArrayMask(m))
            group[i] = keys[key]
        return distinct, group
    if isinstance(masks, str | bytes) or not isinstance(masks, Iterable):
        # list() would split a string into characters and report a count mismatch.
        raise TypeError(
            f"masks must be a Mask, one mask per particle, or a boolean array of shape "
            f"{half} or {(n, *half)}; got {type(masks).__name__}"
        )
    masks = list(masks)
    if len(masks) != n:
        raise ValueError(f"masks must give one mask per particle ({n}), got {len(masks)}")
    distinct, group = [], np.empty(n, dtype=np.int64)
    for i, m in enumerate(masks):
        if not isinstance(m, Mask):
            try:
                m = ArrayMask(np.asarray(m))
            except ValueError as exc:
                raise ValueError(
                    f"masks[{i}] is neither a Mask nor a boolean half grid of shape {half}: "
                    f"{exc}"
                ) from None
        _check_mask_box(m, d, f"masks[{i}]")
        for j, seen in enumerate(distinct):
            if seen == m:
                group[i] = j
                break
        else:
            group[i] = len(distinct)
            distinct.append(m)
    return distinct, group


def _check_mask_box(mask, d, name):
    if isinstance(mask, ArrayMask) and mask.box_size != d:
        raise ValueError(
            f"{name} is a half grid for box size {mask.box_size}, but X has box size {d}"
        )


def _check_rotations(rotations, n, name):
    if rotations is None:
        return None
    if isinstance(rotations, Rotation):
        matrices = rotations.as_matrix().reshape(-1, 3, 3)
    else:
        matrices = np.asarray(rotations, dtype=np.float64)
        if matrices.ndim != 3 or matrices.shape[1:] != (3, 3):
            raise ValueError(f"{name} must have shape (n, 3, 3), got {matrices.shape}")
        if not np.all(np.isfinite(matrices)):
            raise ValueError(f"{name} contains NaN or infinite values")
        # from_matrix would quietly replace any matrix by its nearest rotation.
        error = np.abs(np.einsum("nji,njk->nik", matrices, matrices) - np.eye(3)).max(
            axis=(1, 2), initial=0.0
        )
        det = np.linalg.det(matrices)
        bad = np.flatnonzero((error > _ROTATION_TOL) | (det <= 0))
        if bad.size:
            i = bad[0]
            raise ValueError(
                f"{name} must be rotation matrices (R^T R = I, det R = +1); matrix {i} is "
                f"not (max |R^T R - I| = {error[i]:.2g}, det R = {det[i]:.3g})"
            )
        matrices = Rotation.from_matrix(matrices).as_matrix()
    if n is not None and len(matrices) != n:
        raise ValueError(f"{name} must give one rotation per particle ({n}), got {len(matrices)}")
    if len(matrices) == 0:
        raise ValueError(f"{name} is empty")
    return matrices


def _check_shifts(shifts, n, d):
    if shifts is None:
        return None
    shifts = np.asarray(shifts, dtype=np.float64)
    if shifts.shape != (n, 3) or not np.all(np.isfinite(shifts)):
        raise ValueError(f"init_shifts must be finite with shape {(n, 3)}, got {shifts.shape}")
    return np.rint(shifts).astype(np.int64)


def _symmetrise(refs, group_matrices):
    out = np.zeros_like(refs, dtype=np.float64)
    for matrix in group_matrices:
        for k in range(len(refs)):
            out[k] += rotate_volume(refs[k], matrix, order=3)
    return (out / len(group_matrices)).astype(np.float32)
