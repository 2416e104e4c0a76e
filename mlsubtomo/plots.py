"""Figures of a run: convergence, class averages, orientations and gold-standard FSC.

Plotting needs matplotlib, the optional ``plot`` extra (``pip install
"mlsubtomo[plot]"``); it is imported only when a figure is made, so the rest of the
package (and :func:`gold_standard_fsc`, which computes and does not draw) works
without it. Figures are made with :class:`matplotlib.figure.Figure` and the Agg
canvas directly, never through ``pyplot``: no backend is switched, no global figure
registry grows, and nothing needs closing. Every function returns its Figure and,
given ``path``, writes it as a PNG atomically (a temporary file in the same folder,
then :func:`os.replace`), so an interrupted run never leaves a half-written image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.utils import check_random_state

from . import kernel
from .io import atomic_write
from .metrics import fsc, fsc_resolution

__all__ = [
    "gold_standard_fsc",
    "plot_central_slices",
    "plot_convergence",
    "plot_fsc",
    "plot_orientations",
    "write_report",
]

_INSTALL_HINT = 'plotting needs matplotlib: pip install "mlsubtomo[plot]"'
_DPI = 100
# The FSC criteria reported by gold_standard_fsc and drawn by plot_fsc.
_THRESHOLDS = (0.5, 0.143)


# --------------------------------------------------------------------------- helpers


def _new_figure(**kwargs):
    """A Figure with an Agg canvas, made without pyplot (no global state touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))


def _finish(fig, path):
    if path is not None:
        _save_png(fig, path)
    return fig


def _volume_stack(volumes, name: str) -> np.ndarray:
    """(n, D, D, D) float array from one volume, a stack or a list of volumes."""
    if isinstance(volumes, list | tuple):
        volumes = np.stack([np.asarray(v) for v in volumes]) if len(volumes) else np.empty(0)
    stack = np.asarray(volumes, dtype=np.float64)
    if stack.ndim == 3:
        stack = stack[None]
    if stack.ndim != 4 or not (stack.shape[1] == stack.shape[2] == stack.shape[3]):
        raise ValueError(
            f"{name} must be a cubic volume (D, D, D) or a stack (n, D, D, D), "
            f"got shape {stack.shape}"
        )
    if stack.shape[0] == 0 or stack.shape[1] < 1:
        raise ValueError(f"{name} holds no volume (shape {stack.shape})")
    return stack


# --------------------------------------------------------------------------- figures


def plot_convergence(estimator, path=None):
    """Log-likelihood, sigma and class weights of a fitted estimator, per EM iteration.

    The x axis counts completed EM iterations (M-steps). Entry j of
    ``log_likelihood_history_`` is the log-likelihood of the model after j
    M-steps, so it is drawn at x = j (the last entry, under the fitted model, at
    x = ``n_iter_``); ``sigma_history_[j]`` and ``class_weights_history_[j]`` are
    the values after M-step j + 1 and are drawn at x = j + 1. The sigma and class
    weight panels are left out when the estimator does not record those histories
    (or they are empty, e.g. ``max_iter=0``). For the constrained cross-correlation
    baseline, which has no likelihood, the first panel shows its
    ``correlation_history_``.

    Parameters
    ----------
    estimator : fitted MissingDataMLClassifier or ConstrainedCCClassifier
    path : str or path, optional
        Write the figure there as a PNG.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel: 1 to 3.

    Raises
    ------
    ValueError
        If the estimator has no history (it is not fitted).
    """
    first = getattr(estimator, "log_likelihood_history_", None)
    first_label = "log-likelihood"
    if first is None:
        first = getattr(estimator, "correlation_history_", None)
        first_label = "mean best correlation"
    if first is None or len(first) == 0:
        raise ValueError("the estimator has no history to plot: fit it first")
    sigma = list(getattr(estimator, "sigma_history_", None) or [])
    weights = list(getattr(estimator, "class_weights_history_", None) or [])

    n_panels = 1 + bool(sigma) + bool(weights)
    fig = _new_figure(figsize=(5.5, 2.2 * n_panels + 0.4), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(np.arange(len(first)), np.asarray(first, dtype=float), "o-", ms=3)
    ax.set_ylabel(first_label)
    row = 1
    if sigma:
        ax = axes[row]
        ax.plot(np.arange(1, len(sigma) + 1), np.asarray(sigma, dtype=float), "o-", ms=3)
        ax.set_ylabel("sigma")
        row += 1
    if weights:
        ax = axes[row]
        w = np.vstack([np.asarray(v, dtype=float).ravel() for v in weights])
        x = np.arange(1, len(w) + 1)
        for k in range(w.shape[1]):
            ax.plot(x, w[:, k], "o-", ms=3, label=f"class {k + 1}")
        ax.set_ylabel("class weight")
        ax.set_ylim(-0.02, min(1.02, max(1.1 * float(w.max()), 0.1)))
        if w.shape[1] <= 10:
            ax.legend(fontsize=7, ncols=min(w.shape[1], 5), loc="best")
    axes[-1].set_xlabel("EM iterations completed")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    n_iter = getattr(estimator, "n_iter_", None)
    if n_iter is not None:
        state = "converged" if getattr(estimator, "converged_", False) else "stopped"
        fig.suptitle(f"{state} after {n_iter} iteration{'s' * (n_iter != 1)}", fontsize=9)
    return _finish(fig, path)


def plot_central_slices(volumes, path=None, titles=None, *, truth=None):
    """Central xy, xz and yz slices of each volume, one volume per row.

    Slices pass through the box centre ``D // 2`` (the rotation centre); volumes
    are indexed ``[z, y, x]`` and drawn with the origin at the lower left. Each
    row shares one grey scale (the volume's own range).

    Parameters
    ----------
    volumes : array-like of shape (K, D, D, D) or (D, D, D), or list of volumes
        E.g. an estimator's ``references_``.
    path : str or path, optional
        Write the figure there as a PNG.
    titles : sequence of str, optional
        One label per row (``volumes`` first, then ``truth``); default
        "class 1", ..., then "truth 1", ....
    truth : array-like of shape (M, D, D, D), optional
        A second set drawn below the first, e.g. the true maps of a simulation.

    Returns
    -------
    matplotlib.figure.Figure
        3 axes per row.
    """
    stack = _volume_stack(volumes, "volumes")
    rows = [(f"class {i + 1}", v) for i, v in enumerate(stack)]
    if truth is not None:
        truth = _volume_stack(truth, "truth")
        if truth.shape[1:] != stack.shape[1:]:
            raise ValueError(
                f"truth has box {truth.shape[1:]}, volumes have {stack.shape[1:]}"
            )
        rows += [(f"truth {i + 1}", v) for i, v in enumerate(truth)]
    if titles is not None:
        titles = [str(t) for t in titles]
        if len(titles) != len(rows):
            raise ValueError(
                f"titles must give one label per row ({len(rows)}), got {len(titles)}"
            )
        rows = [(t, v) for t, (_, v) in zip(titles, rows, strict=True)]
    c = stack.shape[-1] // 2
    fig = _new_figure(figsize=(6, 2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, vol) in enumerate(rows):
        low, high = float(vol.min()), float(vol.max())
        for col, (plane, image) in enumerate(
            (("xy", vol[c]), ("xz", vol[:, c, :]), ("yz", vol[:, :, c]))
        ):
            ax = axes[r, col]
            ax.imshow(image, cmap="gray", origin="lower", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} {plane}", fontsize=8)
    return _finish(fig, path)


def plot_orientations(euler_angles, labels=None, path=None):
    """Viewing directions ``R e_z`` of the particles on a Mollweide (equal-area) map.

    The direction of particle i is where its orientation ``R_i`` takes the
    reference's z axis: longitude rot, latitude 90 - tilt for ZYZ (rot, tilt, psi)
    Euler angles (psi, the in-plane angle, does not show). The projection keeps
    areas, so uniform orientations give a uniform density of points.

    Parameters
    ----------
    euler_angles : array-like of shape (N, 3) or (N, 3, 3)
        ZYZ (rot, tilt, psi) in degrees (an estimator's ``euler_angles_``), or
        rotation matrices (``rotations_``).
    labels : array-like of shape (N,), optional
        Class of each particle; each class gets its own colour.
    path : str or path, optional
        Write the figure there as a PNG.

    Returns
    -------
    matplotlib.figure.Figure
        One axes (Mollweide projection).
    """
    from .transform import matrix_from_euler

    a = np.asarray(euler_angles, dtype=np.float64)
    if a.ndim == 3 and a.shape[1:] == (3, 3):
        matrices = a
    elif a.ndim == 2 and a.shape[1] == 3:
        matrices = matrix_from_euler(a).reshape(-1, 3, 3)
    else:
        raise ValueError(
            f"euler_angles must have shape (N, 3) or rotation matrices (N, 3, 3), got {a.shape}"
        )
    if len(matrices) == 0 or not np.all(np.isfinite(matrices)):
        raise ValueError("euler_angles must be finite and not empty")
    direction = matrices[:, :, 2]
    longitude = np.arctan2(direction[:, 1], direction[:, 0])
    latitude = np.arcsin(np.clip(direction[:, 2], -1.0, 1.0))
    if labels is None:
        labels = np.zeros(len(matrices), dtype=np.int64)
        names = None
    else:
        labels = np.asarray(labels).ravel()
        if labels.shape != (len(matrices),):
            raise ValueError(f"labels must give one class per particle ({len(matrices)})")
        names = True
    fig = _new_figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot(projection="mollweide")
    size = float(np.clip(400.0 / np.sqrt(len(matrices)), 2.0, 30.0))
    for k in np.unique(labels):
        chosen = labels == k
        label = f"class {int(k) + 1} ({int(chosen.sum())})" if names else None
        ax.scatter(longitude[chosen], latitude[chosen], s=size, alpha=0.6, lw=0, label=label)
    ax.grid(True, alpha=0.4)
    ax.tick_params(labelsize=7)
    ax.set_title(f"viewing directions R e_z of {len(matrices)} particles (rot, 90° - tilt)",
                 fontsize=9, pad=14)
    if names and len(np.unique(labels)) <= 12:
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.12, -0.05), markerscale=2)
    return _finish(fig, path)


def plot_fsc(results, path=None):
    """Gold-standard FSC curves (from :func:`gold_standard_fsc`) with the 0.5 and 0.143 lines.

    Parameters
    ----------
    results : dict
        Class index -> result dict of :func:`gold_standard_fsc`; classes whose
        curve is undefined (fewer than 2 particles) are listed but not drawn.
    path : str or path, optional
        Write the figure there as a PNG.

    Returns
    -------
    matplotlib.figure.Figure
        One axes.
    """
    fig = _new_figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    low = -0.1
    for k, res in sorted(results.items()):
        freq = np.asarray(res["frequency"], dtype=float)
        curve = np.asarray(res["curve"], dtype=float)
        n_a, n_b = res.get("n_particles", (0, 0))
        if not np.all(np.isfinite(curve)):
            ax.plot([], [], " ", label=f"class {k + 1}: too few particles ({n_a}+{n_b})")
            continue
        # Shell 0 is the DC component alone: not a meaningful correlation.
        ax.plot(freq[1:], curve[1:], "o-", ms=3,
                label=f"class {k + 1} ({n_a}+{n_b}): {_format_resolution(res)}")
        low = min(low, float(curve[1:].min()) - 0.05)
    for threshold, style in zip(_THRESHOLDS, ("--", ":"), strict=True):
        ax.axhline(threshold, color="grey", ls=style, lw=1, label=f"FSC = {threshold:g}")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_ylim(max(low, -1.05), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_title("gold-standard FSC between half-set averages", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _finish(fig, path)


def _format_resolution(res) -> str:
    parts = []
    for threshold in _THRESHOLDS:
        value = res[f"resolution_{threshold:g}"]
        parts.append(f"{value:.3g} Å" if np.isfinite(value) else "-")
    return " / ".join(parts) + " at 0.5 / 0.143"


# --------------------------------------------------------------------------- FSC


def gold_standard_fsc(
    X,
    masks,
    labels,
    rotations,
    shifts,
    n_classes,
    voxel_size=1.0,
    random_state=0,
    weighted_average_threshold=0.1,
    max_resolution=0.5,
    *,
    symmetry="C1",
    interpolation_order=1,
    fft_backend="pyfftw",
):
    """FSC between the averages of two random halves of each class.

    Each class's particles are split at random into two halves (sizes ``n // 2``
    and ``n - n // 2``); each half is averaged in the reference frame with the
    given poses exactly as the estimators' weighted average does it
    (:func:`mlsubtomo.kernel.prepare_particles` and
    :func:`mlsubtomo.kernel.hard_statistics`, then ``B / W`` where the observation
    count ``W`` exceeds ``weighted_average_threshold``, else 0), and the two half
    maps are compared with :func:`mlsubtomo.metrics.fsc`.

    The poses are fixed here, not refined per half, so this measures the
    consistency of the averages given the alignment: noise that the alignment
    fitted into both halves raises the curve (no substitute for refining the two
    halves independently).

    Parameters
    ----------
    X : array-like of shape (N, D, D, D)
        The particles, as given to ``fit`` (after the same normalisation).
    masks : None, Mask, list of N masks, or bool array
        Observed Fourier components, as for ``fit``.
    labels : array-like of shape (N,), int in [0, n_classes)
    rotations : array-like of shape (N, 3, 3) or Rotation
        ``X_i(r) ~ A(R_i^T (r - t_i))`` (an estimator's ``rotations_``).
    shifts : array-like of shape (N, 3) or None
        ``t_i`` as (x, y, z) voxels, rounded to integers (``shifts_``); None: zero.
    n_classes : int
    voxel_size : float, default=1.0
        Angstrom per voxel, for the frequencies and resolutions.
    random_state : int, RandomState or None, default=0
        Seeds the split.
    weighted_average_threshold : float, default=0.1
    max_resolution : float or None, default=0.5
        Band limit of the averages in cycles per voxel, as the estimators'.
    symmetry : str, default="C1"
        Point group the half maps are symmetrised with (as the class averages are).
    interpolation_order : int, default=1
    fft_backend : {"pyfftw", "scipy"}, default="pyfftw"

    Returns
    -------
    dict
        ``{k: result}`` for every class k, where result holds "frequency" and
        "curve" (arrays of shape (D//2 + 1,), as :func:`~mlsubtomo.metrics.fsc`),
        "resolution_0.5" and "resolution_0.143" (Angstrom, by
        :func:`~mlsubtomo.metrics.fsc_resolution`) and "n_particles" (the two half
        sizes). A class with fewer than 2 particles has a NaN curve and resolutions.
    """
    from .estimator import _check_rotations, _check_volumes, _group_masks, _symmetrise
    from .sampling import symmetry_group

    X = _check_volumes(X)
    n, d = X.shape[0], X.shape[-1]
    n_classes = int(n_classes)
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    labels = np.asarray(labels)
    if labels.shape != (n,) or (n and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be {n} integers, got shape {labels.shape}, {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got {labels.min()}..{labels.max()}"
        )
    rotations = _check_rotations(rotations, n, "rotations")
    if shifts is None:
        shifts = np.zeros((n, 3), dtype=np.int64)
    else:
        shifts = np.asarray(shifts, dtype=np.float64)
        if shifts.shape != (n, 3) or not np.all(np.isfinite(shifts)):
            raise ValueError(f"shifts must be finite with shape {(n, 3)}, got {shifts.shape}")
        shifts = np.rint(shifts).astype(np.int64)
    threshold = float(weighted_average_threshold)
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"weighted_average_threshold must be >= 0, got {threshold!r}")

    group_masks, group = _group_masks(masks, n, d)
    settings = kernel.KernelSettings(
        masks=list(group_masks),
        mask_arrays=np.stack([m.observed(d, max_resolution=max_resolution) for m in group_masks]),
        max_resolution=max_resolution,
        interpolation_order=int(interpolation_order),
        fft_backend=fft_backend,
    )
    data = kernel.prepare_particles(X, settings, group)

    rng = check_random_state(random_state)
    half = np.zeros(n, dtype=np.int64)
    sizes = {}
    for k in range(n_classes):
        members = rng.permutation(np.flatnonzero(labels == k))
        half[members[len(members) // 2:]] = 1
        sizes[k] = (len(members) // 2, len(members) - len(members) // 2)
    # Class k, half h is class 2k + h of one pass of hard statistics.
    stats = kernel.hard_statistics(
        data, 2 * labels + half, rotations, shifts, 2 * n_classes, settings
    )
    counts = stats.observation_counts
    with np.errstate(divide="ignore", invalid="ignore"):
        averages = np.where(counts > threshold, stats.data_sums / counts, 0.0)
    maps = kernel.to_real(averages, d, fft_backend)
    group_matrices = symmetry_group(symmetry).as_matrix()
    if len(group_matrices) > 1:
        maps = _symmetrise(maps, group_matrices)

    results = {}
    for k in range(n_classes):
        if min(sizes[k]) == 0:
            frequency = np.arange(d // 2 + 1) / (d * float(voxel_size))
            curve = np.full(d // 2 + 1, np.nan)
            resolutions = {t: float("nan") for t in _THRESHOLDS}
        else:
            frequency, curve = fsc(maps[2 * k], maps[2 * k + 1], voxel_size=voxel_size)
            resolutions = {t: fsc_resolution(frequency, curve, t) for t in _THRESHOLDS}
        results[k] = {
            "frequency": frequency,
            "curve": curve,
            **{f"resolution_{t:g}": r for t, r in resolutions.items()},
            "n_particles": sizes[k],
        }
    return results


# --------------------------------------------------------------------------- report


def write_report(estimator, folder, X=None, masks=None, voxel_size=1.0):
    """Write the figures of a fitted estimator into ``folder`` (created if needed).

    convergence.png (:func:`plot_convergence`), class_averages.png
    (:func:`plot_central_slices` of ``references_``), orientations.png
    (:func:`plot_orientations` of ``rotations_`` by ``labels_``) and, when the
    particles ``X`` (as given to ``fit``) and their ``masks`` are passed, fsc.png
    (:func:`plot_fsc` of :func:`gold_standard_fsc` with the estimator's poses and
    settings, split with seed 0).

    Returns
    -------
    list of pathlib.Path
        The files written, in that order.
    """
    for name in ("references_", "labels_", "rotations_"):
        if not hasattr(estimator, name):
            raise ValueError(f"the estimator has no {name}: fit it first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _save_png(plot_convergence(estimator), folder / "convergence.png"),
        _save_png(plot_central_slices(estimator.references_), folder / "class_averages.png"),
        _save_png(
            plot_orientations(estimator.rotations_, estimator.labels_),
            folder / "orientations.png",
        ),
    ]
    if X is not None:
        results = gold_standard_fsc(
            X,
            masks,
            estimator.labels_,
            estimator.rotations_,
            getattr(estimator, "shifts_", None),
            estimator.n_classes,
            voxel_size=voxel_size,
            random_state=0,
            weighted_average_threshold=getattr(estimator, "weighted_average_threshold", 0.1),
            max_resolution=getattr(estimator, "max_resolution", 0.5),
            symmetry=getattr(estimator, "symmetry", "C1"),
            interpolation_order=getattr(estimator, "interpolation_order", 1),
            fft_backend=getattr(estimator, "fft_backend", "pyfftw"),
        )
        written.append(_save_png(plot_fsc(results), folder / "fsc.png"))
    return written
