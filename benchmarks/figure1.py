"""Reproduce Figure 1 of Scheres et al. (Structure 17, 2009) as a re-runnable benchmark.

Usage::

    python benchmarks/figure1.py --preset quick [--out benchmarks/results] [--n-jobs -1]
    python benchmarks/figure1.py --preset paper          # hours (40 iterations, 15 degrees)
    python benchmarks/figure1.py --preset paper --limit-runs 1 --max-iter 1 --max-fits 1 \
        --out /tmp/figure1_check                         # start-up check of the paper preset
    python benchmarks/figure1.py --preset smoke          # < 1 minute (tests/test_figure1_smoke.py)
    python benchmarks/figure1.py --preset quick --replot # findings, PNG, markdown from the JSON

Two classes, GroEL14 and GroEL14-GroES7, are simulated as in the paper's tests on
simulated data: random rotations (with a moderate, tilt 60-120 degrees omitted, or
severe, 40-140 degrees omitted, preferred orientation), random integer shifts, white
Gaussian noise at a given SNR and a +-60 degree missing wedge about y. The maps come
from the atomic models in ``../shared/data/groel_pdb`` (1OEL expanded to its 14-mer
biological assembly, and 1AON) through :func:`mlsubtomo.simulate.density_from_pdb`
with the seven-fold axis put along z; when those files or gemmi are missing the
geometric phantoms :func:`~mlsubtomo.simulate.groel_phantom` and
:func:`~mlsubtomo.simulate.groel_groes_phantom` are used instead. The JSON records
which.

Panels (as in the paper's Figure 1):

A. class purity against SNR for ML (:class:`mlsubtomo.MissingDataMLClassifier`) and
   the constrained cross-correlation baseline (:class:`mlsubtomo.ConstrainedCCClassifier`),
   moderate preferred orientation, several runs per SNR;
B. ML against near-delta ML (sigma fixed at 1/100 of the true noise) at the marginal SNR;
C. and D. imputation of the missing data against weighted averaging, at the marginal
   SNR, with moderate (C) and severe (D) preferred orientation;
E. classification with the true orientations and shifts given (``align=False``);
F. median orientation error against SNR of K = 1 alignment of the GroEL14 particles
   alone, next to the errors of the K = 2 runs of panel A.

ML and CC use the same settings (angular step, shift range, regularisation schedule,
number of iterations) and the same random initialisation (the same ``random_state``:
the weighted averages of K random subsets in random orientations).

Each class average is also compared with its true map by Fourier shell correlation.
A reference-free average lies in an arbitrary orientation and position, so the true
map is first brought into the average's frame: the true map is the reference of a
one-class :class:`~mlsubtomo.ConstrainedCCClassifier` with ``max_iter=0`` and the
average its single, fully observed particle, which finds the rotation and shift of
best constrained correlation (a global search on a coarse grid, then a local search
on a finer one). The true map, rotated (cubic splines) and shifted accordingly, is
compared with the average by :func:`mlsubtomo.metrics.fsc`, and the resolutions at
FSC 0.5 and 0.143 are reported. Classes are matched to true classes by the matching
of :func:`mlsubtomo.metrics.class_purity` (the one maximising agreeing particles).

Outputs, written atomically under ``--out``: ``figure1_<preset>.json`` (every number,
rewritten after each fit, so an interrupted run keeps what it did),
``figure1_<preset>.png`` (the six panels) and ``figure1_<preset>.md`` (a summary
with the run times and a check of the paper's qualitative findings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

import mlsubtomo
from mlsubtomo import (
    ConstrainedCCClassifier,
    LinearDecay,
    MissingDataMLClassifier,
    MissingWedge,
    simulate,
)
from mlsubtomo.io import atomic_write
from mlsubtomo.metrics import (
    class_purity,
    classified_orientation_errors,
    fsc,
    fsc_resolution,
    orientation_errors,
)
from mlsubtomo.sampling import neighbours, so3_grid, symmetry_group
from mlsubtomo.transform import rotate_volume, shift_volume

REPO = Path(__file__).resolve().parents[1]
PDB_DIR = REPO.parent / "shared" / "data" / "groel_pdb"
RESULTS = Path(__file__).resolve().parent / "results"

MODERATE = (60.0, 120.0)
SEVERE = (40.0, 140.0)
WEDGE = (-60.0, 60.0)
CLASS_NAMES = ("GroEL14", "GroEL14-GroES7")
# Point groups of the true structures (seven-fold axis z, two-fold of GroEL14 about x).
CLASS_SYMMETRY = ("D7", "C7")
PURE = 0.95  # "almost completely pure" (finding 2)
SEPARATED = 0.6  # findings 1 compares ML and CC where either mean purity exceeds this

METHODS = {
    "ML": "ML, imputation (the paper's ML)",
    "CC": "constrained cross-correlation, weighted averaging",
    "ML near-delta": "ML with sigma fixed at 1/100 of the true noise",
    "ML weighted average": "ML with weighted averaging instead of imputation",
    "ML fixed orientations": "ML classification with the true orientations and shifts",
    "ML K=1": "ML alignment (K = 1) of the GroEL14 particles alone",
}


@dataclass(frozen=True)
class Preset:
    """Settings of one preset.

    Attributes
    ----------
    name : str
    n_particles : int
        Particles per data set (both classes, equal numbers).
    box_size : int
        Side of the cubic box in voxels.
    voxel_size : float
        Angstrom per voxel, chosen so that the larger complex (radius about 115 A
        about its centre of mass) fits in the box in every orientation.
    resolution : float
        Resolution of the simulated maps in Angstrom (the paper: 25 A), at least
        two voxels.
    angular_step : float
        Angular sampling of both methods, degrees.
    max_shift : int
        Shifts are drawn uniformly in ``[-max_shift, max_shift]^3`` and searched in
        the same range.
    max_iter : int
        Iterations of every run (the paper: 40).
    theta0, theta_steps : float, int
        Regularisation ``LinearDecay(theta0, theta_steps)`` of both methods.
    snrs : tuple of float
        SNRs of panels A, E and F.
    marginal_snr : float
        SNR of panels B, C and D (one of ``snrs``), on the limit of what ML handles.
    n_runs : int
        Runs (data set and initialisation seeds) per SNR of panels A and E.
    n_runs_marginal : int
        Runs of panels B, C and D (at most ``n_runs``: the ML runs of panel A at
        the marginal SNR are those of B and C).
    n_runs_k1 : int
        Runs per SNR of panel F.
    fsc_coarse_step, fsc_fine_step : float
        Angular steps of the global and the local search that align each true map
        to its class average before the FSC.
    """

    name: str
    n_particles: int
    box_size: int
    voxel_size: float
    resolution: float
    angular_step: float
    max_shift: int
    max_iter: int
    theta0: float
    theta_steps: int
    snrs: tuple
    marginal_snr: float
    n_runs: int
    n_runs_marginal: int
    n_runs_k1: int
    fsc_coarse_step: float = 15.0
    fsc_fine_step: float = 5.0
    notes: list = field(default_factory=list)


PRESETS = {
    "smoke": Preset(
        name="smoke",
        n_particles=16,
        box_size=16,
        voxel_size=17.0,
        resolution=42.5,
        angular_step=60.0,
        max_shift=1,
        max_iter=2,
        theta0=5.0,
        theta_steps=1,
        snrs=(0.05, 1.0),
        marginal_snr=1.0,
        n_runs=1,
        n_runs_marginal=1,
        n_runs_k1=1,
        fsc_coarse_step=40.0,
        fsc_fine_step=20.0,
        notes=["smoke preset: a tiny end-to-end check of the script, not a result"],
    ),
    "quick": Preset(
        name="quick",
        n_particles=100,
        box_size=20,
        voxel_size=13.0,
        resolution=26.0,
        angular_step=30.0,
        max_shift=2,
        max_iter=20,
        theta0=5.0,
        theta_steps=5,
        snrs=(0.02, 0.03, 0.05, 0.1),
        marginal_snr=0.03,
        n_runs=3,
        n_runs_marginal=3,
        n_runs_k1=2,
        notes=[
            "box 20 at 13 A/voxel: the atomic models (radius about 115 A) must fit, and "
            "the resolution is 26 A (Nyquist) instead of 25 A",
            "SNRs 0.02-0.1 rather than the paper's 0.002-0.1: with 4 times fewer voxels and "
            "half the particles the quick data hold much less signal per SNR; a first run "
            "(SNRs 0.02, 0.05, 0.1) gave ML mean purities 0.60, 0.96, 0.99, so the marginal "
            "SNR of panels B-D (the paper's 'limit of the amount of noise ML can handle', "
            "0.007 there) is 0.03 here",
            "to fit in 30 minutes on 2 cores: 3 runs per SNR in panels A-E, 2 in panel F",
        ],
    ),
    "paper": Preset(
        name="paper",
        n_particles=200,
        box_size=32,
        voxel_size=8.0,
        resolution=25.0,
        angular_step=15.0,
        max_shift=3,
        max_iter=40,
        theta0=5.0,
        theta_steps=5,
        snrs=(0.002, 0.005, 0.007, 0.01, 0.02, 0.05, 0.1),
        marginal_snr=0.007,
        n_runs=5,
        n_runs_marginal=5,
        n_runs_k1=2,
    ),
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def true_maps(preset: Preset) -> tuple[np.ndarray, dict]:
    """The two true maps (GroEL14, GroEL14-GroES7) and where they came from.

    Parameters
    ----------
    preset : Preset

    Returns
    -------
    maps : ndarray of shape (2, D, D, D), float32
        Indexed ``[z, y, x]``, seven-fold axis along z, maximum 1.
    source : dict
        ``{"source": "pdb" or "phantom", ...}`` with the files used or the reason
        for the fallback.
    """
    d, vs, res = preset.box_size, preset.voxel_size, preset.resolution
    files = {"GroEL14": PDB_DIR / "1oel.pdb.gz", "GroEL14-GroES7": PDB_DIR / "1aon.pdb.gz"}
    reason = None
    if not all(p.is_file() for p in files.values()):
        reason = f"atomic models not found in {PDB_DIR}"
    else:
        try:
            import gemmi  # noqa: F401
        except ImportError:
            reason = "gemmi is not installed"
    if reason is None:
        groel = simulate.density_from_pdb(
            files["GroEL14"], vs, d, res, assembly="first", align_principal_axes=True
        )
        groes = simulate.density_from_pdb(
            files["GroEL14-GroES7"], vs, d, res, align_principal_axes=True
        )
        source = {
            "source": "pdb",
            "files": {k: str(v) for k, v in files.items()},
            "how": f"density_from_pdb(resolution={res:g} A, voxel_size={vs:g} A, principal "
            "axis along z); 1OEL with assembly='first' (the 14-mer), 1AON as deposited",
        }
        return np.stack([groel, groes]), source
    maps = np.stack(
        [
            simulate.groel_phantom(d, vs, res),
            simulate.groel_groes_phantom(d, vs, res),
        ]
    )
    return maps, {"source": "phantom", "reason": reason}


def make_data(preset: Preset, maps, snr, preferred, seed) -> simulate.SimulatedDataset:
    """One simulated data set: equal classes, the +-60 degree wedge, random shifts.

    Parameters
    ----------
    preset : Preset
    maps : ndarray of shape (2, D, D, D)
    snr : float
    preferred : tuple of float
        Tilt range omitted from the orientations, degrees.
    seed : int

    Returns
    -------
    mlsubtomo.simulate.SimulatedDataset
    """
    return simulate.make_dataset(
        maps,
        preset.n_particles,
        masks=MissingWedge(*WEDGE),
        snr=snr,
        preferred_orientation=preferred,
        max_shift=preset.max_shift,
        random_state=seed,
        voxel_size=preset.voxel_size,
    )


def seed_for(base: int, *keys) -> int:
    """A reproducible 31-bit seed from the base seed and integer keys."""
    return int(np.random.SeedSequence([base, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------------
# Fits and their figures of merit
# ---------------------------------------------------------------------------


def make_estimator(method: str, preset: Preset, n_jobs, random_state, noise_std=None):
    """The estimator of a method with the preset's shared settings.

    Parameters
    ----------
    method : str
        A key of ``METHODS``.
    preset : Preset
    n_jobs : int or None
    random_state : int
        Seeds the initial references and the grid perturbation; ML and CC runs of
        the same data get the same value, hence the same start.
    noise_std : float, optional
        True noise standard deviation (near-delta ML only).

    Returns
    -------
    MissingDataMLClassifier or ConstrainedCCClassifier
    """
    common = dict(
        angular_step=preset.angular_step,
        max_shift=preset.max_shift,
        regularization=LinearDecay(theta0=preset.theta0, n_steps=preset.theta_steps),
        max_iter=preset.max_iter,
        # tol=0: ML never stops early (its tol bounds the log-likelihood change);
        # CC's tol is the fraction of particles changing class, so it is replaced below.
        tol=0.0,
        n_jobs=n_jobs,
        random_state=random_state,
    )
    if method == "CC":
        # tol=None: CC runs all max_iter iterations too, so both get the same number.
        return ConstrainedCCClassifier(2, **{**common, "tol": None})
    if method == "ML":
        return MissingDataMLClassifier(2, **common)
    if method == "ML near-delta":
        return MissingDataMLClassifier(
            2, init_sigma=float(noise_std) / 100.0, fix_sigma=True, **common
        )
    if method == "ML weighted average":
        return MissingDataMLClassifier(2, missing_data="weighted_average", **common)
    if method == "ML fixed orientations":
        return MissingDataMLClassifier(2, align=False, **common)
    if method == "ML K=1":
        return MissingDataMLClassifier(1, **common)
    raise ValueError(f"unknown method {method!r}")


def class_matching(labels_true, labels_pred, n_classes) -> dict:
    """Found class -> true class, by the matching that maximises agreeing particles.

    The matching of :func:`mlsubtomo.metrics.class_purity` (Hungarian algorithm on
    the contingency table).

    Parameters
    ----------
    labels_true, labels_pred : ndarray of shape (N,)
    n_classes : int
        Number of found classes K.

    Returns
    -------
    dict
        ``{found class: true class}`` for the matched found classes.
    """
    table = np.zeros((n_classes, len(CLASS_NAMES)), dtype=np.int64)
    np.add.at(table, (labels_pred, labels_true), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)}


def align_truth(average, truth, preset: Preset) -> tuple[np.ndarray, dict]:
    """The true map moved into the frame of a class average.

    A one-class :class:`~mlsubtomo.ConstrainedCCClassifier` whose reference is the
    true map and whose single particle is the average (fully observed) finds the
    rotation R and shift t of best constrained correlation, ``average(r) ~
    truth(R^T (r - t))``, over every shift in the box: first globally on the grid of
    ``fsc_coarse_step`` restricted to the asymmetric unit of C7 (both true maps have
    their seven-fold axis along z, so the other orientations are redundant), then
    among the seven C7-related copies ``R g`` of the first answer (the true maps
    are only nearly symmetric) and the rotations of the finer grid of
    ``fsc_fine_step`` (no symmetry) within ``fsc_coarse_step`` of each copy.

    Parameters
    ----------
    average, truth : ndarray of shape (D, D, D)
    preset : Preset

    Returns
    -------
    aligned : ndarray of shape (D, D, D)
        ``truth`` rotated (cubic splines) and shifted by (R, t).
    pose : dict
        The rotation (as a rotation vector in degrees), the shift and the correlation.
    """
    particle = np.asarray(average, dtype=np.float32)[None]
    reference = np.asarray(truth, dtype=np.float32)[None]
    search = dict(
        init_references=reference, max_iter=0, perturb=False, max_shift=None, n_jobs=1
    )
    coarse = ConstrainedCCClassifier(
        1, angular_step=preset.fsc_coarse_step, symmetry="C7", **search
    ).fit(particle)
    # The true maps are only nearly C7-symmetric: try every copy R g of the answer.
    copies = coarse.rotations_[0] @ symmetry_group("C7").as_matrix()
    grid = so3_grid(preset.fsc_fine_step)
    near = [grid[neighbours(grid, Rotation.from_matrix(c), preset.fsc_coarse_step)].as_matrix()
            for c in copies]
    candidates = np.concatenate([copies, *near])
    fine = ConstrainedCCClassifier(1, rotations=candidates, **search).fit(particle)
    rotation, shift = fine.rotations_[0], fine.shifts_[0]
    aligned = shift_volume(rotate_volume(reference[0], rotation, order=3), shift)
    pose = {
        "rotation_vector_deg": np.degrees(Rotation.from_matrix(rotation).as_rotvec()).tolist(),
        "shift_xyz": [int(v) for v in shift],
        "correlation": float(fine.max_correlation_[0]),
    }
    return aligned, pose


def fsc_of_classes(estimator, data, matching, preset: Preset) -> list:
    """FSC resolutions of each matched class average against its true map.

    Parameters
    ----------
    estimator : fitted estimator
    data : SimulatedDataset
    matching : dict
        Found class -> true class.
    preset : Preset

    Returns
    -------
    list of dict
        One per matched found class: the true class, the number of particles
        assigned, the resolutions at FSC 0.5 and 0.143 (Angstrom; None when the FSC
        is below the threshold already in the first shell), and the alignment.
    """
    out = []
    for found, true in sorted(matching.items()):
        aligned, pose = align_truth(estimator.references_[found], data.references[true], preset)
        freq, curve = fsc(estimator.references_[found], aligned, voxel_size=preset.voxel_size)
        out.append(
            {
                "class": found,
                "true_class": CLASS_NAMES[true],
                "n_particles": int(np.sum(estimator.labels_ == found)),
                "n_correct": int(np.sum((estimator.labels_ == found) & (data.labels == true))),
                "fsc_0.5_A": _finite(fsc_resolution(freq, curve, 0.5)),
                "fsc_0.143_A": _finite(fsc_resolution(freq, curve, 0.143)),
                "alignment": pose,
            }
        )
    return out


def run_fit(method, preset, data, n_jobs, random_state, subset=None) -> dict:
    """Fit one method to one data set and measure it.

    Parameters
    ----------
    method : str
        A key of ``METHODS``.
    preset : Preset
    data : SimulatedDataset
    n_jobs : int or None
    random_state : int
    subset : ndarray of bool, optional
        Particles to use (panel F: the GroEL14 particles).

    Returns
    -------
    dict
        Purity, median orientation error (degrees, up to the symmetry of the true
        structure and one global rotation per class), fit time in seconds, number
        of iterations, class sizes and the FSC of each class average.
    """
    index = np.arange(len(data)) if subset is None else np.flatnonzero(subset)
    volumes = data.volumes[index]
    labels_true = data.labels[index]
    rotations_true = data.rotations[index]
    estimator = make_estimator(
        method, preset, n_jobs, random_state, noise_std=float(np.mean(data.noise_std))
    )
    fit_kwargs = {"masks": data.masks}
    if method == "ML fixed orientations":
        fit_kwargs.update(init_rotations=rotations_true, init_shifts=data.shifts[index])
    start = time.perf_counter()
    estimator.fit(volumes, **fit_kwargs)
    seconds = time.perf_counter() - start

    groups = [symmetry_group(s).as_matrix() for s in CLASS_SYMMETRY]
    if estimator.n_classes == 1:
        errors = orientation_errors(rotations_true, estimator.rotations_, groups[0])
    else:
        errors = classified_orientation_errors(
            labels_true, estimator.labels_, rotations_true, estimator.rotations_, groups
        )
    matching = class_matching(labels_true, estimator.labels_, estimator.n_classes)
    sub = replace_volumes(data, index)
    start = time.perf_counter()
    fscs = fsc_of_classes(estimator, sub, matching, preset)
    fsc_seconds = time.perf_counter() - start
    return {
        "purity": class_purity(labels_true, estimator.labels_),
        "median_orientation_error_deg": _finite(np.median(errors)) if errors.size else None,
        "n_aligned_for_error": int(errors.size),
        "seconds": seconds,
        "n_iter": int(estimator.n_iter_),
        "class_sizes": np.bincount(estimator.labels_, minlength=estimator.n_classes).tolist(),
        "fsc": fscs,
        "fsc_seconds": fsc_seconds,
        "random_state": random_state,
    }


def replace_volumes(data, index) -> simulate.SimulatedDataset:
    """The data set restricted to ``index`` (labels and poses; references kept)."""
    return simulate.SimulatedDataset(
        volumes=data.volumes[index],
        masks=data.masks,
        labels=data.labels[index],
        rotations=data.rotations[index],
        shifts=data.shifts[index],
        references=data.references,
        snr=data.snr,
        noise_std=data.noise_std[index],
        max_shift=data.max_shift,
        voxel_size=data.voxel_size,
    )


def _finite(value):
    """A float, or None when not finite (JSON has no inf or NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def plan(preset: Preset) -> list[tuple]:
    """Every fit of the figure, in the order run: (panel, method, snr, preferred, run).

    The ML runs of panel A at the marginal SNR also serve as the ML of panel B
    and the imputation of panel C (same data, same start), so they are fitted once.

    Parameters
    ----------
    preset : Preset

    Returns
    -------
    list of tuple
    """
    jobs = []
    for run in range(preset.n_runs):
        for snr in preset.snrs:
            jobs.append(("A", "ML", snr, MODERATE, run))
            jobs.append(("A", "CC", snr, MODERATE, run))
            jobs.append(("E", "ML fixed orientations", snr, MODERATE, run))
        if run < preset.n_runs_marginal:
            m = preset.marginal_snr
            jobs.append(("B", "ML near-delta", m, MODERATE, run))
            jobs.append(("C", "ML weighted average", m, MODERATE, run))
            jobs.append(("D", "ML", m, SEVERE, run))
            jobs.append(("D", "ML weighted average", m, SEVERE, run))
        if run < preset.n_runs_k1:
            for snr in preset.snrs:
                jobs.append(("F", "ML K=1", snr, MODERATE, run))
    return jobs


def machine_info() -> dict:
    """Host, CPU, load and library versions."""
    import joblib
    import scipy
    import sklearn

    versions = {
        "python": platform.python_version(),
        "mlsubtomo": mlsubtomo.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "joblib": joblib.__version__,
    }
    for name in ("gemmi", "pyfftw", "matplotlib"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            versions[name] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def empty_results(preset: Preset, source: dict, args) -> dict:
    """The JSON skeleton: metadata and one entry per panel."""
    snrs = list(preset.snrs)
    m = preset.marginal_snr
    settings = asdict(preset)
    settings["snrs"] = snrs
    settings.update(
        wedge_deg=list(WEDGE),
        moderate_preferred_orientation_deg=list(MODERATE),
        severe_preferred_orientation_deg=list(SEVERE),
        regularization=f"LinearDecay(theta0={preset.theta0}, n_steps={preset.theta_steps})",
        initialisation="weighted averages of K random subsets in random orientations",
    )
    return {
        "metadata": {
            "preset": preset.name,
            "data": source,
            "machine": machine_info(),
            "arguments": args.argv,
            "n_jobs": args.n_jobs,
            "seed": args.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
            "total_seconds": None,
            "methods": METHODS,
        },
        "settings": settings,
        "panels": {
            "A": _panel("class purity vs SNR, moderate preferred orientation", snrs,
                        ["ML", "CC"], MODERATE),
            "B": _panel("ML vs near-delta ML at the marginal SNR", [m],
                        ["ML", "ML near-delta"], MODERATE),
            "C": _panel("imputation vs weighted averaging, moderate preferred orientation",
                        [m], ["ML", "ML weighted average"], MODERATE),
            "D": _panel("imputation vs weighted averaging, severe preferred orientation",
                        [m], ["ML", "ML weighted average"], SEVERE),
            "E": _panel("classification with the true orientations given", snrs,
                        ["ML fixed orientations"], MODERATE),
            "F": _panel("K = 1 orientation error vs SNR (GroEL14 particles only)", snrs,
                        ["ML K=1"], MODERATE),
        },
    }


def _panel(title, snrs, methods, preferred) -> dict:
    return {
        "title": title,
        "preferred_orientation_deg": list(preferred),
        "snr": list(snrs),
        "methods": {
            m: {
                "runs": [[] for _ in snrs],
                "mean_purity": [None] * len(snrs),
                "median_orientation_error_deg": [None] * len(snrs),
                "mean_seconds": [None] * len(snrs),
            }
            for m in methods
        },
    }


def record(results, panel, method, snr, entry) -> None:
    """Add one fit to a panel (and to the panels that share it) and update summaries."""
    targets = [(panel, method)]
    settings = results["settings"]
    if (
        panel == "A" and method == "ML" and snr == settings["marginal_snr"]
        and entry["run"] < settings["n_runs_marginal"]
    ):
        targets += [("B", "ML"), ("C", "ML")]
    for name, meth in targets:
        p = results["panels"][name]
        runs = p["methods"][meth]["runs"][p["snr"].index(snr)]
        shared = dict(entry, shared_with_panel="A") if name != panel else entry
        runs.append(shared)
    for p in results["panels"].values():
        for stats in p["methods"].values():
            stats["mean_purity"] = [_mean([r["purity"] for r in rs]) for rs in stats["runs"]]
            stats["median_orientation_error_deg"] = [
                _mean([r["median_orientation_error_deg"] for r in rs]) for rs in stats["runs"]
            ]
            stats["mean_seconds"] = [_mean([r["seconds"] for r in rs]) for rs in stats["runs"]]


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def run_benchmark(preset: Preset, args) -> dict:
    """Run every fit of the figure, writing the JSON after each.

    Parameters
    ----------
    preset : Preset
    args : argparse.Namespace
        ``out``, ``n_jobs``, ``seed``, ``max_fits`` and ``argv``.

    Returns
    -------
    dict
        The results (also written to ``figure1_<preset>.json``).
    """
    t0 = time.perf_counter()
    maps, source = true_maps(preset)
    results = empty_results(preset, source, args)
    json_path = Path(args.out) / f"figure1_{preset.name}.json"
    jobs = plan(preset)
    if args.max_fits is not None:
        jobs = jobs[: args.max_fits]
    print(
        f"figure1 preset {preset.name}: {len(jobs)} fits, data from {source['source']}, "
        f"N={preset.n_particles}, box {preset.box_size}, {preset.angular_step} deg, "
        f"{preset.max_iter} iterations",
        flush=True,
    )
    cache = {}
    for i, (panel, method, snr, preferred, run) in enumerate(jobs):
        key = (snr, preferred, run)
        if key not in cache:
            cache.clear()  # one data set in memory at a time (jobs are grouped by data)
            seed = seed_for(args.seed, preset.snrs.index(snr), int(preferred[0]), run)
            cache[key] = (make_data(preset, maps, snr, preferred, seed), seed)
        data, data_seed = cache[key]
        subset = data.labels == 0 if method == "ML K=1" else None
        fit_seed = seed_for(args.seed, 7, data_seed)
        entry = run_fit(method, preset, data, args.n_jobs, fit_seed, subset)
        entry.update(run=run, data_seed=data_seed,
                     true_noise_std_mean=float(np.mean(data.noise_std)))
        record(results, panel, method, snr, entry)
        error = entry["median_orientation_error_deg"]
        print(
            f"[{i + 1}/{len(jobs)}] panel {panel} method {method!r} snr {snr:g} run {run} "
            f"purity {entry['purity']:.3f} "
            f"orientation error {'nan' if error is None else f'{error:.1f}'} deg "
            f"iterations {entry['n_iter']} {entry['seconds']:.1f} s "
            f"(+{entry['fsc_seconds']:.1f} s FSC)",
            flush=True,
        )
        results["metadata"]["elapsed_seconds"] = time.perf_counter() - t0
        atomic_write(json_path, json.dumps(results, indent=1))

    results["findings"] = findings(results)
    results["supplementary_findings"] = supplementary_findings(results)
    results["timing"] = timing(results)
    results["metadata"]["status"] = "complete"
    results["metadata"]["load_average_at_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    results["metadata"]["total_seconds"] = time.perf_counter() - t0
    results["metadata"].pop("elapsed_seconds", None)
    atomic_write(json_path, json.dumps(results, indent=1))
    return results


def timing(results) -> dict:
    """Fit time of each method over all its fits (shared fits counted once)."""
    out = {}
    for name, panel in results["panels"].items():
        for method, stats in panel["methods"].items():
            for runs in stats["runs"]:
                for r in runs:
                    if "shared_with_panel" in r:
                        continue
                    t = out.setdefault(method, {"n_fits": 0, "total_seconds": 0.0,
                                                "fsc_seconds": 0.0, "panels": []})
                    t["n_fits"] += 1
                    t["total_seconds"] += r["seconds"]
                    t["fsc_seconds"] += r["fsc_seconds"]
                    if name not in t["panels"]:
                        t["panels"].append(name)
    for t in out.values():
        t["mean_seconds"] = t["total_seconds"] / t["n_fits"]
    return out


# ---------------------------------------------------------------------------
# The paper's qualitative findings
# ---------------------------------------------------------------------------


def findings(results) -> list[dict]:
    """Check the paper's four qualitative findings on the results.

    Returns
    -------
    list of dict
        Each with ``id``, ``claim``, ``holds`` (bool, or None when it cannot be
        decided from the results) and ``detail`` (the mean purities, with the
        purity of each run in brackets).
    """
    a = results["panels"]["A"]
    snrs = a["snr"]
    ml = a["methods"]["ML"]["mean_purity"]
    cc = a["methods"]["CC"]["mean_purity"]
    out = []

    compared = [
        (i, s) for i, s in enumerate(snrs)
        if ml[i] is not None and cc[i] is not None and max(ml[i], cc[i]) > SEPARATED
    ]
    def purities(method, i):
        return [r["purity"] for r in a["methods"][method]["runs"][i]]

    def spread(i):
        """Largest range of the run purities of ML or CC at SNR index i."""
        return max(np.ptp(purities(m, i)) if purities(m, i) else 0.0 for m in ("ML", "CC"))

    lower = [(i, s) for i, s in compared if ml[i] < cc[i]]
    detail = "; ".join(
        f"SNR {s:g}: ML {_runs(a, 'ML', i)} vs CC {_runs(a, 'CC', i)}"
        + (" (ML lower)" if ml[i] < cc[i] else "")
        for i, s in compared
    ) or f"no SNR where either exceeds {SEPARATED}"
    for i, s in lower:
        if cc[i] - ml[i] <= spread(i):
            detail += (
                f". At SNR {s:g} ML is lower by {cc[i] - ml[i]:.3f}, less than the spread "
                f"between runs ({spread(i):.2f}): not a significant difference with "
                f"{len(purities('ML', i))} runs"
            )
    out.append({
        "id": 1,
        "claim": f"ML mean purity >= CC's at every SNR where either exceeds {SEPARATED}",
        "holds": not lower if compared else None,
        "detail": detail,
    })

    def first_pure(values):
        for s, v in zip(snrs, values, strict=True):
            if v is not None and v >= PURE:
                return s
        return None

    s_ml, s_cc = first_pure(ml), first_pure(cc)
    holds = s_ml is not None and (s_cc is None or s_ml < s_cc)
    if all(v is None for v in ml) or all(v is None for v in cc):
        holds = None  # nothing to compare (e.g. an interrupted run)
    detail = (
        f"lowest SNR with mean purity >= {PURE}: ML "
        f"{'never' if s_ml is None else f'{s_ml:g}'}, CC "
        f"{'never' if s_cc is None else f'{s_cc:g}'} (of the SNRs tested: "
        + ", ".join(f"{s:g}" for s in snrs) + ")"
    )
    if holds is False:
        below = [
            (i, s) for i, s in enumerate(snrs)
            if (s_cc is None or s <= s_cc) and (s_ml is None or s < s_ml)
        ]
        for i, s in below:
            ml_pure = sum(p >= PURE for p in purities("ML", i))
            cc_pure = sum(p >= PURE for p in purities("CC", i))
            if ml_pure:
                detail += (
                    f". At SNR {s:g}, {ml_pure} of {len(purities('ML', i))} ML runs and "
                    f"{cc_pure} of {len(purities('CC', i))} CC runs reached {PURE} "
                    f"(mean purities ML {_fmt(ml[i])}, CC {_fmt(cc[i])})"
                )
    out.append({
        "id": 2,
        "claim": f"ML reaches >= {PURE} mean purity at a lower SNR than CC",
        "holds": holds,
        "detail": detail,
    })

    def pair(panel, first, second):
        p = results["panels"][panel]
        means = [p["methods"][meth]["mean_purity"][0] for meth in (first, second)]
        text = [_runs(p, meth, 0) for meth in (first, second)]
        return means, text

    m = results["settings"]["marginal_snr"]
    (ml_b, delta), (t_ml, t_delta) = pair("B", "ML", "ML near-delta")
    out.append({
        "id": 3,
        "claim": "near-delta ML is worse than ML at the marginal SNR",
        "holds": None if None in (ml_b, delta) else delta < ml_b,
        "detail": f"SNR {m:g}: ML {t_ml} vs near-delta ML {t_delta}",
    })
    (imp, wa), (t_imp, t_wa) = pair("D", "ML", "ML weighted average")
    out.append({
        "id": 4,
        "claim": "imputation >= weighted averaging under severe preferred orientation",
        "holds": None if None in (imp, wa) else imp >= wa,
        "detail": f"SNR {m:g}, tilt {SEVERE[0]:g}-{SEVERE[1]:g} deg omitted: imputation "
        f"{t_imp} vs weighted averaging {t_wa}",
    })
    for item in out[2:]:
        first, second = (ml_b, delta) if item["id"] == 3 else (imp, wa)
        if None not in (first, second) and max(first, second) <= SEPARATED:
            item["detail"] += (
                f" (both at or below {SEPARATED}, i.e. near chance: this comparison is "
                "not informative at this SNR)"
            )
    return out


def supplementary_findings(results) -> list[dict]:
    """Further observations of the paper, reported but not among the four checked.

    Returns
    -------
    list of dict
        As :func:`findings`, with ids "C" (imputation >= weighted averaging with
        the moderate preferred orientation) and "E" (classification with the true
        orientations at least as pure as the reference-free ML at every SNR).
    """
    panels = results["panels"]
    c = panels["C"]
    imp, wa = (c["methods"][k]["mean_purity"][0] for k in ("ML", "ML weighted average"))
    a, e = panels["A"], panels["E"]
    ml = a["methods"]["ML"]["mean_purity"]
    fixed = e["methods"]["ML fixed orientations"]["mean_purity"]
    pairs = [(i, s) for i, s in enumerate(e["snr"]) if None not in (ml[i], fixed[i])]
    return [
        {
            "id": "C",
            "claim": "imputation >= weighted averaging under moderate preferred orientation",
            "holds": None if None in (imp, wa) else imp >= wa,
            "detail": f"SNR {c['snr'][0]:g}: imputation {_runs(c, 'ML', 0)} vs weighted "
            f"averaging {_runs(c, 'ML weighted average', 0)}",
        },
        {
            "id": "E",
            "claim": "classification with the true orientations is at least as pure as "
            "reference-free ML at every SNR",
            "holds": all(fixed[i] >= ml[i] for i, _ in pairs) if pairs else None,
            "detail": "; ".join(
                f"SNR {s:g}: true orientations {_runs(e, 'ML fixed orientations', i)} vs "
                f"reference-free {_runs(a, 'ML', i)}"
                for i, s in pairs
            ),
        },
    ]


def _runs(panel, method, index):
    """Mean purity and the purity of each run, e.g. ``0.960 (0.98, 0.94)``."""
    stats = panel["methods"][method]
    runs = ", ".join(f"{r['purity']:.2f}" for r in stats["runs"][index])
    return f"{_fmt(stats['mean_purity'][index])} ({runs})"


def _fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------
# Figure and summary
# ---------------------------------------------------------------------------


def plot(results, path: Path) -> None:
    """The six panels A-F as a PNG (matplotlib, Agg backend)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = results["panels"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    colours = {"ML": "C0", "CC": "C3", "ML near-delta": "C1", "ML weighted average": "C2",
               "ML fixed orientations": "C4", "ML K=1": "C5"}

    def curve(ax, panel, method, label=None, style="-o", key="purity"):
        p = panels[panel]
        stats = p["methods"][method]
        mean_key = "mean_purity" if key == "purity" else "median_orientation_error_deg"
        field_key = "purity" if key == "purity" else "median_orientation_error_deg"
        xs = [s for s, v in zip(p["snr"], stats[mean_key], strict=True) if v is not None]
        ys = [v for v in stats[mean_key] if v is not None]
        ax.plot(xs, ys, style, color=colours[method], label=label or method)
        for s, runs in zip(p["snr"], stats["runs"], strict=True):
            vals = [r[field_key] for r in runs if r[field_key] is not None]
            ax.scatter([s] * len(vals), vals, color=colours[method], alpha=0.35, s=14)

    def snr_axis(ax):
        snrs = panels["A"]["snr"]
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(snrs)
        ax.set_xticklabels([f"{s:g}" for s in snrs], fontsize=8)
        ax.set_xlabel("SNR")

    def purity_axes(ax, title):
        snr_axis(ax)
        ax.set_ylabel("class purity")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)

    ax = axes[0, 0]
    curve(ax, "A", "ML")
    curve(ax, "A", "CC")
    purity_axes(ax, "A: purity vs SNR (moderate PO)")
    ax.legend(fontsize=8)

    for ax, panel, methods, title in (
        (axes[0, 1], "B", ["ML", "ML near-delta"], "B: ML vs near-delta ML"),
        (axes[0, 2], "C", ["ML", "ML weighted average"], "C: imputation vs WA (moderate PO)"),
        (axes[1, 0], "D", ["ML", "ML weighted average"], "D: imputation vs WA (severe PO)"),
    ):
        stats = panels[panel]["methods"]
        for j, method in enumerate(methods):
            runs = stats[method]["runs"][0]
            vals = [r["purity"] for r in runs]
            mean = stats[method]["mean_purity"][0]
            label = {"ML": "ML (imputation)" if panel in "CD" else "ML"}.get(method, method)
            ax.bar(j, 0 if mean is None else mean, color=colours[method], alpha=0.6,
                   label=label)
            ax.scatter([j] * len(vals), vals, color="k", s=14, zorder=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([m.replace("ML ", "ML\n") for m in methods], fontsize=8)
        ax.set_ylim(0.45, 1.02)
        ax.set_ylabel("class purity")
        ax.set_title(f"{title}, SNR {panels[panel]['snr'][0]:g}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")

    ax = axes[1, 1]
    curve(ax, "E", "ML fixed orientations", label="ML, true orientations")
    curve(ax, "A", "ML", label="ML, reference-free (A)", style="--o")
    purity_axes(ax, "E: classification with true orientations")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    curve(ax, "F", "ML K=1", label="ML K=1 (GroEL14 only)", key="error")
    curve(ax, "A", "ML", label="ML K=2 (A)", style="--o", key="error")
    curve(ax, "A", "CC", label="CC K=2 (A)", style=":o", key="error")
    snr_axis(ax)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("median orientation error (deg)")
    ax.set_title("F: orientation error vs SNR", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    meta = results["metadata"]
    s = results["settings"]
    fig.suptitle(
        f"Figure 1 ({meta['preset']} preset): N={s['n_particles']}, box {s['box_size']}, "
        f"{s['angular_step']:g} deg, {s['max_iter']} iterations, maps from "
        f"{meta['data']['source']}",
        fontsize=11,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def summary(results) -> str:
    """The markdown summary: settings, tables, run times and the findings."""
    meta, s, panels = results["metadata"], results["settings"], results["panels"]
    lines = [
        f"# Figure 1 of Scheres et al. (2009), preset `{meta['preset']}`",
        "",
        f"N = {s['n_particles']} particles (GroEL14 and GroEL14-GroES7, equal numbers), "
        f"box {s['box_size']} at {s['voxel_size']:g} A/voxel, maps at "
        f"{s['resolution']:g} A from **{meta['data']['source']}**"
        + (f" ({meta['data'].get('reason')})" if meta["data"].get("reason") else "")
        + f", +-60 degree wedge, shifts up to {s['max_shift']} voxels, "
        f"{s['angular_step']:g} degree sampling, {s['max_iter']} iterations, "
        f"regularisation {s['regularization']}, {s['n_runs']} run(s) per SNR. "
        f"Total time {meta['total_seconds']:.0f} s on {meta['machine']['cpu_count']} CPU(s) "
        f"(load average at start {_load(meta['machine']['load_average_at_start'])}, "
        f"at end {_load(meta.get('load_average_at_end'))}; the machine may be shared).",
        "",
    ]
    for note in s.get("notes", []):
        lines += [f"Note: {note}.", ""]

    a, e, f = panels["A"], panels["E"], panels["F"]
    lines += [
        "## Purity and orientation error vs SNR (panels A, E, F)",
        "",
        "| SNR | ML purity (runs) | CC purity (runs) | ML true orientations (E) "
        "| ML K=2 err (deg) | CC K=2 err (deg) | ML K=1 err (deg) (F) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, snr in enumerate(a["snr"]):
        cells = [f"{snr:g}"]
        for panel, method in ((a, "ML"), (a, "CC"), (e, "ML fixed orientations")):
            stats = panel["methods"][method]
            runs = ", ".join(f"{r['purity']:.2f}" for r in stats["runs"][i])
            cells.append(f"{_fmt(stats['mean_purity'][i])} ({runs})")
        for panel, method in ((a, "ML"), (a, "CC"), (f, "ML K=1")):
            cells.append(_fmt(panel["methods"][method]["median_orientation_error_deg"][i], 1))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Orientation errors: median over the particles of each found class that belong to "
        "its true class, up to the true structure's symmetry (D7 / C7) and one global "
        "rotation per class; averaged over runs.",
        "",
        "## Marginal SNR (panels B, C, D)",
        "",
        "| panel | preferred orientation (tilts omitted) | method | mean purity | runs |",
        "|---|---|---|---|---|",
    ]
    for name in "BCD":
        p = panels[name]
        po = p["preferred_orientation_deg"]
        for method, stats in p["methods"].items():
            runs = ", ".join(f"{r['purity']:.2f}" for r in stats["runs"][0])
            lines.append(
                f"| {name} (SNR {p['snr'][0]:g}) | {po[0]:g}-{po[1]:g} deg | {method} | "
                f"{_fmt(stats['mean_purity'][0])} | {runs} |"
            )
    lines += [
        "",
        "## FSC of the class averages against the true maps",
        "",
        "Mean over runs of the resolution (A) at FSC 0.5 / 0.143 of each class average "
        "matched to a true class (true map aligned to the average by a constrained-CC "
        "search first; Nyquist is "
        f"{2 * s['voxel_size']:g} A; n/a: below the threshold in the first shell).",
        "",
        "| panel | method | SNR | " + " | ".join(f"{c} 0.5 / 0.143" for c in CLASS_NAMES) + " |",
        "|---|---|---|" + "---|" * len(CLASS_NAMES),
    ]
    for name, p in panels.items():
        for method, stats in p["methods"].items():
            for i, snr in enumerate(p["snr"]):
                runs = [r for r in stats["runs"][i] if "shared_with_panel" not in r]
                if not runs:
                    continue
                cells = []
                for cname in CLASS_NAMES:
                    got = [c for r in runs for c in r["fsc"] if c["true_class"] == cname]
                    if not got:
                        cells.append("-")
                        continue
                    half = _mean([c["fsc_0.5_A"] for c in got])
                    tenth = _mean([c["fsc_0.143_A"] for c in got])
                    cells.append(f"{_fmt(half, 1)} / {_fmt(tenth, 1)}")
                lines.append(f"| {name} | {method} | {snr:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Run time of each method",
        "",
        "| method | fits | mean s per fit | total s | FSC alignment s |",
        "|---|---|---|---|---|",
    ]
    for method, t in results["timing"].items():
        lines.append(
            f"| {method} | {t['n_fits']} | {t['mean_seconds']:.1f} | "
            f"{t['total_seconds']:.0f} | {t['fsc_seconds']:.0f} |"
        )
    cc_iters = [r["n_iter"] for rs in a["methods"]["CC"]["runs"] for r in rs]
    ml_iters = [r["n_iter"] for rs in a["methods"]["ML"]["runs"] for r in rs]
    lines += [
        "",
        f"Iterations run (panel A): ML {sorted(set(ml_iters))}, CC {sorted(set(cc_iters))}. "
        "ML runs all iterations (tol=0); "
        + ("so does CC (tol=None)." if set(cc_iters) == set(ml_iters) else
           "CC stopped when no particle changed class (results made before CC ran with "
           "tol=None)."),
        "",
        "## The paper's qualitative findings",
        "",
    ]
    for item in results["findings"]:
        verdict = {True: "holds", False: "does not hold", None: "undecided"}[item["holds"]]
        lines.append(f"{item['id']}. {item['claim']}: **{verdict}**. {item['detail']}.")
    lines += [
        "",
        "Other observations of the paper, not among the four checked findings (mean purity, "
        "runs in brackets):",
        "",
    ]
    for item in results["supplementary_findings"]:
        verdict = {True: "holds", False: "does not hold", None: "undecided"}[item["holds"]]
        lines.append(f"- ({item['id']}) {item['claim']}: {verdict}. {item['detail']}.")
    lines.append("")
    return "\n".join(lines)


def _load(values):
    return "n/a" if not values else "/".join(f"{v:.1f}" for v in values)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Reproduce Figure 1 of Scheres et al. (2009): ML vs CC on simulated "
        "GroEL14 / GroEL14-GroES7 subtomograms."
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", default=str(RESULTS), help="output folder")
    parser.add_argument("--n-jobs", type=int, default=-1,
                        help="parallel workers per fit (joblib; -1: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of data and fits")
    parser.add_argument("--limit-runs", type=int, default=None,
                        help="at most this many runs per SNR (e.g. a start-up check)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="override the preset's number of iterations")
    parser.add_argument("--max-fits", type=int, default=None,
                        help="stop after this many fits (a start-up check); the outputs "
                        "then hold only those")
    parser.add_argument("--replot", action="store_true",
                        help="fit nothing: recompute the findings, figure and summary from "
                        "the existing figure1_<preset>.json in --out")
    parser.add_argument("--snrs", type=float, nargs="+", default=None,
                        help="override the preset's SNRs (the marginal SNR is kept if "
                        "listed, else the middle one is used)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark and write the JSON, PNG and markdown outputs.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        The results written to ``figure1_<preset>.json``.
    """
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS[args.preset]
    notes = list(preset.notes)
    if args.limit_runs is not None:
        preset = replace(preset, n_runs=min(preset.n_runs, args.limit_runs),
                         n_runs_marginal=min(preset.n_runs_marginal, args.limit_runs),
                         n_runs_k1=min(preset.n_runs_k1, args.limit_runs))
        notes.append(f"runs limited to {args.limit_runs} per SNR (--limit-runs)")
    if args.max_iter is not None:
        preset = replace(preset, max_iter=args.max_iter)
        notes.append(f"iterations overridden to {args.max_iter} (--max-iter)")
    if args.snrs is not None:
        snrs = tuple(sorted(args.snrs))
        marginal = preset.marginal_snr if preset.marginal_snr in snrs else snrs[len(snrs) // 2]
        preset = replace(preset, snrs=snrs, marginal_snr=marginal)
        notes.append(f"SNRs overridden to {list(snrs)} (--snrs)")
    if args.max_fits is not None:
        notes.append(f"stopped after at most {args.max_fits} fits (--max-fits): partial")
    preset = replace(preset, notes=notes)

    out = Path(args.out)
    if args.replot:
        results = json.loads((out / f"figure1_{preset.name}.json").read_text())
        results["findings"] = findings(results)
        results["supplementary_findings"] = supplementary_findings(results)
        results["timing"] = timing(results)
        atomic_write(out / f"figure1_{preset.name}.json", json.dumps(results, indent=1))
    else:
        results = run_benchmark(preset, args)
    plot(results, out / f"figure1_{preset.name}.png")
    atomic_write(out / f"figure1_{preset.name}.md", summary(results))
    total = results["metadata"]["total_seconds"]
    print(f"figure1 preset {preset.name}: done in {total:.0f} s", flush=True)
    for item in results["findings"]:
        verdict = {True: "holds", False: "does NOT hold", None: "undecided"}[item["holds"]]
        print(f"  finding {item['id']}: {verdict}: {item['detail']}", flush=True)
    return results


if __name__ == "__main__":
    main()
